"""The viewer's per-prompt computations (spd_ray/app/compute.py) on tiny float64 decompositions:
interventions against the target, the CI-masked predictions against a hand-built masked forward,
the prompt graph against finite differences and against the dataset-attribution accumulator, the
edge cap and filters, and bad inputs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from attributions.attr_models import VOCAB, tiny_llama

from spd_ray.app.compute import (
    Graph,
    _TopEdges,
    attribution_graph,
    intervene,
    output_probs,
    predictions,
    prompt_batch,
    prompt_ci,
)
from spd_ray.attributions.compute import Accumulator, make_layout, unembed_matrix
from spd_ray.attributions.exact import state_means
from spd_ray.core.model import ComponentModel, ModuleMask
from spd_ray.errors import InputError

TOKENS = [5, 12, 33, 7, 41, 2, 19, 8]


@pytest.fixture(scope="module")
def llama_small() -> ComponentModel:
    """One layer, C = 2: a 3-token prompt's whole graph fits under the 5000-edge cap."""
    return tiny_llama(layers=1, C=2)


def split_id(node_id: str) -> tuple[str, int, int]:
    layer, pos, idx = node_id.rsplit(":", 2)
    return layer, int(pos), int(idx)


def ones_masks(model: ComponentModel, pos_shape: tuple[int, ...]) -> dict[str, ModuleMask]:
    return {
        p: ModuleMask(torch.ones(*pos_shape, model.C(p), dtype=torch.float64))
        for p in model.module_paths
    }


def node_value(
    model: ComponentModel,
    kind: str,
    batch: torch.Tensor,
    node: tuple[str, int, int],
    scaled: tuple[str, int, int],
    scale: float,
) -> float:
    """The value of `node` (a subcomponent's act v_c . x, an output logit / feature) in the forward
    with every mask 1 and no weight delta, with the activation of the source node `scaled` (a
    subcomponent, a token embedding, a toy input feature) multiplied by `scale`."""
    pos_shape = tuple(batch.shape[:2]) if kind == "lm" else (1,)
    masks = ones_masks(model, pos_shape)
    s_layer, s_pos, s_idx = scaled
    inp, handle = batch, None
    if s_layer == "wte":
        emb = model.target.get_input_embeddings()

        def hook(_m: object, _a: object, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[0, s_pos] *= scale
            return out

        handle = emb.register_forward_hook(hook)
    elif s_layer == "input":
        inp = batch.clone()
        inp[0, s_idx] *= scale
    else:
        masks[s_layer].mask.view(-1, model.C(s_layer))[s_pos, s_idx] = scale
    record: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            out = model.masked_forward(inp, [masks], record_inputs=record)
    finally:
        if handle is not None:
            handle.remove()
    layer, pos, idx = node
    if layer == "output":
        return float(out.reshape(-1, out.shape[-1])[pos, idx])
    with torch.no_grad():
        acts = model.comps(layer).acts(record[layer])
    return float(acts.reshape(-1, acts.shape[-1])[pos, idx])


def finite_difference(
    model: ComponentModel,
    kind: str,
    batch: torch.Tensor,
    src: tuple[str, int, int],
    tgt: tuple[str, int, int],
    h: float = 1e-5,
) -> float:
    """d target / d (scale of the source activation) at scale 1 = grad x activation."""
    up = node_value(model, kind, batch, tgt, src, 1 + h)
    down = node_value(model, kind, batch, tgt, src, 1 - h)
    return (up - down) / (2 * h)


# -- prompts, CI, predictions --------------------------------------------------------------------


def test_prompt_ci_and_predictions_match_hand_built_forwards(
    llama: ComponentModel, tms: ComponentModel
) -> None:
    """CI equals the model's lower-leaky CI; the target prediction is softmax of the target's
    logits and the CI-masked one the masked forward with masks = CI and no weight delta; for the
    toy model both are raw output vectors."""
    batch = prompt_batch(llama, "lm", tokens=TOKENS)
    assert batch.shape == (1, len(TOKENS)) and batch.dtype == torch.long
    ci = prompt_ci(llama, batch)
    with torch.no_grad():
        ref_ci = llama.causal_importances(batch)
        masks = {p: ModuleMask(mask=c) for p, c in ref_ci.items()}
        ref_masked = llama.masked_forward(batch, [masks])[0].softmax(-1)
        ref_target = llama(batch)[0].softmax(-1)
    assert list(ci) == llama.module_paths
    for p, c in ci.items():
        assert c.shape == (len(TOKENS), llama.C(p)) and c.dtype == torch.float64
        torch.testing.assert_close(c, ref_ci[p][0], rtol=0, atol=0)
    target, masked = predictions(llama, "lm", batch)
    assert target.shape == masked.shape == (len(TOKENS), VOCAB)
    torch.testing.assert_close(target, ref_target, rtol=0, atol=1e-15)
    torch.testing.assert_close(masked, ref_masked, rtol=0, atol=1e-15)
    assert (target - masked).abs().max() > 1e-4  # CI masks are not all ones
    torch.testing.assert_close(target.sum(-1), torch.ones(len(TOKENS), dtype=torch.float64))

    x = prompt_batch(tms, "toy", x=[0.5, 0.0, 0.3, 0.0, 0.9])
    assert x.shape == (1, 5) and x.dtype == torch.float64
    t_ci = prompt_ci(tms, x)
    assert all(c.shape == (1, tms.C(p)) for p, c in t_ci.items())
    t_target, t_masked = predictions(tms, "toy", x)
    with torch.no_grad():
        ref = tms(x)
        t_ref_masked = tms.masked_forward(
            x, [{p: ModuleMask(mask=c) for p, c in tms.causal_importances(x).items()}]
        )
    torch.testing.assert_close(t_target, ref, rtol=0, atol=0)
    torch.testing.assert_close(t_masked, t_ref_masked, rtol=0, atol=0)
    assert (t_target - t_masked).abs().max() > 1e-3


# -- interventions -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_keep_everything_reproduces_target_and_ablating_top_ci_changes_it(
    name: str, request: pytest.FixtureRequest
) -> None:
    model: ComponentModel = request.getfixturevalue(name)
    batch = prompt_batch(model, "lm", tokens=TOKENS)
    S = len(TOKENS)
    every = [(s, p, c) for p in model.module_paths for s in range(S) for c in range(model.C(p))]
    target = output_probs(model, "lm", batch)
    for nodes, mode in ((every, "keep"), ([], "ablate")):
        r = intervene(model, "lm", batch, nodes, mode)  # type: ignore[arg-type]
        assert r.position == S - 1
        torch.testing.assert_close(r.target, target[-1], rtol=0, atol=1e-15)
        assert r.max_abs_diff < 1e-10 and abs(r.kl) < 1e-12 and not r.changed_top1
        r3 = intervene(model, "lm", batch, nodes, mode, position=3)  # type: ignore[arg-type]
        assert r3.position == 3 and r3.max_abs_diff < 1e-10
        torch.testing.assert_close(r3.target, target[3], rtol=0, atol=1e-15)
    # Without the weight delta, keeping everything is the components alone: not the target.
    assert intervene(model, "lm", batch, every, "keep", delta=False).max_abs_diff > 1e-4

    ci = prompt_ci(model, batch)
    top = [(S - 1, p, c) for p, v in ci.items() for c in range(model.C(p)) if v[-1, c] > 0.5]
    assert len(top) >= 3
    ablated = intervene(model, "lm", batch, top, "ablate")
    assert ablated.max_abs_diff > 3e-4 and ablated.kl > 1e-5
    assert ablated.max_abs_diff == pytest.approx(
        float((ablated.target - ablated.intervened).abs().max())
    )
    kl = float((ablated.target * (ablated.target / ablated.intervened).log()).sum())
    assert ablated.kl == pytest.approx(kl, rel=1e-9)
    assert ablated.changed_top1 == bool(ablated.target.argmax() != ablated.intervened.argmax())
    kept = intervene(model, "lm", batch, top, "keep", delta=False)
    assert kept.max_abs_diff > 1e-4


def test_toy_intervention(tms: ComponentModel) -> None:
    x = prompt_batch(tms, "toy", x=[0.5, 0.0, 0.3, 0.0, 0.9])
    every = [(0, p, c) for p in tms.module_paths for c in range(tms.C(p))]
    keep = intervene(tms, "toy", x, every, "keep")
    assert keep.target.shape == (5,) and keep.max_abs_diff < 1e-12 and keep.kl < 1e-24
    ablate_all = intervene(tms, "toy", x, every, "ablate", delta=False)
    # Every mask 0 and no delta: each layer outputs its bias only.
    assert ablate_all.max_abs_diff > 0.05
    assert ablate_all.kl == pytest.approx(
        float((ablate_all.target - ablate_all.intervened).pow(2).mean()), rel=1e-12
    )


# -- the prompt graph ----------------------------------------------------------------------------


def edge_map(graph: Graph) -> dict[tuple[str, str], float]:
    return {(s, t): v for s, t, v in graph.edges}


def test_graph_edges_equal_finite_differences(llama: ComponentModel) -> None:
    """Edges are d target / d (scale of the source's activation) in the all-masks-1 forward, for a
    same-position, a cross-position (through attention), a token-embedding and an output edge;
    node acts are the values of that forward."""
    batch = prompt_batch(llama, "lm", tokens=TOKENS[:5])
    paths = llama.module_paths
    # Every subcomponent alive (the 5000 largest edges returned), and a sparser complete graph.
    dense = attribution_graph(llama, "lm", batch, ci_threshold=-1.0, output_p_min=0.022)
    sparse = attribution_graph(llama, "lm", batch, ci_threshold=0.3, output_p_min=0.022)
    assert dense.n_edges_total > len(dense.edges) == 5000
    assert sparse.n_edges_total == len(sparse.edges) > 500

    def pick(graph: Graph, pred: Callable[..., bool]) -> tuple[Graph, str, str]:
        edges = edge_map(graph)
        found = [k for k in edges if pred(split_id(k[0]), split_id(k[1]))]
        assert found, "no such edge"
        src, tgt = max(found, key=lambda k: abs(edges[k]))
        return graph, src, tgt

    chosen = [
        (dense, *dense.edges[0][:2]),  # the largest
        pick(dense, lambda s, t: s[0] in paths and t[0] in paths and s[1] == t[1]),
        pick(
            dense, lambda s, t: s[0].endswith("v_proj") and t[0].endswith("o_proj") and s[1] < t[1]
        ),
        pick(dense, lambda s, t: s[0] in paths and t[0] in paths and s[1] + 2 <= t[1]),
        pick(sparse, lambda s, t: s[0] == "wte" and t[0] == "output" and s[1] < t[1]),
        pick(sparse, lambda s, t: s[0] in paths and t[0] == "output"),
    ]
    for graph, src, tgt in chosen:
        fd = finite_difference(llama, "lm", batch, split_id(src), split_id(tgt))
        assert edge_map(graph)[(src, tgt)] == pytest.approx(fd, rel=1e-6, abs=1e-9), (src, tgt)
        assert abs(fd) > 1e-4
    # No edge from a later position; q of layer 0 sees only its own position's token.
    for graph in (dense, sparse):
        assert all(split_id(s)[1] <= split_id(t)[1] for s, t, _ in graph.edges)
    q0 = paths[0]
    assert q0.endswith("q_proj")
    into_q0 = [(s, t) for s, t, _ in sparse.edges if t.startswith(q0 + ":")]
    assert into_q0 and all(split_id(s)[1] == split_id(t)[1] for s, t in into_q0)
    assert finite_difference(llama, "lm", batch, ("wte", 1, 12), (q0, 3, 0)) == 0.0
    # Node values: a subcomponent's act and an output logit of the all-masks-1 forward.
    nodes = {n["id"]: n for n in dense.nodes} | {n["id"]: n for n in sparse.nodes}
    for nid in (chosen[2][1], chosen[4][2]):
        assert nodes[nid]["act"] == pytest.approx(
            node_value(llama, "lm", batch, split_id(nid), ("wte", 0, 5), 1.0), rel=1e-12
        )
    assert nodes["wte:2:33"]["layer"] == "wte"  # wte nodes: index = the token id


def test_graph_sums_equal_accumulator(llama_small: ComponentModel) -> None:
    """With every node alive, the graph's edges summed over positions are the dataset-attribution
    accumulator's sums on the same prompt (its means times the number of positions): subcomponent
    and output targets (a token's = W_U column . residual row), token-embedding sources summed by
    token id (the prompt repeats one)."""
    model = llama_small
    tokens = [7, 3, 7]
    batch = prompt_batch(model, "lm", tokens=tokens)
    graph = attribution_graph(model, "lm", batch, ci_threshold=-1.0, output_p_min=0.0)
    assert graph.n_edges_total == len(graph.edges) < 5000
    layout = make_layout(model, "lm", {p: list(range(model.C(p))) for p in model.module_paths})
    acc = Accumulator(model, layout)
    acc.add(batch)
    ref = state_means(acc.state()) * len(tokens)
    n_comp = layout.n_components
    dense = torch.zeros(n_comp + VOCAB, layout.n_sources, dtype=torch.float64)
    for s, t, v in graph.edges:
        (s_layer, _, s_idx), (t_layer, _, t_idx) = split_id(s), split_id(t)
        col = layout.source_span(s_layer)[0] + s_idx  # wte: the token id
        row = n_comp + t_idx if t_layer == "output" else layout.target_span(t_layer)[0] + t_idx
        dense[row, col] += v
    torch.testing.assert_close(dense[:n_comp], ref[:n_comp], rtol=1e-9, atol=1e-10)
    w_u = unembed_matrix(model)
    torch.testing.assert_close(dense[n_comp:], w_u.T @ ref[n_comp:], rtol=1e-9, atol=1e-10)
    assert ref[:n_comp].abs().max() > 0.1 and (dense[:n_comp, 7] != 0).sum() > 5

    # Only same-position edges would not add up: cross-position ones carry weight.
    cross = sum(abs(v) for s, t, v in graph.edges if split_id(s)[1] < split_id(t)[1])
    assert cross > 0.1


def test_graph_cap_thresholds_and_nodes(llama_small: ComponentModel) -> None:
    model = llama_small
    batch = prompt_batch(model, "lm", tokens=[7, 3, 7])
    seen: list[tuple[int, int]] = []
    full = attribution_graph(
        model,
        "lm",
        batch,
        ci_threshold=-1.0,
        output_p_min=0.0,
        progress=lambda d, n: seen.append((d, n)),
        targets_per_backward=3,
    )
    assert full.n_edges_total == len(full.edges) > 1000
    total = seen[-1][1]
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert total == sum(1 for n in full.nodes if n["layer"] != "wte")
    mags = [abs(v) for _, _, v in full.edges]
    assert mags == sorted(mags, reverse=True) and mags[-1] > 0

    # Three targets per backward (as above: the same rounding, so the same exact zeros): the cap
    # is applied across many offers.
    capped = attribution_graph(
        model,
        "lm",
        batch,
        ci_threshold=-1.0,
        output_p_min=0.0,
        max_edges=50,
        targets_per_backward=3,
    )
    assert capped.n_edges_total == full.n_edges_total and len(capped.edges) == 50
    kept = {(s, t) for s, t, _ in capped.edges}
    dropped = [abs(v) for s, t, v in full.edges if (s, t) not in kept]
    assert min(abs(v) for _, _, v in capped.edges) >= max(dropped)
    full_map = edge_map(full)
    assert all(full_map[(s, t)] == pytest.approx(v, rel=1e-12) for s, t, v in capped.edges)

    thr = mags[len(mags) // 3]
    filtered = attribution_graph(
        model, "lm", batch, ci_threshold=-1.0, output_p_min=0.0, edge_threshold=thr
    )
    assert filtered.n_edges_total == sum(m >= thr for m in mags) == len(filtered.edges)
    assert min(abs(v) for _, _, v in filtered.edges) >= thr

    # Node filters: subcomponents with CI > ci_threshold, outputs with p >= output_p_min.
    ci = prompt_ci(model, batch)
    probs = output_probs(model, "lm", batch)
    g = attribution_graph(model, "lm", batch, ci_threshold=0.3, output_p_min=0.021)
    ids = {n["id"] for n in g.nodes}
    want_comps = {f"{p}:{s}:{c}" for p, v in ci.items() for s, c in (v > 0.3).nonzero().tolist()}
    want_out = {f"output:{s}:{t}" for s, t in (probs >= 0.021).nonzero().tolist()}
    assert 0 < len(want_comps) < sum(v.numel() for v in ci.values()) and len(want_out) > 0
    assert ids == want_comps | want_out | {"wte:0:7", "wte:1:3", "wte:2:7"}
    assert all(s in ids and t in ids for s, t, _ in g.edges)
    for n in g.nodes:
        if n["layer"] == "output":
            assert n["p"] == pytest.approx(float(probs[n["position"], n["index"]]), rel=1e-12)
        elif n["layer"] != "wte":
            assert n["ci"] == float(ci[n["layer"]][n["position"], n["index"]])
    assert g.layers == ["wte", *model.module_paths, "output"]


def test_top_edges_keep_the_largest_across_offers() -> None:
    """The running cap keeps exactly the `cap` largest |values| over many offers, counts every
    value with |value| >= threshold, and never counts or keeps a zero."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    values[torch.rand(40, 30, generator=gen) < 0.3] = 0.0
    # Also values within 1% of each other: every offer holds values just above the kept floor.
    close = (1 + 0.01 * torch.rand(40, 30, generator=gen, dtype=torch.float64)) * values.sign()
    for block, cap, threshold in (
        (values, 25, 0.0),
        (values, 100, 0.5),
        (values, 2000, 0.0),
        (close, 25, 0.0),
        (close, 100, 1.005),
    ):
        top = _TopEdges(cap, threshold, torch.device("cpu"), torch.float64)
        for r0 in range(0, 40, 3):
            rows = torch.arange(r0, min(r0 + 3, 40))
            top.offer(block[rows], rows, torch.arange(30))
        a = block.abs().flatten()
        counted = (a >= threshold) & (a > 0)
        assert top.total == int(counted.sum())
        want = a[counted].sort(descending=True).values[:cap]
        t, s, v = top.sorted()
        assert len(v) == min(cap, int(counted.sum()))
        torch.testing.assert_close(torch.tensor(v, dtype=torch.float64).abs(), want, rtol=0, atol=0)
        assert all(block[i, j] == x for i, j, x in zip(t, s, v, strict=True))


def test_toy_graph(tms: ComponentModel) -> None:
    """Toy inputs: one node per nonzero feature; edges equal finite differences."""
    x = prompt_batch(tms, "toy", x=[0.5, 0.0, 0.3, 0.0, 0.9])
    graph = attribution_graph(tms, "toy", x, ci_threshold=-1.0)
    inputs = sorted(n["index"] for n in graph.nodes if n["layer"] == "input")
    assert inputs == [0, 2, 4]
    assert all(n["position"] == 0 for n in graph.nodes)
    y = output_probs(tms, "toy", x)[0]
    outs = sorted(n["index"] for n in graph.nodes if n["layer"] == "output")
    assert outs == [j for j in range(5) if abs(float(y[j])) > 1e-6] and len(outs) >= 2
    edges = edge_map(graph)
    for src, tgt in [graph.edges[0][:2], graph.edges[-1][:2], *list(edges)[::7]]:
        fd = finite_difference(tms, "toy", x, split_id(src), split_id(tgt))
        assert edges[(src, tgt)] == pytest.approx(fd, rel=1e-6, abs=1e-10), (src, tgt)
    layers = {split_id(s)[0] for s, _ in edges} | {split_id(t)[0] for _, t in edges}
    assert {"input", "linear1", "output"} <= layers


# -- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs_name_the_field(llama: ComponentModel, tms: ComponentModel) -> None:
    def raises(field: str, fn: object, *a: object, **kw: object) -> None:
        with pytest.raises(InputError, match=field):
            fn(*a, **kw)  # type: ignore[operator]

    raises(r"^tokens: the prompt is empty", prompt_batch, llama, "lm", tokens=[])
    raises(r"^tokens: the prompt is empty", prompt_batch, llama, "lm")
    raises(
        r"^tokens\[1\]: 50 is not a token id in \[0, 50\)",
        prompt_batch,
        llama,
        "lm",
        tokens=[1, 50],
    )
    raises(r"^tokens\[0\]: -1", prompt_batch, llama, "lm", tokens=[-1])
    raises(r"^tokens\[0\]: True", prompt_batch, llama, "lm", tokens=[True])
    raises(r"^tokens: 33 tokens, at most 32", prompt_batch, llama, "lm", tokens=[1] * 33)
    raises(r"^x: ", prompt_batch, llama, "lm", tokens=[1], x=[0.5])
    raises(r"^x: 4 values, the model takes 5", prompt_batch, tms, "toy", x=[0.1] * 4)
    raises(r"^x: the input vector is empty", prompt_batch, tms, "toy", x=[])
    raises(r"^x\[2\]: nan", prompt_batch, tms, "toy", x=[0.1, 0.1, float("nan"), 0, 0])
    raises(r"^x\[0\]: inf", prompt_batch, tms, "toy", x=[float("inf"), 0, 0, 0, 0])
    raises(r"^tokens: ", prompt_batch, tms, "toy", tokens=[1])
    assert prompt_batch(llama, "lm", tokens=[0, 49] * 16).shape == (1, 32)

    batch = prompt_batch(llama, "lm", tokens=TOKENS)
    q0 = llama.module_paths[0]
    raises(
        r"^nodes\[1\]: unknown module 'nope'",
        intervene,
        llama,
        "lm",
        batch,
        [(0, q0, 0), (0, "nope", 0)],
        "keep",
    )
    raises(
        r"^nodes\[0\]: index 3 of .* not in \[0, 3\)",
        intervene,
        llama,
        "lm",
        batch,
        [(0, q0, 3)],
        "keep",
    )
    raises(
        r"^nodes\[0\]: position 8 is not in \[0, 8\)",
        intervene,
        llama,
        "lm",
        batch,
        [(8, q0, 0)],
        "ablate",
    )
    raises(
        r"^position: 8 is not in \[0, 8\)", intervene, llama, "lm", batch, [], "keep", position=8
    )
    raises(r"^position: -1", intervene, llama, "lm", batch, [], "keep", position=-1)
    raises(r"^mode: 'drop'", intervene, llama, "lm", batch, [], "drop")
    raises(r"^masks: no mask for module", output_probs, llama, "lm", batch, masks={})
    for kw, field in [
        ({"max_edges": 0}, "max_edges: 0"),
        ({"max_edges": 5001}, "max_edges: 5001"),
        ({"edge_threshold": -1.0}, "edge_threshold: -1.0"),
        ({"output_p_min": 1.5}, "output_p_min: 1.5"),
        ({"ci_threshold": float("nan")}, "ci_threshold: nan"),
    ]:
        raises(f"^{field}", attribution_graph, llama, "lm", batch, **kw)


def test_graph_counts_by_position(llama: ComponentModel) -> None:
    """The position ranges (prefix forwards) give the same graph as one full forward."""
    batch = prompt_batch(llama, "lm", tokens=TOKENS)
    kw = {"ci_threshold": 0.2, "output_p_min": 0.03, "edge_threshold": 1e-9}
    one = attribution_graph(llama, "lm", batch, position_groups=1, targets_per_backward=7, **kw)
    many = attribution_graph(llama, "lm", batch, position_groups=5, **kw)
    assert one.n_edges_total == many.n_edges_total > 1000
    a, b = edge_map(one), edge_map(many)
    assert set(a) == set(b)
    assert max(abs(a[k] - b[k]) for k in a) < 1e-12
    by_pos: dict[int, int] = defaultdict(int)
    for _, t in a:
        by_pos[split_id(t)[1]] += 1
    assert len(by_pos) == len(TOKENS)
    acts = [(n["act"], m["act"]) for n, m in zip(one.nodes, many.nodes, strict=True)]
    assert all(x == y or abs(x - y) < 1e-12 for x, y in acts)
