"""CE/KL evals against values computed by hand on a tiny hand-built language model.

The model embeds tokens (vocab 3, width 2; not decomposed), applies l1 (2 -> 2, no bias) and a head
(2 -> 3, bias b). Both decomposed layers get V = I and U = W^T, so their component path computes
exactly x W^T and a mask m on the components turns a layer into x diag(m) W^T (+ b).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from spd_ray import config as C
from spd_ray.core.losses import StepInputs
from spd_ray.core.masks import Noise
from spd_ray.core.model import CIOutputs, ComponentModel
from spd_ray.evals import ce_kl as ce_kl_module
from spd_ray.evals.ce_kl import CEandKL, SubsetCEandKL, next_token_ce, subset_modules

EMB = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
W1 = [[0.5, -1.0], [2.0, 1.0]]
W2 = [[1.0, 2.0], [0.0, -1.0], [3.0, 0.0]]
B2 = [0.1, -0.2, 0.3]
TOKENS = [[0, 1, 2], [2, 2, 0]]


class HandLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(3, 2)
        self.l1 = nn.Linear(2, 2, bias=False)
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            self.emb.weight.copy_(torch.tensor(EMB))
            self.l1.weight.copy_(torch.tensor(W1))
            self.head.weight.copy_(torch.tensor(W2))
            self.head.bias.copy_(torch.tensor(B2))
        self.requires_grad_(False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.l1(self.emb(ids)))


def _matvec(w: list[list[float]], x: list[float], m: list[float]) -> list[float]:
    """W diag(m) x: the masked layer by hand."""
    return [sum(w[o][i] * m[i] * x[i] for i in range(len(x))) for o in range(len(w))]


def hand_logits(m1: list[float], m2: list[float]) -> list[list[list[float]]]:
    out = []
    for row in TOKENS:
        seq = []
        for t in row:
            h = _matvec(W1, EMB[t], m1)
            y = _matvec(W2, h, m2)
            seq.append([y[k] + B2[k] for k in range(3)])
        out.append(seq)
    return out


def _log_softmax(z: list[float]) -> list[float]:
    mx = max(z)
    lse = mx + math.log(sum(math.exp(v - mx) for v in z))
    return [v - lse for v in z]


def hand_ce(logits: list[list[list[float]]]) -> float:
    terms = [
        -_log_softmax(logits[b][t])[TOKENS[b][t + 1]]
        for b in range(len(TOKENS))
        for t in range(len(TOKENS[b]) - 1)
    ]
    return sum(terms) / len(terms)


def hand_kl(target: list[list[list[float]]], pred: list[list[list[float]]]) -> float:
    terms = []
    for b in range(len(TOKENS)):
        for t in range(len(TOKENS[b])):
            lq, lp = _log_softmax(target[b][t]), _log_softmax(pred[b][t])
            terms.append(sum(math.exp(q) * (q - p) for q, p in zip(lq, lp, strict=True)))
    return sum(terms) / len(terms)


def make_inputs(ci_l1: list[float], ci_head: list[float], delta: bool = True) -> StepInputs:
    torch.manual_seed(0)
    model = ComponentModel(HandLM(), [("l1", 2), ("head", 2)], ci_fn_type="vector_mlp")
    with torch.no_grad():
        for path in model.module_paths:
            model.comps(path).V.copy_(torch.eye(2))
            model.comps(path).U.copy_(model.target_weight(path).T)
    batch = torch.tensor(TOKENS)
    target_out, cache = model.clean_forward(batch)
    ci = {
        "l1": torch.tensor(ci_l1).expand(2, 3, 2).clone(),
        "head": torch.tensor(ci_head).expand(2, 3, 2).clone(),
    }
    return StepInputs(
        model=model,
        batch=batch,
        target_out=target_out,
        cache=cache,
        ci=CIOutputs(lower=ci, upper=ci, pre_sigmoid=ci),
        output_loss_type="kl",
        use_delta_component=delta,
        sampling="continuous",
        n_mask_samples=1,
        noise=Noise(torch.Generator().manual_seed(0)),
    )


def test_next_token_ce_matches_hand_value():
    logits = hand_logits([1, 1], [1, 1])
    got = next_token_ce(torch.tensor(logits), torch.tensor(TOKENS))
    assert got.item() == pytest.approx(hand_ce(logits), rel=1e-6)


def test_all_ones_ci_recovers_the_target():
    acc = CEandKL(rounding_threshold=0.0)
    acc.update(make_inputs([1.0, 1.0], [1.0, 1.0]))
    out = acc.compute()
    target = hand_logits([1, 1], [1, 1])
    assert out["ce_target"].item() == pytest.approx(hand_ce(target), rel=1e-6)
    for kind in ("ci_masked", "unmasked", "rounded_masked"):
        assert out[f"kl_{kind}"].item() == pytest.approx(0.0, abs=1e-6), kind
        assert out[f"ce_difference_{kind}"].item() == pytest.approx(0.0, abs=1e-6), kind
        assert out[f"ce_unrecovered_{kind}"].item() == pytest.approx(0.0, abs=1e-5), kind
    # CI = 1: the stochastic masks are all ones and, with exact components, the delta is 0.
    assert out["kl_stoch_masked"].item() == pytest.approx(0.0, abs=1e-6)
    zero = hand_logits([0, 0], [0, 0])
    assert out["ce_unrecovered_zero"].item() == pytest.approx(1.0, abs=1e-6)
    assert out["ce_difference_zero"].item() == pytest.approx(
        hand_ce(zero) - hand_ce(target), rel=1e-5
    )
    assert out["kl_zero"].item() == pytest.approx(hand_kl(target, zero), rel=1e-5)


def test_partial_ci_matches_hand_values():
    ci_l1, ci_head = [0.3, 0.8], [0.6, 0.2]
    acc = CEandKL(rounding_threshold=0.5)
    inp = make_inputs(ci_l1, ci_head)
    acc.update(inp)
    acc.update(inp)  # a second identical batch leaves the position-weighted means unchanged
    out = acc.compute()
    target, zero = hand_logits([1, 1], [1, 1]), hand_logits([0, 0], [0, 0])
    ce_t, ce_0 = hand_ce(target), hand_ce(zero)
    for kind, (m1, m2) in {
        "ci_masked": (ci_l1, ci_head),
        "rounded_masked": ([0, 1], [1, 0]),
    }.items():
        pred = hand_logits(m1, m2)
        assert out[f"kl_{kind}"].item() == pytest.approx(hand_kl(target, pred), rel=1e-5)
        ce = hand_ce(pred)
        assert out[f"ce_difference_{kind}"].item() == pytest.approx(ce - ce_t, rel=1e-5)
        assert out[f"ce_unrecovered_{kind}"].item() == pytest.approx(
            (ce - ce_t) / (ce_0 - ce_t), rel=1e-5
        )
    assert out["kl_random_masked"].item() > 0 and math.isfinite(out["kl_stoch_masked"].item())


def test_batches_are_weighted_by_positions():
    """Two batches of different length: the means weight each by its number of positions."""
    a = make_inputs([0.3, 0.8], [0.6, 0.2])
    short = make_inputs([0.3, 0.8], [0.6, 0.2])
    short.batch = short.batch[:, :2]
    short.target_out, short.cache = short.model.clean_forward(short.batch)
    short.ci = CIOutputs(*({k: v[:, :2] for k, v in d.items()} for d in (short.ci.lower,) * 3))
    both, one, two = CEandKL(0.0), CEandKL(0.0), CEandKL(0.0)
    both.update(a)
    both.update(short)
    one.update(a)
    two.update(short)
    o1, o2, ob = one.compute(), two.compute(), both.compute()
    # KL is over all positions (6 and 4), CE over the predicted ones (4 and 2).
    kl = (6 * o1["kl_ci_masked"] + 4 * o2["kl_ci_masked"]) / 10
    assert ob["kl_ci_masked"].item() == pytest.approx(kl.item(), rel=1e-5)
    ce = (4 * o1["ce_difference_ci_masked"] + 2 * o2["ce_difference_ci_masked"]) / 6
    assert ob["ce_difference_ci_masked"].item() == pytest.approx(ce.item(), rel=1e-5)


def test_needs_token_batches():
    inp = make_inputs([1.0, 1.0], [1.0, 1.0])
    inp.batch = inp.batch.float().unsqueeze(-1)
    with pytest.raises(ValueError, match="need \\(batch, seq\\) token batches"):
        CEandKL(0.0).update(inp)


# -- worst subset -----------------------------------------------------------------------------


def test_subset_membership():
    cfg = C.StochasticReconSubsetCEAndKL(
        include_patterns={"head_only": ["head"]}, exclude_patterns={"all_but_head": ["head"]}
    )
    assert subset_modules(["l1", "head"], cfg) == {"head_only": ["head"], "all_but_head": ["l1"]}
    bad = C.StochasticReconSubsetCEAndKL(include_patterns={"none": ["nothing*"]})
    with pytest.raises(ValueError, match="include_patterns.none"):
        subset_modules(["l1", "head"], bad)


def test_subset_metric_matches_hand_values(monkeypatch: pytest.MonkeyPatch):
    # Noise s = 0: the stochastic masks equal the CI, so each subset's output is hand-computable.
    monkeypatch.setattr(ce_kl_module, "stochastic_mask", lambda ci, sampling, noise: ci)
    ci_l1, ci_head = [0.3, 0.8], [0.6, 0.2]
    cfg = C.StochasticReconSubsetCEAndKL(
        include_patterns={"head_only": ["head"]}, exclude_patterns={"all_but_head": ["head"]}
    )
    acc = SubsetCEandKL(cfg, ["l1", "head"])
    acc.update(make_inputs(ci_l1, ci_head, delta=False))
    out = acc.compute()
    target, zero = hand_logits([1, 1], [1, 1]), hand_logits([0, 0], [0, 0])
    ce_t, ce_0 = hand_ce(target), hand_ce(zero)
    expect = {}
    for name, (m1, m2) in {"head_only": ([1, 1], ci_head), "all_but_head": (ci_l1, [1, 1])}.items():
        pred = hand_logits(m1, m2)
        ce = hand_ce(pred)
        expect[name] = {
            "kl": hand_kl(target, pred),
            "ce": ce,
            "ce_unrec": (ce - ce_t) / (ce_0 - ce_t),
        }
        for kind, value in expect[name].items():
            assert out[f"subset/{name}/{kind}"].item() == pytest.approx(value, rel=1e-5), (
                name,
                kind,
            )
    names = list(expect)
    for kind in ("kl", "ce", "ce_unrec"):
        worst = max(names, key=lambda n: expect[n][kind])
        assert out[f"subset_worst/{kind}"].item() == pytest.approx(expect[worst][kind], rel=1e-5)
        assert out[f"subset_worst/{kind}_subset"].item() == names.index(worst)
