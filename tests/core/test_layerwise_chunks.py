"""Layerwise losses in chunks of masked copies (`masked_copies_per_forward`): the same loss and the
same gradients as one stacked forward, less autograd state kept alive, and the config value
checked and carried to the loss code.

The model is a 2-layer float64 Llama with all 14 linear layers decomposed (random weights, no
download). The forwards run in float64, but `recon_loss` reduces in float32, so chunked and
unchunked values agree to float32 rounding of the reduction order, not to float64 precision.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from step_helpers import clean_inputs
from torch import Tensor

from spd_ray import config as C
from spd_ray.core import recon
from spd_ray.core.losses import loss_term
from spd_ray.core.masks import Noise
from spd_ray.core.model import ComponentModel, ModuleMask
from spd_ray.core.recon import (
    StepInputs,
    chunk_size,
    copy_bytes,
    costliest_copies,
    masked_recon,
    measured_copy_bytes,
    recon_loss,
)
from spd_ray.core.step import step_inputs

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
# float32 reduction (see the module docstring): values differ by ~1e-7 relative, gradients by
# ~5e-7 of the largest gradient; a wrong chunk weight or a lost copy is off by O(1).
RTOL = 2e-6
GRAD_TOL = 1e-5
PGD = {"init": "random", "step_size": 0.1, "n_steps": 2}
LAYERWISE: list[C.LossConfig] = [
    C.CIMaskedReconLayerwiseLoss(coeff=1.0),
    C.StochasticReconLayerwiseLoss(coeff=1.0),
    C.PGDReconLayerwiseLoss(coeff=1.0, **PGD),  # type: ignore[arg-type]
]


@pytest.fixture(scope="module")
def llama() -> ComponentModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    target = LlamaForCausalLM(cfg).eval().double()
    target.requires_grad_(False)
    model = ComponentModel(
        target,
        [("model.layers.*.self_attn.*_proj", 3), ("model.layers.*.mlp.*_proj", 4)],
        ci_fn_type="shared_mlp",
        ci_fn_hidden_dims=[8],
        output_attr="logits",
    )
    return model.double()


def make_inputs(model: ComponentModel, chunk: int | None, seed: int = 3) -> StepInputs:
    batch = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    return clean_inputs(model, batch, "kl", delta=True, noise_seed=seed, copies_per_forward=chunk)


def layerwise_copies(inp: StepInputs) -> list[dict[str, ModuleMask]]:
    return [{p: ModuleMask(mask=inp.ci.lower[p])} for p in inp.paths]


def value_and_grads(
    model: ComponentModel, cfg: C.LossConfig, chunk: int | None
) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad()
    value = loss_term(cfg, make_inputs(model, chunk))
    value.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in params)
    return value.detach(), [p.grad.clone() for p in params]  # type: ignore[union-attr]


@pytest.mark.parametrize("cfg", LAYERWISE, ids=lambda c: c.classname)
def test_chunks_give_the_same_loss_and_gradients(llama: ComponentModel, cfg: C.LossConfig):
    torch.set_num_threads(1)
    assert len(llama.module_paths) == 14
    value, grads = value_and_grads(llama, cfg, None)
    assert value.item() > 1e-4
    scale = max(g.abs().max().item() for g in grads)
    for chunk in (1, 2, 5):  # 5: a short last chunk (14 or 28 copies)
        got, got_grads = value_and_grads(llama, cfg, chunk)
        torch.testing.assert_close(got, value, rtol=RTOL, atol=0.0)
        for g, ref in zip(got_grads, grads, strict=True):
            assert ref.abs().max() > 0
            torch.testing.assert_close(g, ref, rtol=GRAD_TOL, atol=GRAD_TOL * scale)


def test_default_is_one_stacked_forward(llama: ComponentModel):
    """None (and a chunk at least the number of copies) is today's path: one forward of every
    copy, bit for bit."""
    inp = make_inputs(llama, None)
    copies = layerwise_copies(inp)
    with torch.no_grad():
        out = llama.masked_forward(inp.batch, copies, inp.cache)
        old = recon_loss(out, inp.target_out, "kl")
        cfg = C.CIMaskedReconLayerwiseLoss(coeff=1.0)
        assert torch.equal(loss_term(cfg, inp), old)
        assert torch.equal(loss_term(cfg, replace(inp, copies_per_forward=14)), old)
        chunked = loss_term(cfg, replace(inp, copies_per_forward=3))
    torch.testing.assert_close(chunked, old, rtol=RTOL, atol=0.0)


def _saved_elements(inp: StepInputs) -> int:
    """Elements autograd keeps for backward outside checkpointed regions, over one loss."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        masked_recon(inp, layerwise_copies(inp))
    return total


def test_chunks_keep_one_chunk_of_activations(llama: ComponentModel):
    """Unchunked, backward keeps every copy's activations (growing with the module count);
    chunked, it keeps the chunks' inputs and losses only, recomputing the rest."""
    full = _saved_elements(make_inputs(llama, None))
    chunked = _saved_elements(make_inputs(llama, 1))
    assert chunked < full / 10, (chunked, full)


def test_zero_copies_per_forward_is_an_error_naming_the_field():
    with pytest.raises(C.ConfigError, match="masked_copies_per_forward.*greater than or equal"):
        C.load_config(EXPERIMENTS / "tms_5-2.yaml", ["masked_copies_per_forward=0"])


def test_config_value_reaches_the_loss_inputs(llama: ComponentModel):
    batch = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    noise = Noise(torch.Generator().manual_seed(0))
    for value in (None, 4):
        overrides = [] if value is None else [f"masked_copies_per_forward={value}"]
        config = C.load_config(EXPERIMENTS / "tms_5-2.yaml", overrides)
        assert config.masked_copies_per_forward == value
        with torch.no_grad():
            inp = step_inputs(config, llama, batch, noise, 0.0)
        assert inp.copies_per_forward == value


def test_a_copy_is_measured_once_and_sizes_the_budgets_chunks(
    llama: ComponentModel, monkeypatch: pytest.MonkeyPatch
):
    """`masked_forward_budget_mb`: copies per forward = budget // the measured bytes one more copy
    keeps for backward, at least 1; with a chunk size too, the smaller wins; measured once per
    kind of copies; the loss is the unchunked one."""
    recon._COPY_BYTES.pop(llama, None)
    calls: list[int] = []
    saved_bytes = recon._saved_bytes

    def counted(inp: StepInputs, copies: list[dict[str, ModuleMask]]) -> int:
        calls.append(len(copies))
        return saved_bytes(inp, copies)

    monkeypatch.setattr(recon, "_saved_bytes", counted)
    inp = make_inputs(llama, None)
    copies = layerwise_copies(inp)
    # Forward order, whatever the list's: layer 0's attention runs first.
    first, second = costliest_copies(inp, copies[::-1])[:2]
    assert [*first, *second] == [f"model.layers.0.self_attn.{m}_proj" for m in "qk"]
    assert chunk_size(inp, copies) is None and calls == []  # no budget: nothing measured
    one = copy_bytes(inp, copies)
    assert calls == [1, 2]
    # float64, batch 2 x 5: one copy keeps at least its logits (40 per position) and its masked
    # module's input and output (16 each), and less than its share of a 100-layer model's.
    assert 10 * 40 * 8 < one < 100 * 10 * 40 * 8
    assert measured_copy_bytes(llama) == [one]
    assert chunk_size(replace(inp, forward_budget_bytes=3 * one + one // 2), copies) == 3
    assert chunk_size(replace(inp, forward_budget_bytes=one // 2), copies) == 1
    assert (
        chunk_size(replace(inp, forward_budget_bytes=10 * one, copies_per_forward=4), copies) == 4
    )
    assert chunk_size(replace(inp, forward_budget_bytes=2 * one, copies_per_forward=4), copies) == 2
    assert calls == [1, 2] and measured_copy_bytes(llama) == [one]  # cached
    # A hand-computed case: 1000 bytes per copy, a 3500-byte budget -> 3 copies per forward.
    (key,) = recon._COPY_BYTES[llama]
    recon._COPY_BYTES[llama][key] = 1000
    assert chunk_size(replace(inp, forward_budget_bytes=3500), copies) == 3
    assert chunk_size(replace(inp, forward_budget_bytes=999), copies) == 1
    recon._COPY_BYTES.pop(llama)

    cfg = C.StochasticReconLayerwiseLoss(coeff=1.0)
    with torch.no_grad():
        whole = loss_term(cfg, make_inputs(llama, None))
        budget = loss_term(cfg, replace(make_inputs(llama, None), forward_budget_bytes=3 * one))
    torch.testing.assert_close(budget, whole, rtol=RTOL, atol=0.0)
    # Measured again after the reset, under no_grad as under grad; stochastic masks with the delta
    # term keep about as much as the CI masks.
    assert calls == [1, 2, 1, 2]
    (again,) = measured_copy_bytes(llama)
    assert 0.9 * one < again < 1.1 * one
    config = C.load_config(EXPERIMENTS / "tms_5-2.yaml", ["masked_forward_budget_mb=64"])
    batch = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = step_inputs(config, llama, batch, Noise(torch.Generator().manual_seed(0)), 0.0)
    assert got.forward_budget_bytes == 64 * 2**20
    with pytest.raises(C.ConfigError, match="masked_forward_budget_mb"):
        C.load_config(EXPERIMENTS / "tms_5-2.yaml", ["masked_forward_budget_mb=0"])


def test_the_measured_bytes_grow_with_the_layers_a_copy_recomputes(llama: ComponentModel):
    """Copies masking layer 0 recompute both layers; one masking the last module only the head:
    the measurement sees what a copy keeps, not a fixed multiple of the model's size."""
    inp = make_inputs(llama, None)
    early = copy_bytes(inp, layerwise_copies(inp))
    last = list(inp.cache.inputs)[-1]  # forward order
    assert last == "model.layers.1.mlp.down_proj"
    late = copy_bytes(inp, [{last: ModuleMask(mask=inp.ci.lower[last])}])
    assert 0 < late < 0.8 * early


def test_a_budget_chunk_keeps_about_the_budget(llama: ComponentModel):
    """With the budget set to k measured copies, the first chunk (the costliest copies) keeps k
    times the measured bytes (within 10%) on top of what the model keeps anyway."""
    recon._COPY_BYTES.pop(llama, None)
    inp = make_inputs(llama, None)
    copies = layerwise_copies(inp)
    one = copy_bytes(inp, copies)
    budget = replace(inp, forward_budget_bytes=4 * one)
    assert chunk_size(budget, copies) == 4
    kept = recon._saved_bytes(budget, copies[:4]) - recon._saved_bytes(budget, copies[:1])
    assert 0.9 * 3 * one <= kept <= 1.1 * 3 * one, (kept, one)
