"""Dataset attributions, per batch: how much each source drives each target, grad x activation.

    attr[src, tgt] = (1 / T) * sum over batches and valid positions of (d tgt / d src_act) * src_act

Sources: the inputs (language models: the token embedding, one source per vocabulary id, its
grad x activation summed over d_model; toy models: the input features, src_act = x_i) and every
alive subcomponent (src_act = v_c . x). Targets: every alive subcomponent (its pre-activation
v_c . x) and the output (language models: the pre-unembedding residual, d_model targets, from which
a token's attribution is `row . W_U[:, t]` at query time; toy models: the output features).

One forward per batch with every component mask 1 (no weight delta: a module's output is
`(acts * 1) @ U + bias`) and gradients on. Each source layer gets a gate of ones (the component
masks themselves; a per-position gate on the token embedding's output; a gate on the toy input),
so `d tgt / d gate = (d tgt / d src_act) * src_act` is grad x activation itself. Per target layer
the targets are summed over the batch and positions before the backward (one backward per target,
or several at once with `is_grads_batched`), which also counts every cross-position path through
attention. Which source layers feed which target layer is found by an autograd reachability probe
on the model itself (`connectivity`), never from layer names.

The accumulator sums exactly (exact.py): per position, on a fixed grid, in integers, so states of
different actors and target ranges merge bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from spd_ray.attributions.exact import (
    MAX_POSITION_VALUE,
    MAX_WHOLE,
    WHOLE_BITS,
    normalise,
    split,
)
from spd_ray.attributions.layout import (
    INPUT_LM,
    INPUT_TOY,
    OUTPUT,
    Alive,
    Kind,
    Layout,
    alive_components,
    model_kind,
)
from spd_ray.core.model import ComponentModel, DecomposedModule, ModuleMask
from spd_ray.errors import InputError
from spd_ray.loaded_run import LoadedRun

# -- the model's inputs and outputs ----------------------------------------------------------------


def _hf_module(model: ComponentModel, getter: str) -> nn.Module:
    fn = getattr(model.target, getter, None)
    module = fn() if callable(fn) else None
    if not isinstance(module, nn.Module):
        raise InputError(
            f"the target {type(model.target).__name__} has no {getter}(): language-model "
            "attributions need a Hugging Face-style model with token embedding and unembedding"
        )
    return module


def _weight_out_in(module: nn.Module) -> Float[Tensor, "d_out d_in"]:
    """The weight a module applies in the all-masks-1 forward (nn.Linear orientation)."""
    if isinstance(module, DecomposedModule):
        return module.components.weight()
    weight = getattr(module, "weight", None)
    assert isinstance(weight, Tensor), f"{type(module).__name__} has no weight"
    return weight


def unembed_matrix(model: ComponentModel) -> Float[Tensor, "d_model vocab"]:
    """W_U: the logits are `residual @ W_U (+ bias)`, the residual being the unembedding's input."""
    return _weight_out_in(_hf_module(model, "get_output_embeddings")).detach().T


def n_inputs(model: ComponentModel, kind: Kind) -> int:
    if kind == "lm":
        emb = _hf_module(model, "get_input_embeddings")
        if isinstance(emb, DecomposedModule):
            return int(emb.components.d_in)
        return int(_weight_out_in(emb).shape[0])
    n = getattr(model.target, "n_features", None)
    assert isinstance(n, int), f"toy target {type(model.target).__name__} has no n_features"
    return n


# -- the forward with gates ----------------------------------------------------------------------


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside (the forward then saves nothing for weight gradients)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


@dataclass
class _Forward:
    """One gated forward: a gate (ones, requiring grad) per source layer, and per target layer its
    values [*positions, n] (component acts v_c . x, or the output) before any sum."""

    gates: dict[str, Tensor]
    targets: dict[str, Tensor]
    valid: Tensor  # Bool[*positions]: the positions that count


def gated_forward(
    model: ComponentModel, kind: Kind, batch: Tensor, valid: Tensor | None = None
) -> _Forward:
    dtype = next(model.parameters()).dtype
    device = batch.device
    pos_shape = tuple(batch.shape[:2]) if kind == "lm" else tuple(batch.shape[:1])
    gates: dict[str, Tensor] = {}
    for path in model.module_paths:
        gates[path] = torch.ones(*pos_shape, model.C(path), dtype=dtype, device=device)
    gates[INPUT_LM if kind == "lm" else INPUT_TOY] = torch.ones(
        *pos_shape, 1 if kind == "lm" else batch.shape[-1], dtype=dtype, device=device
    )
    for g in gates.values():
        g.requires_grad_(True)
    record: dict[str, Tensor] = {}
    copies = [{p: ModuleMask(mask=gates[p]) for p in model.module_paths}]
    handles = []
    captured: list[Tensor] = []
    if kind == "lm":
        gate_in = gates[INPUT_LM]
        handles.append(
            _hf_module(model, "get_input_embeddings").register_forward_hook(
                lambda _m, _a, out: out * gate_in
            )
        )
        handles.append(
            _hf_module(model, "get_output_embeddings").register_forward_pre_hook(
                lambda _m, args: captured.append(args[0])
            )
        )
        inp = batch
    else:
        inp = batch.to(dtype) * gates[INPUT_TOY]
    try:
        with torch.enable_grad():
            out = model.masked_forward(inp, copies, record_inputs=record)
            targets = {p: model.comps(p).acts(record[p]) for p in model.module_paths}
    finally:
        for h in handles:
            h.remove()
    if kind == "lm":
        assert len(captured) == 1, f"the unembedding ran {len(captured)} times in one forward"
        targets[OUTPUT] = captured[0]
    else:
        assert out.shape == (*pos_shape, out.shape[-1]), f"toy output {tuple(out.shape)}"
        targets[OUTPUT] = out
    if valid is None:
        valid = torch.ones(pos_shape, dtype=torch.bool, device=device)
    assert tuple(valid.shape) == pos_shape, f"valid {tuple(valid.shape)} vs positions {pos_shape}"
    return _Forward(gates, targets, valid)


def _probe_batch(model: ComponentModel, kind: Kind) -> Tensor:
    param = next(model.parameters())
    if kind == "lm":
        return torch.zeros(2, 3, dtype=torch.long, device=param.device)
    return torch.ones(2, n_inputs(model, kind), dtype=param.dtype, device=param.device)


def connectivity(model: ComponentModel, kind: Kind) -> dict[str, list[str]]:
    """{target layer: the source layers it is reachable from}, by autograd reachability on a
    dummy batch: target layers are the module paths and "output", source layers the input
    ("wte" / "input") and the module paths, each in forward order."""
    with frozen(model):
        fw = gated_forward(model, kind, _probe_batch(model, kind))
        src_layers = [INPUT_LM if kind == "lm" else INPUT_TOY, *model.module_paths]
        inputs = [fw.gates[s] for s in src_layers]
        found: dict[str, list[str]] = {}
        for tgt in [*model.module_paths, OUTPUT]:
            grads = torch.autograd.grad(
                fw.targets[tgt].sum(), inputs, retain_graph=True, allow_unused=True
            )
            found[tgt] = [s for s, g in zip(src_layers, grads, strict=True) if g is not None]
    return found


def make_layout(model: ComponentModel, kind: Kind, alive: dict[str, list[int]]) -> Layout:
    """The layout of `model` with these alive subcomponents (runs the connectivity probe)."""
    assert list(alive) == list(model.module_paths), "alive must list every module path in order"
    for p, idx in alive.items():
        assert idx == sorted(set(idx)) and all(0 <= c < model.C(p) for c in idx), p
    if kind == "lm":
        n_outputs = int(unembed_matrix(model).shape[0])
    else:
        with torch.no_grad():
            n_outputs = int(model(_probe_batch(model, kind)).shape[-1])
    return Layout(kind, n_inputs(model, kind), n_outputs, alive, connectivity(model, kind))


def layout_for_run(loaded: LoadedRun, ci_threshold: float) -> tuple[Layout, Alive]:
    """The layout of a loaded run: its kind, its harvest's alive filter (else every
    subcomponent: `Alive.message` says which), its connectivity."""
    alive = alive_components(loaded.model, loaded.run_dir, ci_threshold)
    return make_layout(loaded.model, model_kind(loaded.config), alive.indices), alive


# -- the accumulator -------------------------------------------------------------------------------


class Accumulator:
    """Sums of grad x activation over batches for the target rows [start, stop) of a layout
    (default: all of them), in exact integer limbs on `device`.

    `add(batch)` takes token ids [b, S] (language models; `n_valid[b]` valid leading positions per
    row, the rest padding that never counts) or inputs [b, n_features] (toy models). `state(lo,
    hi)` hands back any range of the rows as CPU tensors; `merge_states` sums states of the same
    rows exactly, `concat_states` joins adjacent row ranges.
    """

    def __init__(
        self,
        model: ComponentModel,
        layout: Layout,
        targets: tuple[int, int] | None = None,
        targets_per_backward: int = 16,
        device: torch.device | str | None = None,
    ):
        start, stop = targets if targets is not None else (0, layout.n_targets)
        if not 0 <= start <= stop <= layout.n_targets:
            raise InputError(f"target range [{start}, {stop}) outside [0, {layout.n_targets})")
        if targets_per_backward < 1:
            raise InputError(f"targets per backward must be >= 1, got {targets_per_backward}")
        self.model, self.layout = model, layout
        self.start, self.stop = start, stop
        self.k = targets_per_backward
        self.device = next(model.parameters()).device if device is None else torch.device(device)
        # Alive indices per module, None where all are alive (no gather needed).
        self._pick: dict[str, Tensor | None] = {
            p: None
            if idx == list(range(model.C(p)))
            else torch.tensor(idx, dtype=torch.long, device=self.device)
            for p, idx in layout.alive.items()
        }
        shape = (stop - start, layout.n_sources)
        self.whole = torch.zeros(shape, dtype=torch.int64, device=self.device)
        self.fine = torch.zeros(shape, dtype=torch.int64, device=self.device)
        self.bound = 0  # an upper bound of |whole|, kept below MAX_WHOLE
        self._peak = torch.zeros((), dtype=torch.float64, device=self.device)
        self.n_tokens = 0
        self.n_batches = 0

    def nbytes(self) -> int:
        return 2 * self.whole.numel() * 8

    def add(self, batch: Tensor, n_valid: Int[Tensor, " b"] | None = None) -> None:
        lay = self.layout
        batch = batch.to(self.device)
        valid = None
        if lay.kind == "lm":
            batch = batch.long()
            assert batch.dim() == 2, f"token batch must be [b, S], got {tuple(batch.shape)}"
            if n_valid is not None:
                S = batch.shape[1]
                ar = torch.arange(S, device=self.device)
                valid = ar[None, :] < n_valid.to(self.device)[:, None]
        else:
            assert n_valid is None, "toy inputs have no padding"
            assert batch.dim() == 2 and batch.shape[1] == lay.n_inputs, (
                f"toy batch must be [b, {lay.n_inputs}], got {tuple(batch.shape)}"
            )
        with frozen(self.model):
            fw = gated_forward(self.model, lay.kind, batch, valid)
            flat_valid = fw.valid.reshape(-1).nonzero().squeeze(1)
            tokens = batch.reshape(-1)[flat_valid] if lay.kind == "lm" else None
            for tgt_layer, src_layers in lay.sources_by_target.items():
                self._target_layer(fw, tgt_layer, src_layers, flat_valid, tokens)
        # One check per batch (a sync): every per-position value was finite and small enough for
        # split to be exact, and no sum can leave the int64 range. Each (target, source) pair
        # gets one add per batch, of at most P positions.
        P = int(flat_valid.numel())
        peak = float(self._peak)
        self._peak.zero_()
        if not peak < MAX_POSITION_VALUE:  # also NaN
            raise FloatingPointError(f"grad x activation of {peak:.3g} at one position")
        self.bound += P * (int(peak * 2.0**WHOLE_BITS) + 1)
        assert self.bound < MAX_WHOLE, "attribution sums too large for the exact accumulator"
        self.n_tokens += P
        self.n_batches += 1

    def _target_layer(
        self,
        fw: _Forward,
        tgt_layer: str,
        src_layers: list[str],
        flat_valid: Tensor,
        tokens: Tensor | None,
    ) -> None:
        t0, t1 = self.layout.target_span(tgt_layer)
        lo, hi = max(t0, self.start), min(t1, self.stop)
        if lo >= hi or not src_layers:
            return
        values = fw.targets[tgt_layer]
        pick = self._pick.get(tgt_layer)
        if pick is not None:
            values = values[..., pick]
        values = values[..., lo - t0 : hi - t0]
        summed = (values * fw.valid.unsqueeze(-1).to(values.dtype)).flatten(0, -2).sum(0)
        inputs = [fw.gates[s] for s in src_layers]
        for j in range(0, hi - lo, self.k):
            n = min(self.k, hi - lo - j)
            if n == 1:
                grads = torch.autograd.grad(summed[j], inputs, retain_graph=True)
                grads = tuple(g.unsqueeze(0) for g in grads)
            else:
                eye = torch.eye(n, dtype=summed.dtype, device=summed.device)
                grads = torch.autograd.grad(
                    summed[j : j + n], inputs, eye, retain_graph=True, is_grads_batched=True
                )
            rows = slice(lo + j - self.start, lo + j + n - self.start)
            for s, g in zip(src_layers, grads, strict=True):
                self._add_block(rows, s, g.detach(), flat_valid, tokens)

    def _add_block(
        self, rows: slice, src: str, g: Tensor, flat_valid: Tensor, tokens: Tensor | None
    ) -> None:
        """Add grad x act [n, *positions, width] of one source layer to the rows' columns."""
        lay = self.layout
        c0, c1 = lay.source_span(src)
        if c0 == c1:
            return
        n = g.shape[0]
        per_pos = g.reshape(n, -1, g.shape[-1])[:, flat_valid]  # [n, P, width]
        whole_blk, fine_blk = self.whole[rows, c0:c1], self.fine[rows, c0:c1]
        pick = self._pick.get(src)
        if pick is not None:
            per_pos = per_pos[..., pick]
        if per_pos.numel():
            torch.maximum(self._peak, per_pos.detach().abs().max().double(), out=self._peak)
        if src == INPUT_LM:
            assert tokens is not None
            w, f = split(per_pos.squeeze(-1))  # [n, P]
            whole_blk.index_add_(1, tokens, w)
            fine_blk.index_add_(1, tokens, f)
        else:
            w, f = split(per_pos)
            whole_blk += w.sum(1)
            fine_blk += f.sum(1)
        normalise(whole_blk, fine_blk)

    def state(self, lo: int | None = None, hi: int | None = None) -> dict[str, Any]:
        """Rows [lo, hi) (global target indices; default: all this accumulator holds) as CPU
        tensors: `whole`, `fine` int64 [hi - lo, n_sources]; `targets` (lo, hi); `n_tokens`,
        `n_batches`; `bound`."""
        lo = self.start if lo is None else lo
        hi = self.stop if hi is None else hi
        assert self.start <= lo <= hi <= self.stop, f"[{lo}, {hi}) not in this accumulator"
        r = slice(lo - self.start, hi - self.start)
        return {
            "whole": self.whole[r].to("cpu", copy=True),
            "fine": self.fine[r].to("cpu", copy=True),
            "targets": (lo, hi),
            "n_tokens": self.n_tokens,
            "n_batches": self.n_batches,
            "bound": self.bound,
        }
