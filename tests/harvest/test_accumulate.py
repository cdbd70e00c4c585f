"""The harvest accumulator against brute force: every count, sum and kept example of a batch of
token rows (with padding) computed position by position from the model's own CI and activations."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spd_ray.core.model import ComponentModel
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


def test_token_statistics_equal_brute_force() -> None:
    model = _model()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (4, 12), generator=g)
    n_valid = torch.tensor([12, 7, 1, 9])
    row_uid = torch.tensor([(5 << 32) | 0, (5 << 32) | 12, (9 << 32) | 0, (2 << 32) | 24])
    s = HarvestSettings(ci_threshold=0.3, top_k=3, reservoir=4, context=2)
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
