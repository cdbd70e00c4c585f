"""What the viewer computes on one prompt, pure torch on a ComponentModel (no server, no files).

Kinds (`spd_ray.attributions.layout.model_kind`): "lm", a Hugging Face causal-LM target whose
prompt is token ids [1, S]; "toy" (tms / resid_mlp), whose prompt is one input vector
[1, n_features] and has one position. Every returned tensor is on the CPU, float64 for a float64
model, else float32.

    prompt_batch(model, kind, tokens=None, x=None) -> [1, S] long / [1, n_features] float
        the checked batch on the model's device (InputError naming `tokens` or `x`)
    prompt_ci(model, batch) -> {module path: [S, C]} (toy: [1, C])       lower-leaky CI
    output_probs(model, kind, batch, masks=None, delta=False) -> [S, V] (toy: [1, n_out])
        LM: next-token softmax of the target (masks None) or of the masked model, every module
        replaced by ModuleMask(masks[path], delta = ones if delta else None); toy: raw outputs
    predictions(model, kind, batch) -> (target, ci_masked)
        ci_masked: masks = lower-leaky CI, no weight delta (evals/ce_kl.py's "ci_masked")
    intervene(model, kind, batch, nodes, mode, delta=True, position=None) -> Intervention
        nodes: [(position, module path, index)]; "keep": masks 1 on the nodes, 0 elsewhere;
        "ablate": 0 on the nodes, 1 elsewhere. With `delta` the weight-delta term is on, so
        keeping everything (or ablating nothing) gives the target's output exactly.
    attribution_graph(model, kind, batch, ci_threshold=0.0, output_p_min=0.01,
                      edge_threshold=0.0, max_edges=5000, progress=None) -> Graph

The prompt graph: grad x activation between the prompt's alive nodes in the forward with every
component mask 1 (no weight delta; the forward of `spd_ray.attributions.compute`, whose summed
attributions these are, per position). Nodes, id "<layer>:<position>:<index>":
  - the input: LM "wte", one node per position, index = the token id, its grad x activation
    summed over d_model; toy "input", one node per nonzero input feature (act = x_i);
  - subcomponents "<module path>" with CI > ci_threshold (act = v_c . x, the pre-mask activation);
  - the output "output": LM, at each position the tokens whose target probability is
    >= output_p_min (act = the logit of the gradient forward, p = the target's probability);
    toy, the features whose target output has |y| > TOY_OUTPUT_FLOOR (act = y of that forward).
Every subcomponent and output node is a target: one gradient of its value against a gate of ones
on every source layer (several targets per backward, `is_grads_batched`), so
d target / d gate = grad x activation. An edge is that value from an alive source at a position
<= the target's; paths through attention make cross-position edges, all kept. Edges are filtered by
|value| >= edge_threshold (exact zeros never count; with edge_threshold 0, values at the rounding
level of a zero do), `n_edges_total` counts those, and the `max_edges` largest by |value| are
returned, largest first.

The ComponentModel runs one forward at a time and `attribution_graph` briefly switches its
parameters' requires_grad off: callers serialise calls on one model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from spd_ray.attributions.compute import (
    frozen,
    gated_forward,
    n_inputs,
    unembed_matrix,
)
from spd_ray.attributions.layout import INPUT_LM, INPUT_TOY, OUTPUT, Kind
from spd_ray.core.model import ComponentModel, DecomposedModule, ModuleMask
from spd_ray.errors import InputError

MAX_PROMPT_TOKENS = 512
MAX_GRAPH_EDGES = 5000
TOY_OUTPUT_FLOOR = 1e-6  # toy output features with |y| at most this are no graph nodes
TARGETS_PER_BACKWARD = 64
POSITION_GROUPS = 8

Mode = Literal["keep", "ablate"]
Progress = Callable[[int, int], None]


def _param(model: ComponentModel) -> Tensor:
    return next(model.parameters())


def _out_dtype(model: ComponentModel) -> torch.dtype:
    return torch.float64 if _param(model).dtype == torch.float64 else torch.float32


def _cpu(model: ComponentModel, x: Tensor) -> Tensor:
    return x.detach().to("cpu", _out_dtype(model))


def _n_pos(kind: Kind, batch: Tensor) -> int:
    return int(batch.shape[1]) if kind == "lm" else 1


# -- the prompt --------------------------------------------------------------------------------


def max_prompt_tokens(model: ComponentModel) -> int:
    """The longest prompt: MAX_PROMPT_TOKENS, or the target's max_position_embeddings if less."""
    config = getattr(model.target, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    return min(MAX_PROMPT_TOKENS, limit) if isinstance(limit, int) else MAX_PROMPT_TOKENS


def prompt_batch(
    model: ComponentModel,
    kind: Kind,
    tokens: Sequence[int] | None = None,
    x: Sequence[float] | None = None,
) -> Tensor:
    """The prompt as a batch of one on the model's device: token ids [1, S] (LM) or the input
    [1, n_features] in the model's dtype (toy). Bad values raise InputError naming the field."""
    param = _param(model)
    if kind == "lm":
        if x is not None:
            raise InputError("x: a language-model prompt is token ids (`tokens`), not a vector")
        if tokens is None or len(tokens) == 0:
            raise InputError("tokens: the prompt is empty")
        limit = max_prompt_tokens(model)
        if len(tokens) > limit:
            raise InputError(f"tokens: {len(tokens)} tokens, at most {limit} allowed")
        vocab = n_inputs(model, "lm")
        for i, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InputError(f"tokens[{i}]: {t!r} is not a token id in [0, {vocab})")
        return torch.tensor([list(tokens)], dtype=torch.long, device=param.device)
    if tokens is not None:
        raise InputError("tokens: a toy model's prompt is an input vector (`x`), not token ids")
    n = n_inputs(model, "toy")
    if x is None or len(x) == 0:
        raise InputError("x: the input vector is empty")
    if len(x) != n:
        raise InputError(f"x: {len(x)} values, the model takes {n} input features")
    for i, v in enumerate(x):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise InputError(f"x[{i}]: {v!r} is not a finite number")
    return torch.tensor([list(x)], dtype=param.dtype, device=param.device)


def _ci(model: ComponentModel, batch: Tensor) -> dict[str, Tensor]:
    """Lower-leaky CI {path: [n_pos, C]} on the model's device."""
    with torch.no_grad():
        ci = model.causal_importances(batch)
    return {p: c.reshape(-1, c.shape[-1]) for p, c in ci.items()}


def prompt_ci(model: ComponentModel, batch: Tensor) -> dict[str, Tensor]:
    """Lower-leaky CI per module: [S, C] (toy: [1, C]), on the CPU."""
    return {p: _cpu(model, c) for p, c in _ci(model, batch).items()}


# -- outputs under masks -----------------------------------------------------------------------


def _outputs(
    model: ComponentModel, kind: Kind, batch: Tensor, masks: dict[str, Tensor] | None, delta: bool
) -> Tensor:
    """Logits [n_pos, V] (LM) or outputs [1, n_out] (toy) on the model's device."""
    with torch.no_grad():
        if masks is None:
            out = model(batch)
        else:
            extra = sorted(set(masks) - set(model.module_paths))
            if extra:
                raise InputError(f"masks: unknown module {extra[0]!r}")
            pos_shape = tuple(batch.shape[:2]) if kind == "lm" else tuple(batch.shape[:1])
            param = _param(model)
            copy: dict[str, ModuleMask] = {}
            for p in model.module_paths:
                if p not in masks:
                    raise InputError(f"masks: no mask for module {p!r}")
                m = masks[p].to(param.device, param.dtype)
                if m.numel() != math.prod(pos_shape) * model.C(p):
                    raise InputError(
                        f"masks[{p!r}]: shape {tuple(m.shape)}, want [*, {model.C(p)}]"
                    )
                d = torch.ones(pos_shape, dtype=param.dtype, device=param.device) if delta else None
                copy[p] = ModuleMask(mask=m.reshape(*pos_shape, model.C(p)), delta=d)
            out = model.masked_forward(batch, [copy])
    n_pos = _n_pos(kind, batch)
    assert out.dim() == len(batch.shape[:2] if kind == "lm" else batch.shape[:1]) + 1, (
        f"{kind} output of shape {tuple(out.shape)} for a batch of shape {tuple(batch.shape)}"
    )
    return out.reshape(n_pos, out.shape[-1])


def output_probs(
    model: ComponentModel,
    kind: Kind,
    batch: Tensor,
    masks: dict[str, Tensor] | None = None,
    delta: bool = False,
) -> Tensor:
    """LM: next-token probabilities [S, V] of the target (masks None) or of the masked model
    (masks {path: [S, C]}, every module); toy: the raw outputs [1, n_out]. On the CPU."""
    out = _cpu(model, _outputs(model, kind, batch, masks, delta))
    return out.softmax(-1) if kind == "lm" else out


def predictions(model: ComponentModel, kind: Kind, batch: Tensor) -> tuple[Tensor, Tensor]:
    """(target, CI-masked) outputs as `output_probs`: masks = lower-leaky CI, no weight delta."""
    ci = _ci(model, batch)
    return output_probs(model, kind, batch), output_probs(model, kind, batch, ci, delta=False)


# -- interventions ------------------------------------------------------------------------------


@dataclass
class Intervention:
    """The output at one position of the target and of the intervened model."""

    position: int
    target: Float[Tensor, " V"]  # LM: probabilities; toy: raw outputs
    intervened: Float[Tensor, " V"]
    max_abs_diff: float  # max |target - intervened| over the whole vector
    kl: float  # LM: KL(target || intervened) in nats; toy: mean squared difference
    changed_top1: bool  # the argmax differs


def intervene(
    model: ComponentModel,
    kind: Kind,
    batch: Tensor,
    nodes: Sequence[tuple[int, str, int]],
    mode: Mode,
    delta: bool = True,
    position: int | None = None,
) -> Intervention:
    """Run the model with "keep" (masks 1 on `nodes` = (position, module path, index), 0
    elsewhere) or "ablate" (0 on the nodes, 1 elsewhere) masks on every module, and compare its
    output at `position` (default: the last) with the target's."""
    if mode not in ("keep", "ablate"):
        raise InputError(f"mode: {mode!r}, want 'keep' or 'ablate'")
    n_pos = _n_pos(kind, batch)
    pos = n_pos - 1 if position is None else position
    if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < n_pos:
        raise InputError(f"position: {position!r} is not in [0, {n_pos})")
    param = _param(model)
    fill, mark = (0.0, 1.0) if mode == "keep" else (1.0, 0.0)
    masks = {
        p: torch.full((n_pos, model.C(p)), fill, dtype=param.dtype, device=param.device)
        for p in model.module_paths
    }
    for i, (s, path, c) in enumerate(nodes):
        if path not in masks:
            raise InputError(f"nodes[{i}]: unknown module {path!r}")
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < model.C(path):
            raise InputError(f"nodes[{i}]: index {c!r} of {path} is not in [0, {model.C(path)})")
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < n_pos:
            raise InputError(f"nodes[{i}]: position {s!r} is not in [0, {n_pos})")
        masks[path][s, c] = mark
    t_out = _cpu(model, _outputs(model, kind, batch, None, False))[pos]
    i_out = _cpu(model, _outputs(model, kind, batch, masks, delta))[pos]
    if kind == "lm":
        lp, lq = t_out.log_softmax(-1), i_out.log_softmax(-1)
        p, q = lp.exp(), lq.exp()
        kl = float(F.kl_div(lq, lp, log_target=True, reduction="sum"))
    else:
        p, q = t_out, i_out
        kl = float((p - q).pow(2).mean())
    return Intervention(
        position=pos,
        target=p,
        intervened=q,
        max_abs_diff=float((p - q).abs().max()),
        kl=kl,
        changed_top1=bool(p.argmax() != q.argmax()),
    )


# -- the prompt's attribution graph ------------------------------------------------------------


@dataclass
class Graph:
    """Nodes (dicts: id, layer, position, index, ci, act, p), edges (source id, target id,
    grad x act) largest |value| first, and the layers in forward order."""

    nodes: list[dict[str, Any]]
    edges: list[tuple[str, str, float]]
    n_edges_total: int  # nonzero edges with |value| >= edge_threshold, before the max_edges cap
    layers: list[str]


@dataclass
class _Layer:
    """The alive nodes of one layer: positions, indices into its gate / values, shown indices."""

    name: str
    pos: Tensor  # long [n]
    col: Tensor  # long [n]: index in the layer's [n_pos, width] gate or values
    shown: Tensor  # long [n]: the node's index (the token id for "wte")


def _alive(name: str, alive: Tensor) -> _Layer:
    pos, col = alive.nonzero(as_tuple=True)
    return _Layer(name, pos, col, col)


def _check_graph_args(
    ci_threshold: float, output_p_min: float, edge_threshold: float, max_edges: int
) -> None:
    if not math.isfinite(ci_threshold):
        raise InputError(f"ci_threshold: {ci_threshold!r} is not a finite number")
    if not 0.0 <= output_p_min <= 1.0:
        raise InputError(f"output_p_min: {output_p_min!r} is not in [0, 1]")
    if not (math.isfinite(edge_threshold) and edge_threshold >= 0.0):
        raise InputError(f"edge_threshold: {edge_threshold!r} is not a finite number >= 0")
    if isinstance(max_edges, bool) or not isinstance(max_edges, int):
        raise InputError(f"max_edges: {max_edges!r} is not an integer")
    if not 1 <= max_edges <= MAX_GRAPH_EDGES:
        raise InputError(f"max_edges: {max_edges} is not in [1, {MAX_GRAPH_EDGES}]")


def _unembed_bias(model: ComponentModel) -> Tensor | None:
    head = getattr(model.target, "get_output_embeddings")()  # noqa: B009 (nn.Module typing)
    bias = head._bias if isinstance(head, DecomposedModule) else getattr(head, "bias", None)
    return bias if isinstance(bias, Tensor) else None


class _TopEdges:
    """The `cap` largest |value| among the edges offered so far whose |value| >= `threshold`
    (and nonzero), and how many such edges were offered."""

    def __init__(self, cap: int, threshold: float, device: torch.device, dtype: torch.dtype):
        self.cap, self.threshold = cap, threshold
        self.total = 0
        self.tgt = torch.zeros(0, dtype=torch.long, device=device)
        self.src = torch.zeros(0, dtype=torch.long, device=device)
        self.val = torch.zeros(0, dtype=dtype, device=device)
        self.floor: Tensor | None = None  # the smallest |value| kept, once `cap` are kept

    def offer(self, block: Tensor, rows: Tensor, cols: Tensor) -> None:
        """block [len(rows), len(cols)]: the edges from sources `cols` into targets `rows`."""
        a = block.abs()
        keep = a >= self.threshold if self.threshold > 0 else a > 0
        self.total += int(torch.count_nonzero(keep))
        if self.floor is not None:  # implies keep: the floor is a kept value
            keep = a > self.floor
        t, s = keep.nonzero(as_tuple=True)
        tgt = torch.cat([self.tgt, rows[t]])
        src = torch.cat([self.src, cols[s]])
        val = torch.cat([self.val, block[t, s]])
        if len(val) >= self.cap:
            top = val.abs().topk(self.cap).indices
            tgt, src, val = tgt[top], src[top], val[top]
            self.floor = val.abs().min()
        self.tgt, self.src, self.val = tgt, src, val

    def sorted(self) -> tuple[list[int], list[int], list[float]]:
        order = self.val.abs().argsort(descending=True, stable=True)
        return (
            self.tgt[order].tolist(),
            self.src[order].tolist(),
            self.val[order].double().tolist(),
        )


def _position_groups(pos: Tensor, n_pos: int, n_groups: int) -> list[tuple[int, int]]:
    """Contiguous position ranges [lo, hi) holding about equal numbers of the targets at `pos`
    (empty ranges left out): a range's backward runs on the prompt's first hi tokens only."""
    counts = torch.bincount(pos.cpu(), minlength=n_pos).cumsum(0)
    total = int(counts[-1])
    cuts = [int(torch.searchsorted(counts, total * g / n_groups)) + 1 for g in range(1, n_groups)]
    bounds = sorted({0, *[min(c, n_pos) for c in cuts], n_pos})
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)]


def _span(lay: _Layer, lo: int, hi: int) -> tuple[int, int]:
    """[a, b): the layer's nodes at positions [lo, hi) (nodes are sorted by position)."""
    a, b = torch.searchsorted(lay.pos, torch.tensor([lo, hi], device=lay.pos.device)).tolist()
    return int(a), int(b)


def _ids(layers: Sequence[_Layer]) -> list[str]:
    return [
        f"{lay.name}:{p}:{i}"
        for lay in layers
        for p, i in zip(lay.pos.tolist(), lay.shown.tolist(), strict=True)
    ]


def _offsets(layers: Sequence[_Layer]) -> list[int]:
    out = [0]
    for lay in layers:
        out.append(out[-1] + len(lay.pos))
    return out


def attribution_graph(
    model: ComponentModel,
    kind: Kind,
    batch: Tensor,
    ci_threshold: float = 0.0,
    output_p_min: float = 0.01,
    edge_threshold: float = 0.0,
    max_edges: int = MAX_GRAPH_EDGES,
    progress: Progress | None = None,
    targets_per_backward: int = TARGETS_PER_BACKWARD,
    position_groups: int = POSITION_GROUPS,
) -> Graph:
    """The prompt's attribution graph (see the module docstring). `progress(done, total)` is
    called with the number of target nodes done, at 0 and after each backward.

    Targets are taken in `position_groups` ranges of positions, each range's forward and
    backward on the prompt cut after its last position (a causal model: the values and gradients
    there are the same), which saves work on long prompts."""
    _check_graph_args(ci_threshold, output_p_min, edge_threshold, max_edges)
    assert targets_per_backward >= 1 and position_groups >= 1
    assert not torch.is_inference_mode_enabled(), "the graph needs autograd (no inference_mode)"
    n_pos = _n_pos(kind, batch)
    in_layer = INPUT_LM if kind == "lm" else INPUT_TOY
    paths = list(model.module_paths)
    dtype = _param(model).dtype
    ci = _ci(model, batch)
    comps = [_alive(p, ci[p] > ci_threshold) for p in paths]
    with torch.no_grad():
        target_out = model(batch).reshape(n_pos, -1)
    probs: Tensor | None = None
    if kind == "lm":
        ar = torch.arange(n_pos, device=batch.device)
        inputs = _Layer(in_layer, ar, torch.zeros_like(ar), batch[0])
        probs = target_out.softmax(-1)
        out_layer = _alive(OUTPUT, probs >= output_p_min)
        w_u = unembed_matrix(model)
    else:
        inputs = _alive(in_layer, batch.reshape(1, -1) != 0)
        out_layer = _alive(OUTPUT, target_out.abs() > TOY_OUTPUT_FLOOR)
    sources, targets = [inputs, *comps], [*comps, out_layer]
    src_off, tgt_off = _offsets(sources), _offsets(targets)
    src_pos = torch.cat([lay.pos for lay in sources])
    tgt_pos = torch.cat([lay.pos for lay in targets])
    n_targets = tgt_off[-1]
    tgt_act = torch.zeros(n_targets, dtype=torch.float64)
    top = _TopEdges(max_edges, edge_threshold, batch.device, dtype)
    done = 0
    if progress is not None:
        progress(0, n_targets)
    groups = _position_groups(tgt_pos, n_pos, position_groups) if kind == "lm" else [(0, 1)]
    for lo, hi in groups:
        # This range's targets (per target layer a contiguous run) and the sources before hi.
        spans = [_span(lay, lo, hi) for lay in targets]
        rows = torch.cat(
            [torch.arange(t0 + a, t0 + b) for t0, (a, b) in zip(tgt_off, spans, strict=False)]
        )
        n_src = [_span(lay, 0, hi)[1] for lay in sources]
        cols = torch.cat([torch.arange(c0, c0 + m) for c0, m in zip(src_off, n_src, strict=False)])
        cols = cols.to(batch.device)
        # Sources at positions >= lo can come after a target's position: those edges are cut.
        late = (src_pos[cols] >= lo).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        with frozen(model), torch.enable_grad():
            fw = gated_forward(model, kind, batch[:, :hi] if kind == "lm" else batch)
            # Per target layer: its values [P, width], the group's nodes in it, their acts.
            outs, picks, acts = [], [], []
            for lay, (a, b) in zip(targets, spans, strict=True):
                full = fw.targets[lay.name]
                pos, col = lay.pos[a:b], lay.col[a:b]
                flat = full.detach().reshape(-1, full.shape[-1])
                if lay.name == OUTPUT and kind == "lm":
                    acts.append((flat[pos] * w_u.T[col]).sum(-1))
                else:
                    acts.append(flat[pos, col])
                outs.append(full)
                picks.append((pos, col))
            tgt_act[rows] = torch.cat(acts).cpu().double()
            gates = [fw.gates[lay.name] for lay in sources]
            # Where each alive source before hi sits in the flattened, concatenated gate grads.
            at, flat_src = 0, []
            for lay, gate, m in zip(sources, gates, n_src, strict=True):
                width = gate.shape[-1]
                flat_src.append(at + lay.pos[:m] * width + lay.col[:m])
                at += gate.numel()
            src_index = torch.cat(flat_src)
            starts = _offsets([_Layer("", p, p, p) for p, _ in picks])
            for j in range(0, len(rows), targets_per_backward):
                n = min(targets_per_backward, len(rows) - j)
                chunk_outs, seeds = [], []
                for k, (full, (pos, col), s0) in enumerate(zip(outs, picks, starts, strict=False)):
                    a, b = max(j - s0, 0), min(j + n - s0, len(pos))
                    if a >= b:
                        continue
                    seed = torch.zeros(n, *full.shape, dtype=full.dtype, device=full.device)
                    flat = seed.view(n, -1, full.shape[-1])
                    r = torch.arange(s0 + a - j, s0 + b - j, device=full.device)
                    if targets[k].name == OUTPUT and kind == "lm":
                        flat[r, pos[a:b]] = w_u.T[col[a:b]]  # d logit / d residual
                    else:
                        flat[r, pos[a:b], col[a:b]] = 1.0
                    chunk_outs.append(full)
                    seeds.append(seed)
                grads = torch.autograd.grad(
                    chunk_outs,
                    gates,
                    seeds,
                    retain_graph=True,
                    is_grads_batched=True,
                    allow_unused=True,
                )
                g_all = torch.cat(
                    [
                        torch.zeros(n, x.numel(), dtype=dtype, device=x.device)
                        if g is None
                        else g.reshape(n, -1)
                        for x, g in zip(gates, grads, strict=True)
                    ],
                    1,
                )
                block = g_all.index_select(1, src_index)
                chunk = rows[j : j + n].to(batch.device)
                after = src_pos[cols[late]][None, :] > tgt_pos[chunk][:, None]
                block[:, late] = block[:, late].masked_fill(after, 0.0)
                top.offer(block, chunk, cols)
                done += n
                if progress is not None:
                    progress(done, n_targets)
            del fw, outs, grads
    src_ids, tgt_ids = _ids(sources), _ids(targets)
    t_idx, s_idx, vals = top.sorted()
    edges = [(src_ids[s], tgt_ids[t], x) for t, s, x in zip(t_idx, s_idx, vals, strict=True)]
    if kind == "lm":
        bias = _unembed_bias(model)
        if bias is not None:
            tgt_act[tgt_off[-2] :] += bias[out_layer.col].cpu().double()
    nodes = _graph_nodes(kind, inputs, comps, out_layer, ci, tgt_act.tolist(), batch, probs)
    return Graph(nodes, edges, top.total, [in_layer, *paths, OUTPUT])


def _graph_nodes(
    kind: Kind,
    inputs: _Layer,
    comps: list[_Layer],
    out_layer: _Layer,
    ci: dict[str, Tensor],
    tgt_act: list[float],
    batch: Tensor,
    probs: Tensor | None,
) -> list[dict[str, Any]]:
    """Node dicts: the inputs, then the subcomponents, then the outputs; tgt_act: the acts of the
    subcomponent and output nodes in that order."""
    nodes = []

    def add(layer: str, pos: int, idx: int, ci: float | None, act: float | None, p: float | None):
        nodes.append(
            {"id": f"{layer}:{pos}:{idx}", "layer": layer, "position": pos, "index": idx}
            | {"ci": ci, "act": act, "p": p}
        )

    x = batch.reshape(-1).double().tolist() if kind == "toy" else None
    for p, i in zip(inputs.pos.tolist(), inputs.shown.tolist(), strict=True):
        add(inputs.name, p, i, None, None if x is None else x[i], None)
    acts = iter(tgt_act)
    for lay in comps:
        c_ci = ci[lay.name][lay.pos, lay.col].double().tolist()
        for p, i, c in zip(lay.pos.tolist(), lay.col.tolist(), c_ci, strict=True):
            add(lay.name, p, i, c, next(acts), None)
    p_out = None if probs is None else probs[out_layer.pos, out_layer.col].double().tolist()
    for k, (p, i) in enumerate(zip(out_layer.pos.tolist(), out_layer.col.tolist(), strict=True)):
        add(OUTPUT, p, i, None, next(acts), None if p_out is None else p_out[k])
    return nodes
