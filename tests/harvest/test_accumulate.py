"""The harvest accumulator against brute force: every count, sum and kept example of a batch of
token rows (with padding) computed position by position from the model's own CI and activations;
the top-k output mass against the exact product, its dropped mass, and their merge."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spd_ray.core.model import ComponentModel
from spd_ray.errors import InputError
from spd_ray.harvest.accumulate import Accumulator, HarvestSettings, merge_shards

V = 40


def _model() -> ComponentModel:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    target = LlamaForCausalLM(cfg).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    model = ComponentModel(
        target,
        [("model.layers.0.mlp.down_proj", 6), ("model.layers.0.self_attn.q_proj", 5)],
        ci_fn_type="vector_mlp",
        ci_fn_hidden_dims=[8],
        output_attr="logits",
    )
    return model.eval()


@pytest.mark.parametrize("output_top_k", [0, 64])  # the exact product; top-k with k > V
def test_token_statistics_equal_brute_force(output_top_k: int) -> None:
    model = _model()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (4, 12), generator=g)
    n_valid = torch.tensor([12, 7, 1, 9])
    row_uid = torch.tensor([(5 << 32) | 0, (5 << 32) | 12, (9 << 32) | 0, (2 << 32) | 24])
    s = HarvestSettings(
        ci_threshold=0.3, top_k=3, reservoir=4, context=2, output_top_k=output_top_k
    )
    acc = Accumulator(model, s, "lm", V)
    acc.add_tokens(tokens[:2], n_valid[:2], row_uid[:2])
    acc.add_tokens(tokens[2:], n_valid[2:], row_uid[2:])

    with torch.no_grad():
        logits, cache = model.clean_forward(tokens)
        ci_d = model.ci_from_cache(cache).lower
        ci = torch.cat([ci_d[p] for p in model.module_paths], -1)
        act = torch.cat(
            [cache.acts(p) * model.comps(p).get_U().norm(dim=1) for p in model.module_paths], -1
        )
        probs = torch.softmax(logits, -1)
    N = ci.shape[-1]
    fire_n = np.zeros(N, np.int64)
    co = np.zeros((N, N), np.int64)
    inp = np.zeros((N, V), np.int64)
    mass = np.zeros((N, V))
    ci_sum = np.zeros(N)
    T = 0
    candidates: dict[int, list[tuple[float, int, list[int]]]] = {c: [] for c in range(N)}
    for r in range(4):
        for t in range(int(n_valid[r])):
            T += 1
            f = [c for c in range(N) if ci[r, t, c] > 0.3]
            ci_sum += ci[r, t].double().numpy()
            for c in f:
                fire_n[c] += 1
                inp[c, tokens[r, t]] += 1
                mass[c] += probs[r, t].double().numpy()
                window = [
                    int(tokens[r, j]) if 0 <= j < int(n_valid[r]) else -1
                    for j in range(t - 2, t + 3)
                ]
                candidates[c].append((abs(float(act[r, t, c])), int(row_uid[r]) + t, window))
                for c2 in f:
                    co[c, c2] += 1
    assert acc.n_tokens == T == 29
    np.testing.assert_array_equal(acc.firing_counts.numpy(), fire_n)
    assert fire_n.sum() > 20, "the threshold should leave a mix of firing and silent entries"
    np.testing.assert_array_equal(acc.cofiring.numpy(), co)
    np.testing.assert_array_equal(acc.input_counts.numpy(), inp)
    np.testing.assert_array_equal(
        acc.input_totals.numpy(),
        np.bincount(np.concatenate([tokens[r, : n_valid[r]] for r in range(4)]), minlength=V),
    )
    np.testing.assert_allclose(acc.output_mass.numpy(), mass, rtol=1e-5, atol=1e-6)
    assert not acc.output_dropped.any()  # every token kept
    np.testing.assert_allclose(acc.ci_sums.numpy(), ci_sum, rtol=1e-6)

    state = merge_shards([acc.shard(0, N)])
    top = state["top"]
    for c in range(N):
        best = sorted(candidates[c], key=lambda e: (-e[0], e[1]))[:3]
        rows = (top.comp == c).nonzero().squeeze(1)
        assert top.uid[rows].tolist() == [b[1] for b in best]
        assert top.payload["tokens"][rows].tolist() == [b[2] for b in best]
        np.testing.assert_allclose(top.key[rows].numpy(), [b[0] for b in best], rtol=1e-6)
        # The window's centre holds this component's CI at the firing.
        assert bool((top.payload["ci"][rows, 2] > 0.3).all())
    res = state["reservoir"]
    np.testing.assert_array_equal(res.counts().numpy(), np.minimum(fire_n, 4))
    fired = {c: {e[1] for e in candidates[c]} for c in range(N)}
    assert all(u in fired[c] for c, u in zip(res.comp.tolist(), res.uid.tolist(), strict=True))


def _batch(seed: int, rows: int = 4, S: int = 12) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (rows, S), generator=g)
    n_valid = torch.randint(1, S + 1, (rows,), generator=g)
    return tokens, n_valid, torch.arange(rows) << 32


def _fed(
    model: ComponentModel,
    output_top_k: int,
    batches: list[tuple[torch.Tensor, ...]],
    ci_threshold: float = 0.3,
) -> Any:
    s = HarvestSettings(
        ci_threshold=ci_threshold, top_k=2, reservoir=2, context=1, output_top_k=output_top_k
    )
    acc = Accumulator(model, s, "lm", V)
    for b in batches:
        acc.add_tokens(*b)
    return acc


def test_top_k_of_the_whole_vocabulary_is_the_exact_product() -> None:
    model = _model()
    # One valid position per batch: the exact product's float32 sums within a batch are then
    # single probabilities, so both paths add the same float64 numbers in the same order.
    singles = [(t[:1], torch.tensor([1]), u[:1]) for t, _, u in (_batch(i) for i in range(8))]
    exact, top = _fed(model, 0, singles), _fed(model, V, singles)
    assert int(exact.firing_counts.sum()) > 8 and exact.output_mass.abs().sum() > 0
    assert torch.equal(top.output_mass, exact.output_mass)
    assert not top.output_dropped.any()
    # Whole batches: float32 sums within a batch (exact path) against float64 ones.
    batches = [_batch(10), _batch(11)]
    exact, top = _fed(model, 0, batches), _fed(model, V, batches)
    torch.testing.assert_close(top.output_mass, exact.output_mass, rtol=1e-6, atol=1e-7)


def test_top_k_mass_is_the_exact_mass_less_what_it_drops() -> None:
    model = _model()
    batches = [_batch(20), _batch(21)]
    k = 3
    with torch.no_grad():
        outs = [model.clean_forward(tokens) for tokens, _, _ in batches]
        cis = [
            torch.cat([c[p] for p in model.module_paths], -1)
            for c in (model.ci_from_cache(cache).lower for _, cache in outs)
        ]
        probs = [torch.softmax(logits.float(), -1) for logits, _ in outs]
    valid = [torch.arange(t.shape[1])[None] < n[:, None] for t, n, _ in batches]
    ci_v = torch.cat([c[v] for c, v in zip(cis, valid, strict=True)])
    # A threshold between the two largest CIs of one subcomponent: it fires exactly once, so all
    # of its kept tokens were kept at every firing; the others fire at many positions.
    top2 = ci_v.topk(2, dim=0).values
    once = int(torch.where(top2[0] < 1, top2[0] - top2[1], 0).argmax())
    thr = float(top2[:, once].mean())
    exact, top = _fed(model, 0, batches, thr), _fed(model, k, batches, thr)
    # Brute force, position by position: the top-k set and the mass left out.
    kept_all = torch.ones(exact.N, V, dtype=torch.bool)  # (c, t): every firing of c kept t
    dropped = torch.zeros(exact.N, dtype=torch.float64)
    kept_mass = torch.zeros(exact.N, V, dtype=torch.float64)
    for ci, pr, (tokens, n_valid, _) in zip(cis, probs, batches, strict=True):
        for r in range(tokens.shape[0]):
            for t in range(int(n_valid[r])):
                fire = ci[r, t] > thr
                top_set = torch.zeros(V, dtype=torch.bool)
                top_set[pr[r, t].topk(k).indices] = True
                kept_all[fire] &= top_set
                dropped[fire] += float(pr[r, t][~top_set].double().sum())
                kept_mass[fire] += (pr[r, t] * top_set).double()
    fired = exact.firing_counts > 0
    assert int(exact.firing_counts[once]) == 1 and int(fired.sum()) >= 5
    torch.testing.assert_close(top.output_dropped, dropped, rtol=1e-5, atol=1e-6)
    assert bool((top.output_dropped[fired] > 0.1 * exact.firing_counts[fired]).all())
    diff = exact.output_mass - top.output_mass
    tol = 1e-5
    assert bool((diff >= -tol).all())
    assert bool((diff <= top.output_dropped[:, None] + tol).all())
    # Row by row the exact mass is the kept mass plus exactly what was dropped.
    torch.testing.assert_close(diff.sum(1), top.output_dropped, rtol=1e-5, atol=tol)
    # Kept entries are the exact probabilities, equal to the exact path's where every firing
    # kept them; the others fall short of it.
    torch.testing.assert_close(top.output_mass, kept_mass, rtol=1e-6, atol=1e-7)
    keep = kept_all & fired[:, None]
    assert int(keep.sum()) >= k and int(keep[once].sum()) == k
    torch.testing.assert_close(top.output_mass[keep], exact.output_mass[keep], rtol=1e-6, atol=0)
    short = ~keep & fired[:, None] & (exact.output_mass > 1e-3)
    assert int(short.sum()) > 0 and bool((diff[short] > 0).all())


def test_shards_merge_the_dropped_mass() -> None:
    model = _model()
    a, b = _batch(30), _batch(31)
    both, one, two = _fed(model, 3, [a, b]), _fed(model, 3, [a]), _fed(model, 3, [b])
    N = both.N
    assert bool((one.output_dropped > 0).any()) and bool((two.output_dropped > 0).any())
    for lo, hi in ((0, 4), (4, N)):
        merged = merge_shards([one.shard(lo, hi), two.shard(lo, hi)])
        torch.testing.assert_close(
            merged["output_dropped"], both.output_dropped[lo:hi], rtol=1e-12, atol=0
        )
        torch.testing.assert_close(
            merged["output_mass"], both.output_mass[lo:hi], rtol=1e-12, atol=0
        )


def test_a_negative_output_top_k_is_refused() -> None:
    with pytest.raises(InputError, match="output_top_k must be >= 0, got -1"):
        HarvestSettings(output_top_k=-1)
