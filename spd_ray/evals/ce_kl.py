"""Cross-entropy and KL evals of a language-model decomposition (method.md §3).

`CEandKL` runs the model under six kinds of masks on every decomposed module and compares each
output with the target's: CI-masked (lower-leaky CI), stochastic (CI + (1 - CI) U, with the delta
component iff `use_delta_component`), unmasked (ones), random (U[0, 1)), rounded (1 where
CI > rounding_threshold, else 0) and zero masks. Per kind X it reports

    kl_X              mean over positions of KL(softmax(target) || softmax(X))
    ce_difference_X   CE_X - CE_target
    ce_unrecovered_X  (CE_X - CE_target) / (CE_zero - CE_target)

where CE is the next-token cross-entropy on the eval tokens (logits at t predict token t + 1; the
last position of each sequence has no label). Batch means are weighted by positions, summed over
data-parallel workers, and the ratio is taken of those means. The reference always adds the delta
component to the stochastic masks; here it follows `use_delta_component` like training does.

`SubsetCEandKL` (StochasticReconSubsetCEAndKL) applies the same `n_mask_samples` stochastic masks
(drawn once per batch for all modules) to the modules of each named subset only: `include` subsets
are the modules matching their patterns, `exclude` subsets all modules matching none. Per subset it
reports the mean KL, CE and ce_unrec ((CE - CE_target) / (CE_zero - CE_target) per batch, 0 when
the denominator is 0), averaged over batches and workers, plus the worst (largest) subset per type
and that subset's position in the subset order (include names, then exclude names) as
`<type>_subset`.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from spd_ray.config import StochasticReconSubsetCEAndKL
from spd_ray.core.masks import delta_mask, stochastic_mask
from spd_ray.core.model import ModuleMask
from spd_ray.core.recon import StepInputs, recon_loss
from spd_ray.errors import InputError

MASK_KINDS = ("ci_masked", "unmasked", "stoch_masked", "random_masked", "rounded_masked", "zero")
SUBSET_TYPES = ("kl", "ce", "ce_unrec")


def next_token_ce(
    logits: Float[Tensor, "batch seq vocab"], tokens: Int[Tensor, "batch seq"]
) -> Tensor:
    """Mean cross-entropy of logits[:, t] against tokens[:, t + 1] over batch x (seq - 1)."""
    assert logits.dim() == 3 and tokens.dim() == 2, "CE needs (batch, seq) tokens"
    assert logits.shape[:2] == tokens.shape, f"logits {logits.shape} vs tokens {tokens.shape}"
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def _check_batch(inp: StepInputs) -> None:
    if inp.batch.dim() != 2:
        raise InputError(
            f"CE/KL evals need (batch, seq) token batches, got shape {tuple(inp.batch.shape)}"
        )
    if inp.batch.shape[1] < 2:
        raise InputError("CE/KL evals need sequences of at least 2 tokens")


def _forward(inp: StepInputs, copies: list[dict[str, ModuleMask]]) -> Tensor:
    """Logits of the stacked copies, reshaped to [K, batch, seq, vocab]."""
    out = inp.model.masked_forward(inp.batch, copies, inp.cache)
    return out.reshape(len(copies), *inp.target_out.shape)


def mask_copies(inp: StepInputs, rounding_threshold: float) -> dict[str, dict[str, ModuleMask]]:
    """{kind: {path: ModuleMask}} for the six mask kinds, every module replaced."""
    ci = inp.ci.lower
    kinds: dict[str, dict[str, ModuleMask]] = {k: {} for k in MASK_KINDS}
    for path, c in ci.items():
        kinds["ci_masked"][path] = ModuleMask(mask=c)
        kinds["unmasked"][path] = ModuleMask(mask=torch.ones_like(c))
        kinds["stoch_masked"][path] = _stochastic(inp, c)
        kinds["random_masked"][path] = ModuleMask(
            mask=inp.noise.rand(tuple(c.shape), c.device, c.dtype)
        )
        kinds["rounded_masked"][path] = ModuleMask(mask=(c > rounding_threshold).to(c.dtype))
        kinds["zero"][path] = ModuleMask(mask=torch.zeros_like(c))
    return kinds


def _stochastic(inp: StepInputs, ci: Tensor) -> ModuleMask:
    use_delta = inp.use_delta_component
    delta = delta_mask(tuple(ci.shape[:-1]), ci, inp.noise) if use_delta else None
    return ModuleMask(mask=stochastic_mask(ci, inp.sampling, inp.noise), delta=delta)


def _all_reduce_sum(x: Tensor, world_size: int) -> Tensor:
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


class CEandKL:
    """Accumulates the CEandKLLosses metric over eval batches (one masked forward per kind)."""

    def __init__(self, rounding_threshold: float):
        self.rounding_threshold = rounding_threshold
        # Per kind (plus the target): position-weighted sums of KL and CE, and the position counts.
        self.kl_sum: dict[str, Tensor] = {}
        self.ce_sum: dict[str, Tensor] = {}
        self.n_kl = 0
        self.n_ce = 0

    def update(self, inp: StepInputs) -> None:
        _check_batch(inp)
        B, T = inp.batch.shape
        n_kl, n_ce = B * T, B * (T - 1)
        target = inp.target_out
        zero_kl = torch.zeros((), device=target.device)
        values = {"target": (zero_kl, next_token_ce(target, inp.batch))}
        for kind, masks in mask_copies(inp, self.rounding_threshold).items():
            logits = _forward(inp, [masks])[0]
            kl = recon_loss(logits, target, "kl")
            values[kind] = (kl, next_token_ce(logits, inp.batch))
        for kind, (kl, ce) in values.items():
            kl_w, ce_w = kl.detach().float() * n_kl, ce.detach().float() * n_ce
            self.kl_sum[kind] = self.kl_sum[kind] + kl_w if kind in self.kl_sum else kl_w
            self.ce_sum[kind] = self.ce_sum[kind] + ce_w if kind in self.ce_sum else ce_w
        self.n_kl += n_kl
        self.n_ce += n_ce

    def compute(self, world_size: int = 1) -> dict[str, Tensor]:
        assert self.n_kl > 0, "CEandKL.compute before any update"
        kinds = ["target", *MASK_KINDS]
        sums = torch.stack([self.kl_sum[k] for k in kinds] + [self.ce_sum[k] for k in kinds])
        counts = torch.tensor([self.n_kl, self.n_ce], dtype=sums.dtype, device=sums.device)
        total = _all_reduce_sum(torch.cat([sums, counts]), world_size)
        n = len(kinds)
        kl = dict(zip(kinds, total[:n] / total[-2], strict=True))
        ce = dict(zip(kinds, total[n : 2 * n] / total[-1], strict=True))
        denom = ce["zero"] - ce["target"]
        out: dict[str, Tensor] = {"ce_target": ce["target"]}
        for kind in MASK_KINDS:
            out[f"kl_{kind}"] = kl[kind]
            out[f"ce_difference_{kind}"] = ce[kind] - ce["target"]
            out[f"ce_unrecovered_{kind}"] = (ce[kind] - ce["target"]) / denom
        return out


def subset_modules(paths: list[str], cfg: StochasticReconSubsetCEAndKL) -> dict[str, list[str]]:
    """{subset name: its decomposed modules}: include subsets first, then exclude subsets."""
    subsets: dict[str, list[str]] = {}
    for kind, named in (("include", cfg.include_patterns), ("exclude", cfg.exclude_patterns)):
        for name, patterns in (named or {}).items():
            if name in subsets:
                raise InputError(f"StochasticReconSubsetCEAndKL: subset {name!r} is named twice")
            hit = [p for p in paths if any(fnmatch.fnmatch(p, pat) for pat in patterns)]
            members = hit if kind == "include" else [p for p in paths if p not in hit]
            if not members:
                raise InputError(
                    f"StochasticReconSubsetCEAndKL {kind}_patterns.{name}: the subset has no "
                    f"decomposed module (patterns {patterns}, modules {paths})"
                )
            subsets[name] = members
    if not subsets:
        raise InputError("StochasticReconSubsetCEAndKL needs include_patterns or exclude_patterns")
    return subsets


class SubsetCEandKL:
    """Accumulates StochasticReconSubsetCEAndKL over eval batches."""

    def __init__(self, cfg: StochasticReconSubsetCEAndKL, paths: list[str]):
        self.subsets = subset_modules(paths, cfg)
        self.sums: Tensor | None = None  # [n_subsets, 3]: sums over batches of kl, ce, ce_unrec
        self.n_batches = 0

    def update(self, inp: StepInputs) -> None:
        _check_batch(inp)
        target = inp.target_out
        ce_target = next_token_ce(target, inp.batch).float()
        zero = {p: ModuleMask(mask=torch.zeros_like(c)) for p, c in inp.ci.lower.items()}
        ce_zero = next_token_ce(_forward(inp, [zero])[0], inp.batch).float()
        samples = [
            {p: _stochastic(inp, c) for p, c in inp.ci.lower.items()}
            for _ in range(inp.n_mask_samples)
        ]
        rows = []
        for members in self.subsets.values():
            copies = [{p: s[p] for p in members} for s in samples]
            logits = _forward(inp, copies)
            kl = torch.stack([recon_loss(x, target, "kl") for x in logits]).mean()
            ce = torch.stack([next_token_ce(x, inp.batch) for x in logits]).float().mean()
            denom = ce_zero - ce_target
            unrec = torch.where(denom == 0, torch.zeros_like(ce), (ce - ce_target) / denom)
            rows.append(torch.stack([kl.float(), ce, unrec]))
        values = torch.stack(rows).detach()
        self.sums = values if self.sums is None else self.sums + values
        self.n_batches += 1

    def compute(self, world_size: int = 1) -> dict[str, Tensor]:
        assert self.sums is not None, "SubsetCEandKL.compute before any update"
        n = torch.tensor([[float(self.n_batches)]], device=self.sums.device)
        total = _all_reduce_sum(torch.cat([self.sums.flatten(), n.flatten()]), world_size)
        means = total[:-1].reshape(self.sums.shape) / total[-1]
        out: dict[str, Tensor] = {}
        for i, name in enumerate(self.subsets):
            for j, kind in enumerate(SUBSET_TYPES):
                out[f"subset/{name}/{kind}"] = means[i, j]
        worst, where = means.max(dim=0)
        for j, kind in enumerate(SUBSET_TYPES):
            out[f"subset_worst/{kind}"] = worst[j]
            out[f"subset_worst/{kind}_subset"] = where[j].float()
        return out
