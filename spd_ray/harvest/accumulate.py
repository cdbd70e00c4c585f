"""The per-actor harvest state: fixed-size accumulators and example tables, updated batch by batch,
sliced by component range and summed exactly.

Per valid position (padding never counts) and subcomponent (N over all decomposed modules, in
`module_paths` order; subcomponent `i` is `<module path>:<c>`):
- firing = CI > ci_threshold (lower-leaky CI); counts, CI sums, |activation| sums while firing,
  where the activation is the normalised one `(v_c . a) * ||U[c]||` (free of the V/U scale);
- co-firing counts [N, N]: firing^T firing;
- input classes: for a language model the token at the position ([N, V] firing counts and [V]
  totals); for a toy model the active input features ([N, n_features] / [n_features]);
- output probability mass ([N, V] sum over firing positions of the predicted distribution, [V]
  totals), language models only. With `output_top_k` = k > 0 each firing position adds only its
  k most probable tokens (their exact probabilities), so the cost is (firing pairs x k) instead
  of (firing pairs x V); the mass left out, `output_dropped` [N] (per component, summed over
  its firing positions), is how far each row is from the exact one: exact - kept is >= 0
  entrywise and sums to `output_dropped` over the row (up to float rounding). k = 0 is the
  exact dense product;
- examples (keep.py): the top-k firings by |activation| and a uniform reservoir, each with a
  window of `2 * context + 1` tokens and this subcomponent's CI and activation over it (toy: the
  input vector).

Integer counts are int64 and float sums float64, so merging partial states is exact for counts
and order-independent to float64 rounding for sums. Memory is fixed by N, the vocabulary and the
table sizes: it never grows with the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from spd_ray.core.model import ComponentModel
from spd_ray.errors import InputError
from spd_ray.harvest.keep import KeepTable

Kind = Literal["lm", "toy"]
UID_OFFSET_BITS = 32  # a position's uid is (doc << 32) | token offset within the doc
OUTPUT_TOP_K = 64  # default output tokens per firing position (benchmarks/harvest_output_mass.py)
SCATTER_CHUNK = 1 << 18  # (pair, kept token) entries scattered at once: 4 MiB of index and values


@dataclass(frozen=True)
class HarvestSettings:
    ci_threshold: float = 1e-6
    top_k: int = 20
    reservoir: int = 100
    context: int = 10
    seed: int = 0
    # Language models: output tokens kept per firing position (0: all, the exact dense product).
    output_top_k: int = OUTPUT_TOP_K

    def __post_init__(self) -> None:
        checks = {
            "ci_threshold": self.ci_threshold >= 0,
            "top_k": self.top_k >= 0,
            "reservoir": self.reservoir >= 0,
            "context": self.context >= 0,
            "output_top_k": self.output_top_k >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")


def component_keys(model: ComponentModel) -> list[str]:
    """`<module path>:<index>` of every subcomponent, in flat-index order."""
    return [f"{p}:{c}" for p in model.module_paths for c in range(model.C(p))]


SUM_FIELDS = (
    "firing_counts",
    "ci_sums",
    "act_sums",
    "cofiring",
    "input_counts",
    "output_mass",
    "output_dropped",
)
TOTAL_FIELDS = ("n_tokens", "input_totals", "output_totals")


class Accumulator:
    """One actor's harvest state (see the module docstring)."""

    def __init__(
        self,
        model: ComponentModel,
        settings: HarvestSettings,
        kind: Kind,
        n_classes: int,
        actor_index: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.model = model
        self.s = settings
        self.kind = kind
        self.device = torch.device(device)
        self.paths = list(model.module_paths)
        self.N = sum(model.C(p) for p in self.paths)
        self.V = n_classes
        N, V, dev = self.N, n_classes, self.device
        self.unorm = {p: model.comps(p).get_U().detach().norm(dim=1) for p in self.paths}
        self.n_tokens = 0
        self.firing_counts = torch.zeros(N, dtype=torch.int64, device=dev)
        self.ci_sums = torch.zeros(N, dtype=torch.float64, device=dev)
        self.act_sums = torch.zeros(N, dtype=torch.float64, device=dev)
        self.cofiring = torch.zeros(N, N, dtype=torch.int64, device=dev)
        self.input_counts = torch.zeros(N, V, dtype=torch.int64, device=dev)
        self.input_totals = torch.zeros(V, dtype=torch.int64, device=dev)
        lm = kind == "lm"
        self.output_mass = torch.zeros(N, V if lm else 0, dtype=torch.float64, device=dev)
        self.output_totals = torch.zeros(V if lm else 0, dtype=torch.float64, device=dev)
        self.output_dropped = torch.zeros(N, dtype=torch.float64, device=dev)  # zero for toys
        self.top = KeepTable(N, settings.top_k)
        self.reservoir = KeepTable(N, settings.reservoir)
        # Reservoir keys: a stream of its own per actor (any independent streams keep it uniform).
        self.generator = torch.Generator(device="cpu").manual_seed(
            settings.seed * 1_000_003 + actor_index
        )

    # -- per batch -------------------------------------------------------------------------

    def _ci_and_acts(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(model output, CI [..., N], normalised activations [..., N])."""
        out, cache = self.model.clean_forward(batch)
        ci = self.model.ci_from_cache(cache).lower
        ci_all = torch.cat([ci[p].float() for p in self.paths], dim=-1)
        acts = torch.cat([(cache.acts(p) * self.unorm[p]).float() for p in self.paths], dim=-1)
        return out, ci_all, acts

    def _common(self, ci: Float[Tensor, "P N"], act: Float[Tensor, "P N"]) -> Bool[Tensor, "P N"]:
        fire = ci > self.s.ci_threshold
        self.n_tokens += ci.shape[0]
        self.firing_counts += fire.sum(0)
        self.ci_sums += ci.sum(0, dtype=torch.float64)
        self.act_sums += (act.abs() * fire).sum(0, dtype=torch.float64)
        f = fire.float()
        # f32 products of 0/1 are exact integers while P < 2**24.
        self.cofiring += (f.T @ f).round().to(torch.int64)
        return fire

    def _offer(
        self,
        fire: Bool[Tensor, "P N"],
        act: Float[Tensor, "P N"],
        uid: Int[Tensor, " P"],
        payload_of: Any,
    ) -> None:
        p_idx, c_idx = fire.nonzero(as_tuple=True)
        if p_idx.numel() == 0:
            return
        comp, pos_uid = c_idx.cpu(), uid[p_idx].cpu()

        def rows(idx: Tensor) -> dict[str, Tensor]:
            idx = idx.to(p_idx.device)
            return {k: v.cpu() for k, v in payload_of(p_idx[idx], c_idx[idx]).items()}

        self.top.update(comp, act[p_idx, c_idx].abs().cpu(), pos_uid, rows)
        keys = torch.rand(comp.numel(), generator=self.generator, dtype=torch.float64)
        self.reservoir.update(comp, keys, pos_uid, rows)

    @torch.no_grad()
    def add_tokens(
        self,
        tokens: Int[Tensor, "b S"],
        n_valid: Int[Tensor, " b"],
        row_uid: Int[Tensor, " b"],
    ) -> None:
        """A batch of token rows; positions >= n_valid[row] are padding and ignored. row_uid is
        the uid of each row's first position (later positions add their index)."""
        assert self.kind == "lm"
        b, S = tokens.shape
        tokens = tokens.to(self.device, torch.long)
        valid = torch.arange(S, device=self.device)[None, :] < n_valid.to(self.device)[:, None]
        logits, ci, act = self._ci_and_acts(tokens)
        N, V = self.N, self.V
        flat = valid.reshape(-1).nonzero().squeeze(1)
        ci_v, act_v = ci.reshape(-1, N)[flat], act.reshape(-1, N)[flat]
        tok_v = tokens.reshape(-1)[flat]
        fire = self._common(ci_v, act_v)
        self.input_counts.index_add_(1, tok_v, fire.T.to(torch.int64))
        self.input_totals += torch.bincount(tok_v, minlength=V)
        probs = torch.softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])[flat, :V]
        if self.s.output_top_k == 0:
            self.output_mass += _sparse_rows_matmul(fire.T, probs).double()
        else:
            add_top_k_mass(self.output_mass, self.output_dropped, fire, probs, self.s.output_top_k)
        # A float32 sum within the batch (a float64 copy of [P, V] costs more than the rest of the
        # bookkeeping); batches add up in float64.
        self.output_totals += probs.sum(0).double()

        W = self.s.context
        pos_uid = (row_uid.to(self.device)[:, None] + torch.arange(S, device=self.device)).reshape(
            -1
        )[flat]
        tok_pad = torch.nn.functional.pad(torch.where(valid, tokens, -1), (W, W), value=-1)
        ci_pad = torch.nn.functional.pad(ci, (0, 0, W, W))
        act_pad = torch.nn.functional.pad(act, (0, 0, W, W))
        window = torch.arange(2 * W + 1, device=self.device)

        def payload_of(p: Tensor, c: Tensor) -> dict[str, Tensor]:
            q = flat[p]
            r, t = q // S, q % S
            cols = t[:, None] + window[None, :]
            rr = r[:, None].expand_as(cols)
            cc = c[:, None].expand_as(cols)
            return {
                "tokens": tok_pad[rr, cols].to(torch.int32),
                "ci": ci_pad[rr, cols, cc],
                "act": act_pad[rr, cols, cc],
            }

        self._offer(fire, act_v, pos_uid, payload_of)

    @torch.no_grad()
    def add_inputs(self, x: Float[Tensor, "b d"], row_uid: Int[Tensor, " b"]) -> None:
        """A batch of toy inputs; the input classes are the active (non-zero) features."""
        assert self.kind == "toy"
        x = x.to(self.device, torch.float32)
        _, ci, act = self._ci_and_acts(x)
        fire = self._common(ci, act)
        active = (x != 0).float()
        self.input_counts += (fire.float().T @ active).round().to(torch.int64)
        self.input_totals += active.sum(0).to(torch.int64)
        uid = row_uid.to(self.device)

        def payload_of(p: Tensor, c: Tensor) -> dict[str, Tensor]:
            return {"x": x[p], "ci": ci[p, c], "act": act[p, c]}

        self._offer(fire, act, uid, payload_of)

    # -- merging ---------------------------------------------------------------------------

    def shard(self, lo: int, hi: int) -> dict[str, Any]:
        """The state of components [lo, hi) (CPU tensors), plus the per-class totals."""
        state: dict[str, Any] = {f: getattr(self, f)[lo:hi].cpu() for f in SUM_FIELDS}
        state["n_tokens"] = self.n_tokens
        state["input_totals"] = self.input_totals.cpu()
        state["output_totals"] = self.output_totals.cpu()
        state["top"] = self.top.select(lo, hi)
        state["reservoir"] = self.reservoir.select(lo, hi)
        return state

    def nbytes(self) -> int:
        fixed = sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in SUM_FIELDS)
        return fixed + self.top.nbytes() + self.reservoir.nbytes()


def merge_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the partial states of one component range (exact for counts)."""
    assert shards, "nothing to merge"
    out = {f: shards[0][f].clone() for f in (*SUM_FIELDS, "input_totals", "output_totals")}
    out["n_tokens"] = shards[0]["n_tokens"]
    top = KeepTable(shards[0]["top"].n_components, shards[0]["top"].k)
    res = KeepTable(shards[0]["reservoir"].n_components, shards[0]["reservoir"].k)
    top.merge(shards[0]["top"])
    res.merge(shards[0]["reservoir"])
    for s in shards[1:]:
        for f in (*SUM_FIELDS, "input_totals", "output_totals"):
            out[f] += s[f]
        out["n_tokens"] += s["n_tokens"]
        top.merge(s["top"])
        res.merge(s["reservoir"])
    out["top"], out["reservoir"] = top, res
    return out


def add_top_k_mass(
    mass: Float[Tensor, "N V"],
    dropped: Float[Tensor, " N"],
    fire: Bool[Tensor, "P N"],
    probs: Float[Tensor, "P V"],
    k: int,
) -> None:
    """mass[c] += the k largest probabilities of every position where c fires (each exactly, in
    float64), dropped[c] += the rest of those positions' mass. Choosing the k costs P x V, like
    the softmax before it; adding them is a scatter over the (component, position) firing
    pairs, pairs x k, where the exact product costs pairs x V."""
    P, V = probs.shape
    assert mass.shape == (fire.shape[1], V) and dropped.shape == (fire.shape[1],)
    kept, cols = probs.topk(min(k, V), dim=1, sorted=False)
    kept64 = kept.double()
    if kept.shape[1] == V:
        left = torch.zeros(P, dtype=torch.float64, device=probs.device)
    else:  # not 1 - kept: the exact path adds float32 probabilities, which do not sum to 1
        left = (probs.sum(1) - kept.sum(1)).clamp_(min=0).double()
    # Component-major pairs: consecutive scatters land in the same row of `mass`.
    comp, pos = fire.T.nonzero(as_tuple=True)
    dropped.index_add_(0, comp, left[pos])
    flat = mass.view(-1)
    step = max(1, SCATTER_CHUNK // kept.shape[1])
    for lo in range(0, comp.numel(), step):
        c, p = comp[lo : lo + step], pos[lo : lo + step]
        idx = cols.index_select(0, p).add_((c * V)[:, None])
        flat.scatter_add_(0, idx.view(-1), kept64.index_select(0, p).view(-1))


def _sparse_rows_matmul(fire_t: Bool[Tensor, "N P"], dense: Float[Tensor, "P V"]) -> Tensor:
    """fire_t.float() @ dense, through a sparse matrix when few entries fire (firing is sparse
    once a decomposition has trained; a dense [N, P] x [P, V] product dominates the batch)."""
    density = float(fire_t.float().mean()) if fire_t.numel() else 0.0
    if density > 0.25 or dense.device.type != "cpu":
        return fire_t.float() @ dense
    return torch.sparse.mm(fire_t.float().to_sparse(), dense)
