"""The induction-heads toy: task generator, sharded stream, target model and trainer, e2e run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from cli_args import spd_ray_cmd

from spd_ray.config import Config, IHTargetConfig, IHTaskConfig
from spd_ray.core.losses import StepInputs, ci_masked_recon_loss
from spd_ray.core.masks import Noise
from spd_ray.core.model import CIOutputs, ComponentModel, ModuleMask
from spd_ray.core.step import build_component_model
from spd_ray.data.ih import BOS, IHBatches, InductionTask, make_ih_task
from spd_ray.targets.ih import InductionTransformer, ih_accuracy, train_ih
from spd_ray.targets.loading import cached_target_path, load_or_train_toy

PROJ = ("q", "k", "v", "out")
OUT = "blocks.1.attn.out_proj"
# Small enough to train in a few seconds on one CPU thread.
SMALL = IHTargetConfig(
    vocab_size=16, seq_len=16, d_model=32, steps=2000, batch_size=256, lr=3e-3, lr_warmup_steps=100
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    out = tmp_path_factory.mktemp("out")
    return load_or_train_toy(SMALL, out, progress=False), out


def _first_s(tokens: torch.Tensor, s: int) -> torch.Tensor:
    return (tokens == s).int().argmax(dim=1)


@pytest.mark.parametrize("window", [None, 2, 6])
def test_generator_layout_and_label(window):
    task = InductionTask(vocab_size=10, seq_len=12, prefix_window=window)
    tokens, labels = task.generate_batch(4096, torch.Generator().manual_seed(0))
    s = task.induction_token
    assert s == 11 and tokens.shape == (4096, 12) and labels.shape == (4096,)
    assert (tokens[:, 0] == BOS).all() and (tokens[:, -1] == s).all()
    body = tokens[:, 1:-1]
    assert ((body >= 1) & (body <= s)).all(), "BOS never recurs; tokens are 1..V or S"
    assert ((tokens == s).sum(1) == 2).all(), "exactly one S before the final one"
    first = _first_s(tokens, s)
    # p in [1, prefix_window) counted after BOS, so the sequence position is 1 + p.
    lo, hi = 2, task.prefix_window + 1
    assert ((first >= lo) & (first < hi)).all()
    assert set(first.tolist()) == set(range(lo, hi)), "every allowed position is drawn"
    after = tokens.gather(1, (first + 1).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(labels, after)
    assert ((labels >= 1) & (labels <= 10)).all()
    assert len(set(labels.tolist())) == 10


def test_generator_rejects_a_window_that_does_not_fit():
    with pytest.raises(ValueError, match="prefix_window"):
        InductionTask(vocab_size=10, seq_len=12, prefix_window=10)
    with pytest.raises(ValueError, match="prefix_window"):
        InductionTask(vocab_size=10, seq_len=12, prefix_window=1)


def test_stream_shards_concatenate_to_the_single_rank_batch():
    task = InductionTask(vocab_size=10, seq_len=12)
    full = IHBatches(task, 8, seed=3)
    shards = [IHBatches(task, 8, seed=3, rank=r, world_size=4) for r in range(4)]
    for _ in range(3):
        expected = next(full)
        got = torch.cat([next(s) for s in shards])
        assert torch.equal(got, expected) and got.dtype == torch.long
    with pytest.raises(ValueError, match="divisible"):
        IHBatches(task, 6, seed=0, rank=0, world_size=4)


def test_stream_resumes_on_another_world_size():
    task = InductionTask(vocab_size=10, seq_len=12)
    a = IHBatches(task, 8, seed=5)
    next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(2)]
    b = [IHBatches(task, 8, seed=5, rank=r, world_size=2) for r in range(2)]
    for s in b:
        s.load_state_dict(state)
    for want in expected:
        assert torch.equal(torch.cat([next(s) for s in b]), want)
    assert b[0].batches_served == 3
    with pytest.raises(ValueError, match="seed"):
        IHBatches(task, 8, seed=6).load_state_dict(state)


def test_model_names_shapes_and_deterministic_init():
    cfg = IHTargetConfig(vocab_size=10, seq_len=12, d_model=8, n_heads=2, n_layers=2)
    model = InductionTransformer(cfg)
    names = [n for n, _ in model.named_parameters()]
    projections = [f"blocks.{i}.attn.{p}_proj.weight" for i in range(2) for p in PROJ]
    assert names == ["token_embed.weight", *projections, "unembed.weight"]
    assert model.token_embed.num_embeddings == 12 and model.unembed.out_features == 12
    tokens, _ = InductionTask(10, 12).generate_batch(3, torch.Generator().manual_seed(0))
    assert model(tokens).shape == (3, 12, 12), "logits at every position"
    assert model.last_logits(tokens).shape == (3, 12)
    assert torch.equal(model.last_logits(tokens), model.unembed(model.residual(tokens)[:, -1]))
    other = InductionTransformer(cfg)
    for pa, pb in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not any(k.endswith(".pe") for k in model.state_dict()), "pe is derived, not saved"


def test_attention_is_causal_and_output_covers_every_position():
    cfg = IHTargetConfig(vocab_size=10, seq_len=12, d_model=8)
    model = InductionTransformer(cfg)
    tokens, _ = InductionTask(10, 12).generate_batch(4, torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 7:] = 1
    assert torch.equal(model(changed[:, :7]), model(tokens[:, :7]))
    full, full_changed = model(tokens), model(changed)
    torch.testing.assert_close(full_changed[:, :7], full[:, :7], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(full_changed[:, 7:], full[:, 7:])
    torch.testing.assert_close(full[:, -1], model.last_logits(tokens), rtol=1e-6, atol=1e-6)


def test_trained_target_predicts_the_induction_label(trained):
    model, out = trained
    assert isinstance(model, InductionTransformer) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    task = InductionTask(SMALL.vocab_size, SMALL.seq_len)
    acc = ih_accuracy(model, task, 2048, torch.Generator().manual_seed(123))
    assert acc > 0.95, f"last-position accuracy {acc:.3f} (chance {1 / SMALL.vocab_size:.3f})"
    # Also with a narrower window than the one it was trained on.
    narrow = make_ih_task(IHTaskConfig(prefix_window=4), model)
    assert ih_accuracy(model, narrow, 2048, torch.Generator().manual_seed(4)) > 0.95
    path = cached_target_path(SMALL, out)
    assert path.is_file() and (path.parent / "target_config.yaml").is_file()
    again = load_or_train_toy(SMALL, out, progress=False)
    for pa, pb in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_train_ih_fails_loudly_when_it_cannot_learn():
    with pytest.raises(RuntimeError, match="accuracy"):
        train_ih(SMALL.model_copy(update={"steps": 5}))


def test_make_ih_task_needs_an_ih_target():
    with pytest.raises(ValueError, match="ih target"):
        make_ih_task(IHTaskConfig(), torch.nn.Linear(2, 2))


@pytest.mark.slow  # CI keeps the in-process CLI run of tests/train/test_run.py
def test_cli_run_ih_in_process(tmp_path):
    env = {**os.environ, "SPD_RAY_OUT": str(tmp_path), "SPD_RAY_THREADS": "1"}
    overrides = ["n_eval_steps=1", "slow_eval_on_first_step=false", "faithfulness_warmup_steps=10"]
    args = ["run", "ih", "--in-process", "--steps", "20", "--name", "ih-e2e"]
    for item in overrides:
        args += ["--set", item]
    res = subprocess.run(
        spd_ray_cmd(*args),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "ih-e2e" / "summary.json").read_text())
    assert summary["final_step"] == 20
    final = summary["final_eval"]
    for layer in range(2):
        for proj in PROJ:
            assert f"eval/l0/blocks.{layer}.attn.{proj}_proj" in final
    for loss in ("StochasticReconLoss", "StochasticReconLayerwiseLoss", "FaithfulnessLoss"):
        assert torch.isfinite(torch.tensor(final[f"eval/loss/{loss}"]))


def _ih_step_inputs(positions: str, tokens: torch.Tensor) -> StepInputs:
    """Loss inputs of an untrained IH target whose last `out_proj` is decomposed (the same
    components and CI values at every call)."""
    target = InductionTransformer(IHTargetConfig(vocab_size=10, seq_len=12, d_model=8))
    target.requires_grad_(False)
    torch.manual_seed(0)
    model = ComponentModel(target, [(OUT, 6)], ci_fn_type="mlp", output_positions=positions)  # type: ignore[arg-type]
    with torch.no_grad():
        target_out, cache = model.clean_forward(tokens)
    ci = torch.rand(*tokens.shape, 6, generator=torch.Generator().manual_seed(2))
    return StepInputs(
        model=model,
        batch=tokens,
        target_out=target_out,
        cache=cache,
        ci=CIOutputs(lower={OUT: ci}, upper={OUT: ci}, pre_sigmoid={OUT: ci}),
        output_loss_type="kl",
        use_delta_component=False,
        sampling="continuous",
        n_mask_samples=1,
        noise=Noise(torch.Generator().manual_seed(3)),
    )


@torch.no_grad()
def test_kl_averages_over_every_position_and_sees_a_non_final_one():
    """Masks on the last block's out_proj at position 2 only change the logits at position 2 (no
    later layer mixes positions): the full-sequence KL moves, by KL(position 2) / (batch * seq),
    computed here by hand; the last-position KL does not."""
    b, s, pos = 4, 12, 2
    tokens, _ = InductionTask(10, s).generate_batch(b, torch.Generator().manual_seed(1))
    route = torch.zeros(b, s, dtype=torch.bool)
    route[:, pos] = True
    inp = _ih_step_inputs("all", tokens)
    assert inp.target_out.shape == (b, s, 12)
    out = inp.model.masked_forward(tokens, [{OUT: ModuleMask(mask=inp.ci.lower[OUT], route=route)}])
    assert torch.equal(out[:, :pos], inp.target_out[:, :pos])
    assert torch.equal(out[:, pos + 1 :], inp.target_out[:, pos + 1 :])
    loss = ci_masked_recon_loss(inp, [{OUT: route}])

    # By hand, in float64: the residual with W ctx swapped for (ctx V * ci) U at position `pos`.
    target = inp.model.target
    comps = inp.model.comps(OUT)
    ctx = inp.cache.inputs[OUT][:, pos].double()
    W, V, U = inp.model.target_weight(OUT).double(), comps.get_V().double(), comps.get_U().double()
    resid = target.residual(tokens)[:, pos].double()
    masked_resid = resid - ctx @ W.T + ((ctx @ V) * inp.ci.lower[OUT][:, pos].double()) @ U
    unembed = target.unembed.weight.double()
    logp_target = torch.log_softmax(resid @ unembed.T, -1)
    logp_masked = torch.log_softmax(masked_resid @ unembed.T, -1)
    kl_at_pos = (logp_target.exp() * (logp_target - logp_masked)).sum(-1)  # [batch]
    expected = kl_at_pos.sum() / (b * s)
    assert expected > 1e-3, "the hand-built case must move the loss"
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)

    last = _ih_step_inputs("last", tokens)
    assert last.target_out.shape == (b, 12)
    assert ci_masked_recon_loss(last, [{OUT: route}]).item() == 0.0
    # Routed at the last position instead, both variants see it; the full one divides by seq.
    at_end = torch.zeros(b, s, dtype=torch.bool)
    at_end[:, -1] = True
    full_end = ci_masked_recon_loss(_ih_step_inputs("all", tokens), [{OUT: at_end}])
    last_end = ci_masked_recon_loss(last, [{OUT: at_end}])
    assert last_end > 1e-3
    torch.testing.assert_close(full_end * s, last_end, rtol=1e-5, atol=0)


def test_output_positions_option_reaches_the_component_model():
    base = dict(
        n_mask_samples=1,
        module_info=[{"module_pattern": OUT, "C": 4}],
        ci_fn_type="mlp",
        loss_metric_configs=[{"classname": "StochasticReconLoss", "coeff": 1.0}],
        output_loss_type="kl",
        lr_schedule={"start_val": 1e-3},
        steps=1,
        batch_size=2,
        eval_freq=1,
        n_eval_steps=1,
        pretrained_model_class="spd_ray.targets.ih.InductionTransformer",
        target_model=IHTargetConfig(vocab_size=10, seq_len=12, d_model=8).model_dump(),
    )
    tokens, _ = InductionTask(10, 12).generate_batch(2, torch.Generator().manual_seed(0))
    last = {"task_name": "ih", "output_positions": "last"}
    for task, shape in (({"task_name": "ih"}, (2, 12, 12)), (last, (2, 12))):
        config = Config.model_validate({**base, "task_config": task})
        target = InductionTransformer(config.target_model).requires_grad_(False)  # type: ignore[arg-type]
        assert build_component_model(config, target)(tokens).shape == shape
    assert IHTaskConfig().output_positions == "all"


def _manual_logits(model: InductionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The forward written out by hand for one head: pre-LN attention without positions, pre-LN
    GELU MLP, final LN, unembed."""
    import math

    import torch.nn.functional as F

    x = model.token_embed.weight[tokens]
    for block in model.blocks:
        ln1, ln2 = block.ln1, block.ln2
        h = F.layer_norm(x, x.shape[-1:], ln1.weight, ln1.bias, ln1.eps)
        a = block.attn
        q, k, v = h @ a.q_proj.weight.T, h @ a.k_proj.weight.T, h @ a.v_proj.weight.T
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        s = tokens.shape[1]
        scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), -math.inf)
        x = x + (scores.softmax(-1) @ v) @ a.out_proj.weight.T
        h = F.layer_norm(x, x.shape[-1:], ln2.weight, ln2.bias, ln2.eps)
        up = h @ block.mlp.up.weight.T + block.mlp.up.bias
        x = x + F.gelu(up) @ block.mlp.down.weight.T + block.mlp.down.bias
    f = model.ln_final
    x = F.layer_norm(x, x.shape[-1:], f.weight, f.bias, f.eps)
    return x @ model.unembed.weight.T


def test_mlp_layer_norm_and_no_positions_match_a_hand_written_forward() -> None:
    cfg = IHTargetConfig(
        vocab_size=6,
        seq_len=5,
        d_model=8,
        n_layers=2,
        use_mlp=True,
        d_mlp=12,
        use_layer_norm=True,
        use_positional_encoding=False,
    )
    model = InductionTransformer(cfg)
    with torch.no_grad():  # LayerNorm's affine parameters away from 1 and 0, so they count
        for name, p in model.named_parameters():
            if ".ln" in name or name.startswith("ln_final"):
                p.uniform_(0.5, 1.5)
    tokens = torch.tensor([[0, 3, 5, 1, 3], [0, 2, 2, 6, 4]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens), _manual_logits(model, tokens), rtol=1e-5, atol=1e-5
        )
    # Without positions, one attention layer cannot tell where a token sits: swapping two earlier
    # tokens leaves the last position's logits unchanged (with positions it does not).
    one_layer = cfg.model_copy(update={"n_layers": 1})
    swapped = tokens[:, [0, 2, 1, 3, 4]]
    with torch.no_grad():
        blind = InductionTransformer(one_layer)
        torch.testing.assert_close(
            blind(tokens)[:, -1], blind(swapped)[:, -1], rtol=1e-5, atol=1e-6
        )
        with_positions = one_layer.model_copy(update={"use_positional_encoding": True})
        seeing = InductionTransformer(with_positions)
        assert not torch.allclose(seeing(tokens)[:, -1], seeing(swapped)[:, -1])


def test_target_trainer_lr_schedules_by_hand() -> None:
    import math

    from spd_ray.targets.ih import ih_lr

    base = IHTargetConfig(lr=1e-3, lr_warmup_steps=10, steps=110)
    assert ih_lr(base, 0) == pytest.approx(1e-4)
    assert ih_lr(base, 9) == pytest.approx(1e-3)
    assert ih_lr(base, 109) == pytest.approx(1e-3)
    cos = base.model_copy(update={"lr_schedule": "cosine"})
    lin = base.model_copy(update={"lr_schedule": "linear"})
    # after warmup: progress (step - 10) / 99, reaching 0 at the last step (109)
    for step in (10, 40, 109):
        p = (step - 10) / 99
        assert ih_lr(cos, step) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * p)))
        assert ih_lr(lin, step) == pytest.approx(1e-3 * (1 - p), abs=1e-12)
    assert ih_lr(cos, 5) == ih_lr(lin, 5) == pytest.approx(6e-4)
    assert ih_lr(cos, 109) == pytest.approx(0.0, abs=1e-12)
