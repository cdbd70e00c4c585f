"""The per-batch attribution computation against a brute-force Jacobian, the connectivity probe,
and the exact accumulator (merging, sharding by target range)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from attr_models import VOCAB, brute_force, dense_from_brute

from spd_ray.attributions.compute import (
    Accumulator,
    connectivity,
    make_layout,
)
from spd_ray.attributions.exact import (
    concat_states,
    merge_states,
    split,
    state_sums,
    to_float64,
)
from spd_ray.attributions.layout import (
    OUTPUT,
    Layout,
)
from spd_ray.core.model import ComponentModel
from spd_ray.errors import InputError


def all_alive(model: ComponentModel) -> dict[str, list[int]]:
    return {p: list(range(model.C(p))) for p in model.module_paths}


def tokens(seed: int, b: int = 2, S: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, S), generator=torch.Generator().manual_seed(seed))


def run(
    model: ComponentModel,
    layout: Layout,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    **kw: object,
) -> Accumulator:
    acc = Accumulator(model, layout, **kw)  # type: ignore[arg-type]
    for batch, n_valid in batches:
        acc.add(batch, n_valid)
    return acc


# -- against brute force ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_lm_sums_equal_brute_force(name: str, request: pytest.FixtureRequest) -> None:
    """Every (target, source) sum equals the explicit per-position Jacobian x activation, with
    padding left out; without the cross-position terms (attention) it would not."""
    model: ComponentModel = request.getfixturevalue(name)
    layout = make_layout(model, "lm", all_alive(model))
    batch, n_valid = tokens(0), torch.tensor([5, 3])
    valid = torch.arange(5)[None, :] < n_valid[:, None]
    acc = run(model, layout, [(batch, n_valid)], targets_per_backward=4)
    got = state_sums(acc.state())
    assert acc.n_tokens == 8 and acc.n_batches == 1

    full, same_position = brute_force(model, "lm", batch, valid)
    expected = dense_from_brute(full, layout, model)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    assert (expected != 0).sum() > 0.3 * expected.numel()  # not a vacuous comparison

    # Cross-position paths matter: through attention (k/v of earlier positions into o_proj
    # and everything after), the per-position diagonal alone differs.
    diag = dense_from_brute(same_position, layout, model)
    o_name = "model.layers.0.self_attn.o_proj" if name == "llama" else "transformer.h.0.attn.c_proj"
    k_name = "model.layers.0.self_attn.k_proj" if name == "llama" else "transformer.h.0.attn.c_attn"
    r0, r1 = layout.target_span(o_name)
    c0, c1 = layout.source_span(k_name)
    block, diag_block = got[r0:r1, c0:c1], diag[r0:r1, c0:c1]
    assert (block - diag_block).abs().max() > 1e-3 * block.abs().max()


def test_batched_backward_equals_one_target_at_a_time(llama: ComponentModel) -> None:
    layout = make_layout(llama, "lm", all_alive(llama))
    batches = [(tokens(1), None)]
    one = state_sums(run(llama, layout, batches, targets_per_backward=1).state())
    many = state_sums(run(llama, layout, batches, targets_per_backward=7).state())
    torch.testing.assert_close(many, one, rtol=1e-12, atol=1e-15)


def test_alive_subset_is_the_matching_rows_and_columns(llama: ComponentModel) -> None:
    full_layout = make_layout(llama, "lm", all_alive(llama))
    alive = {
        p: [c for c in range(llama.C(p)) if (i + c) % 2 == 0]
        for i, p in enumerate(llama.module_paths)
    }
    alive[llama.module_paths[0]] = []  # a module with no alive subcomponent
    sub_layout = make_layout(llama, "lm", alive)
    batches = [(tokens(2), torch.tensor([4, 5]))]
    full = state_sums(run(llama, full_layout, batches).state())
    sub = state_sums(run(llama, sub_layout, batches).state())
    keys_full = full_layout.component_keys()
    pick = [keys_full.index(k) for k in sub_layout.component_keys()]
    rows = pick + list(range(full_layout.n_components, full_layout.n_targets))
    cols = list(range(VOCAB)) + [VOCAB + i for i in pick]
    assert sub.shape == (sub_layout.n_targets, sub_layout.n_sources)
    assert sub_layout.n_components == len(pick) < full_layout.n_components
    # The same numbers up to float64 rounding of the sums (the packages of 2026-12-07 differ by
    # ~4e-15 at values up to ~26; bitwise equal before)
    torch.testing.assert_close(sub, full[rows][:, cols], rtol=1e-12, atol=1e-12)


def test_toy_sums_equal_brute_force(tms: ComponentModel) -> None:
    """Toy models: the sources are the input features (src_act = x_i), the output targets the
    model output's entries."""
    layout = make_layout(tms, "toy", all_alive(tms))
    assert layout.n_inputs == 5 and layout.n_outputs == 5
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 5, generator=g, dtype=torch.float64) * (torch.rand(6, 5, generator=g) < 0.6)
    got = state_sums(run(tms, layout, [(x, None)]).state())
    expected = dense_from_brute(brute_force(tms, "toy", x)[0], layout, tms)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    assert (expected != 0).sum() > 0.3 * expected.numel()


# -- connectivity ----------------------------------------------------------------------------------


def test_connectivity_llama_attention_and_order(llama: ComponentModel) -> None:
    conn = connectivity(llama, "lm")
    L0, L1 = "model.layers.0", "model.layers.1"
    assert conn[f"{L0}.self_attn.q_proj"] == ["wte"]
    for src in ("q_proj", "k_proj", "v_proj"):
        assert f"{L0}.self_attn.{src}" in conn[f"{L0}.self_attn.o_proj"]
    # Later never feeds earlier; parallel branches do not feed each other.
    assert f"{L1}.mlp.down_proj" not in conn[f"{L0}.mlp.up_proj"]
    assert f"{L0}.mlp.gate_proj" not in conn[f"{L0}.mlp.up_proj"]
    assert f"{L0}.self_attn.o_proj" not in conn[f"{L0}.self_attn.o_proj"]
    assert f"{L0}.mlp.gate_proj" in conn[f"{L0}.mlp.down_proj"]
    assert f"{L1}.self_attn.v_proj" in conn[f"{L1}.self_attn.o_proj"]
    assert conn[OUTPUT] == ["wte", *llama.module_paths]
    for i, tgt in enumerate(llama.module_paths):
        assert all(llama.module_paths.index(s) < i for s in conn[tgt] if s != "wte"), tgt


def test_connectivity_gpt2_and_toy(gpt2: ComponentModel, tms: ComponentModel) -> None:
    conn = connectivity(gpt2, "lm")
    assert conn["transformer.h.0.attn.c_proj"] == ["wte", "transformer.h.0.attn.c_attn"]
    assert "transformer.h.1.attn.c_attn" not in conn["transformer.h.0.mlp.c_fc"]
    toy = connectivity(tms, "toy")
    assert toy == {
        "linear1": ["input"],
        "hidden_layers.0": ["input", "linear1"],
        "linear2": ["input", "linear1", "hidden_layers.0"],
        OUTPUT: ["input", "linear1", "hidden_layers.0", "linear2"],
    }


# -- the exact accumulator -------------------------------------------------------------------------


def test_split_is_exact_on_its_grid() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g, dtype=torch.float64)
    x = x * 10.0 ** torch.randint(-25, 9, (10_000,), generator=g).double()
    whole, fine = split(x)
    back = to_float64(whole, fine)
    assert (back - x).abs().max() <= 2.0**-61  # half the grid step
    big = x.abs() >= 2.0**-8  # all 53 bits of these lie on the 2**-60 grid: back exactly
    assert torch.equal(back[big], x[big])


def test_merge_equals_sequential_and_shards_concatenate(llama: ComponentModel) -> None:
    layout = make_layout(llama, "lm", all_alive(llama))
    A = [(tokens(10), torch.tensor([5, 2])), (tokens(11), None)]
    B = [(tokens(12), None), (tokens(13), torch.tensor([1, 5])), (tokens(14), None)]
    seq = run(llama, layout, A + B, targets_per_backward=5).state()
    a = run(llama, layout, A, targets_per_backward=5).state()
    b = run(llama, layout, B, targets_per_backward=5).state()
    for merged in (merge_states([a, b]), merge_states([b, a])):
        assert torch.equal(merged["whole"], seq["whole"])
        assert torch.equal(merged["fine"], seq["fine"])
        assert merged["n_tokens"] == seq["n_tokens"] == (5 + 2) + 10 + 10 + (1 + 5) + 10
        assert merged["n_batches"] == 5
    # The float64 sum in batch order differs from the exact one in the last bits, not more.
    torch.testing.assert_close(state_sums(seq), state_sums(a) + state_sums(b), rtol=1e-12, atol=0)

    # Target ranges computed apart (fewer backwards each) and joined equal the whole.
    n = layout.n_targets
    cuts = [0, 7, 30, n]
    shards = [
        run(llama, layout, A + B, targets=(lo, hi), targets_per_backward=5).state()
        for lo, hi in zip(cuts, cuts[1:], strict=False)
    ]
    joined = concat_states(shards[::-1])
    assert joined["targets"] == (0, n)
    assert torch.equal(joined["whole"], seq["whole"]) and torch.equal(joined["fine"], seq["fine"])
    # ... and a state cut by range and merged per range, then joined, too.
    acc_a = run(llama, layout, A, targets_per_backward=5)
    acc_b = run(llama, layout, B, targets_per_backward=5)
    per_range = [
        merge_states([acc_a.state(lo, hi), acc_b.state(lo, hi)])
        for lo, hi in zip(cuts, cuts[1:], strict=False)
    ]
    rejoined = concat_states(per_range)
    assert torch.equal(rejoined["whole"], seq["whole"]) and torch.equal(
        rejoined["fine"], seq["fine"]
    )


def test_bad_arguments(llama: ComponentModel) -> None:
    layout = make_layout(llama, "lm", all_alive(llama))
    with pytest.raises(InputError, match="target range"):
        Accumulator(llama, layout, targets=(5, layout.n_targets + 1))
    with pytest.raises(InputError, match="per backward"):
        Accumulator(llama, layout, targets_per_backward=0)
    acc = Accumulator(llama, layout)
    with pytest.raises(AssertionError, match="rows"):
        merge_states([acc.state(0, 3), acc.state(3, 6)])
