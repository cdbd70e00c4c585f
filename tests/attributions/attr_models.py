"""Tiny float64 decompositions (Llama, GPT-2, TMS) and a brute-force attribution: an explicit
Jacobian, per position and target element, of every target with respect to an additive
perturbation of every source activation, times the activation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from spd_ray.analysis.batches import run_batches
from spd_ray.attributions.compute import Accumulator, layout_for_run
from spd_ray.attributions.exact import state_means
from spd_ray.attributions.layout import (
    INPUT_LM,
    INPUT_TOY,
    OUTPUT,
    Kind,
)
from spd_ray.core.model import ComponentModel, ModuleMask
from spd_ray.loaded_run import LoadedRun

VOCAB = 50


def _freeze(target: torch.nn.Module) -> torch.nn.Module:
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class RMSNorm64(torch.nn.Module):
    """Llama's RMSNorm in the input's dtype: Hugging Face's computes it in float32 whatever the
    dtype, which would limit every float64 comparison here to float32 precision."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.variance_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def tiny_llama(layers: int = 2, C: int = 3) -> ComponentModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    target = _freeze(LlamaForCausalLM(cfg))
    for name, module in list(target.named_modules()):
        if type(module).__name__ == "LlamaRMSNorm":
            parent, _, child = name.rpartition(".")
            setattr(target.get_submodule(parent), child, RMSNorm64(module))
    model = ComponentModel(
        target,
        [("model.layers.*.self_attn.*_proj", C), ("model.layers.*.mlp.*_proj", C)],
        output_attr="logits",
    )
    return model.eval().double()


def tiny_gpt2(C: int = 3) -> ComponentModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    target = _freeze(GPT2LMHeadModel(cfg))
    model = ComponentModel(
        target,
        [("transformer.h.*.attn.c_*", C), ("transformer.h.*.mlp.c_*", C)],
        output_attr="logits",
    )
    return model.eval().double()


def tiny_tms(C: int = 4) -> ComponentModel:
    from spd_ray.config import TMSTargetConfig
    from spd_ray.targets.tms import TMSModel

    torch.manual_seed(2)
    cfg = TMSTargetConfig(
        model_type="tms", n_features=5, n_hidden=3, n_hidden_layers=1, tied_weights=True
    )
    target = _freeze(TMSModel(cfg))
    model = ComponentModel(
        target,
        [("linear1", C), ("hidden_layers.0", C), ("linear2", C)],
        tied_pairs=target.tied_module_pairs,
    )
    return model.eval().double()


def brute_force(
    model: ComponentModel,
    kind: Kind,
    batch: Tensor,
    valid: Tensor | None = None,
    logits_of: list[int] | None = None,
) -> tuple[dict[tuple[str, str], Tensor], dict[tuple[str, str], Tensor]]:
    """{(target layer, source layer): sums [n_target_units, n_source_units]} over every unit
    (all subcomponents; the inputs: vocabulary ids / features; the output: residual dims /
    features, or with `logits_of` the logits of those tokens); and the same with only the
    same-position terms (no path from one position to another)."""
    paths = list(model.module_paths)
    in_layer = INPUT_LM if kind == "lm" else INPUT_TOY
    pos_shape = tuple(batch.shape[:2]) if kind == "lm" else tuple(batch.shape[:1])
    if valid is None:
        valid = torch.ones(pos_shape, dtype=torch.bool)
    comps = {p: model.comps(p) for p in paths}
    acts_fn = {p: comps[p].acts for p in paths}
    emb = model.target.get_input_embeddings() if kind == "lm" else None
    head = model.target.get_output_embeddings() if kind == "lm" else None

    def run(eps: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(targets, source activations) of a forward with all masks 1 and `eps` added to the
        source activations."""
        seen: dict[str, Tensor] = {}
        handles = []
        for p in paths:

            def acts(x: Tensor, p: str = p) -> Tensor:
                a = acts_fn[p](x)
                seen[p] = a
                return a + eps[p]

            comps[p].__dict__["acts"] = acts
        resid: list[Tensor] = []
        if kind == "lm":
            assert emb is not None and head is not None

            def emb_hook(_m: Any, _a: Any, out: Tensor) -> Tensor:
                seen[in_layer] = out
                return out + eps[in_layer] if in_layer in eps else out

            handles.append(emb.register_forward_hook(emb_hook))
            handles.append(head.register_forward_pre_hook(lambda _m, a: resid.append(a[0])))
            inp = batch
        else:
            seen[in_layer] = batch
            inp = batch + eps[in_layer] if in_layer in eps else batch
        record: dict[str, Tensor] = {}
        masks = {
            p: ModuleMask(torch.ones(*pos_shape, model.C(p), dtype=torch.float64)) for p in paths
        }
        try:
            out = model.masked_forward(inp, [masks], record_inputs=record)
        finally:
            for h in handles:
                h.remove()
            for p in paths:
                del comps[p].__dict__["acts"]
        targets = {p: acts_fn[p](record[p]) for p in paths}
        if logits_of is not None:
            targets[OUTPUT] = out[..., logits_of]
        else:
            targets[OUTPUT] = resid[0] if kind == "lm" else out
        return targets, seen

    width = {p: model.C(p) for p in paths}
    zeros0 = {p: torch.zeros(*pos_shape, width[p], dtype=torch.float64) for p in paths}
    _, acts0 = run(zeros0)
    in_width = acts0[in_layer].shape[-1]
    src_layers = [in_layer, *paths]
    tgt_layers = [*paths, OUTPUT]
    zeros = {**zeros0, in_layer: torch.zeros(*pos_shape, in_width, dtype=torch.float64)}

    def f(*eps: Tensor) -> tuple[Tensor, ...]:
        targets, _ = run(dict(zip(src_layers, eps, strict=True)))
        return tuple(targets[t] for t in tgt_layers)

    jac = torch.autograd.functional.jacobian(f, tuple(zeros[s] for s in src_layers), vectorize=True)
    vt = valid.to(torch.float64)
    n_pos = len(pos_shape)
    eye = torch.eye(int(vt.numel()), dtype=torch.float64).reshape(*pos_shape, 1, *pos_shape, 1)
    both: tuple[dict[tuple[str, str], Tensor], dict[tuple[str, str], Tensor]] = ({}, {})
    for ti, t in enumerate(tgt_layers):
        for si, s in enumerate(src_layers):
            J = jac[ti][si]  # [*pos, n_t, *pos', w]
            J = J * vt.reshape(*pos_shape, *([1] * (J.dim() - n_pos)))
            J = J * vt.reshape(*([1] * (n_pos + 1)), *pos_shape, 1)
            for out, JJ in zip(both, (J, J * eye), strict=True):
                ga = JJ * acts0[s].detach().reshape(*([1] * (n_pos + 1)), *acts0[s].shape)
                ga = ga.sum(dim=tuple(range(n_pos)))  # [n_t, *pos', w]
                if s == INPUT_LM:
                    per_pos = ga.sum(-1).reshape(ga.shape[0], -1)  # [n_t, P]
                    m = torch.zeros(ga.shape[0], VOCAB, dtype=torch.float64)
                    m.index_add_(1, batch.reshape(-1), per_pos)
                else:
                    m = ga.reshape(ga.shape[0], -1, ga.shape[-1]).sum(1)
                out[(t, s)] = m
    return both


def dense_from_brute(
    bf: dict[tuple[str, str], Tensor], layout: Any, model: ComponentModel
) -> Tensor:
    """The brute-force sums laid out as the attribution matrix of `layout`."""
    full = torch.zeros(layout.n_targets, layout.n_sources, dtype=torch.float64)
    for (t, s), m in bf.items():
        r0, r1 = layout.target_span(t)
        c0, c1 = layout.source_span(s)
        rows = m if t == OUTPUT else m[layout.alive[t]]
        cols = rows if s == layout.input_layer else rows[:, layout.alive[s]]
        full[r0:r1, c0:c1] = cols
    return full


def input_to_output(loaded: LoadedRun, n_batches: int, batch_size: int) -> torch.Tensor:
    """The [output feature, input feature] block of the attribution means."""
    layout, alive = layout_for_run(loaded, ci_threshold=0.0)
    assert alive.source == "all"  # the run has no harvest
    acc = Accumulator(loaded.model, layout, targets_per_backward=8)
    for _, batch in zip(range(n_batches), run_batches(loaded, batch_size, seed=0), strict=False):
        acc.add(batch)
    o0, o1 = layout.target_span(OUTPUT)
    return state_means(acc.state())[o0:o1, : layout.n_inputs]


# -- fixtures: the attribution tests' conftest and the viewer's compute tests import these --------


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared machine: more threads only contend (100x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama() -> ComponentModel:
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2() -> ComponentModel:
    return tiny_gpt2()


@pytest.fixture(scope="module")
def tms() -> ComponentModel:
    return tiny_tms()
