"""`<run>/attributions/`: written whole or shard by shard, read back memory-mapped; the queries,
and output-token attributions through the stored residual and the unembedding against direct
logit attributions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from attr_models import VOCAB, brute_force

from spd_ray.attributions.compute import (
    Accumulator,
    make_layout,
    unembed_matrix,
)
from spd_ray.attributions.exact import (
    state_means,
)
from spd_ray.attributions.layout import (
    OUTPUT,
    Layout,
)
from spd_ray.attributions.store import (
    Attributions,
    attributions_dir,
    create_matrix,
    finish,
    save_attributions,
    write_state,
    write_unembed,
)
from spd_ray.core.model import ComponentModel
from spd_ray.errors import InputError, NotFoundError


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")  # what makes a folder a run
    return run


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randint(0, VOCAB, (2, 6), generator=g), torch.tensor([6, 4])),
        (torch.randint(0, VOCAB, (3, 6), generator=g), torch.tensor([2, 6, 6])),
    ]


@pytest.fixture(scope="module")
def llama_attr(llama: ComponentModel) -> tuple[Layout, Accumulator]:
    torch.set_num_threads(1)
    alive = {p: list(range(llama.C(p))) for p in llama.module_paths}
    alive[llama.module_paths[2]] = [0, 2]  # one dead subcomponent
    layout = make_layout(llama, "lm", alive)
    acc = Accumulator(llama, layout, targets_per_backward=8)
    for batch, n_valid in _batches():
        acc.add(batch, n_valid)
    return layout, acc


def test_output_tokens_through_the_unembedding_equal_direct_logit_attributions(
    llama: ComponentModel, llama_attr: tuple[Layout, Accumulator], tmp_path: Path
) -> None:
    layout, acc = llama_attr
    run = _run_dir(tmp_path)
    save_attributions(run, layout, acc.state(), unembed_matrix(llama), {}, dtype=np.float64)
    store = Attributions(run)
    T = acc.n_tokens
    assert T == 6 + 4 + 2 + 6 + 6 and store.n_tokens == T

    tokens = [0, 7, 31, 49]
    direct: dict[tuple[str, str], torch.Tensor] = {}
    for batch, n_valid in _batches():
        valid = torch.arange(6)[None, :] < n_valid[:, None]
        part, _ = brute_force(llama, "lm", batch, valid, logits_of=tokens)
        for key, m in part.items():
            direct[key] = direct.get(key, 0) + m
    for j, t in enumerate(tokens):
        row = store.target_row(f"{OUTPUT}:{t}")
        want = torch.zeros(layout.n_sources, dtype=torch.float64)
        for (tgt, src), m in direct.items():
            if tgt != OUTPUT:
                continue
            c0, c1 = layout.source_span(src)
            want[c0:c1] = m[j] if src == "wte" else m[j, layout.alive[src]]
        np.testing.assert_allclose(row, want.numpy() / T, rtol=1e-6, atol=1e-14)
        assert np.abs(want.numpy()).max() > 1e-3
        # between() and top_targets() agree with the row.
        assert store.between("wte:3", f"output:{t}") == pytest.approx(row[3], rel=1e-12)


def test_queries_match_the_matrix(llama_attr: tuple[Layout, Accumulator], tmp_path: Path) -> None:
    layout, acc = llama_attr
    llama_w = np.random.default_rng(0).normal(size=(layout.n_outputs, VOCAB))
    run = _run_dir(tmp_path)
    save_attributions(run, layout, acc.state(), torch.tensor(llama_w), {"note": "x"})
    store = Attributions(run)
    assert store.meta["note"] == "x" and store.meta["dtype"] == "float32"
    dense = state_means(acc.state()).numpy()
    np.testing.assert_array_equal(store.attr, dense.astype(np.float32))
    keys = layout.component_keys()
    sources = [f"wte:{i}" for i in range(VOCAB)] + keys

    target = "model.layers.1.mlp.down_proj:1"
    row = dense[keys.index(target)].astype(np.float32).astype(np.float64)
    top = store.top_sources(target, k=5)
    order = np.argsort(-row)[:5]
    assert [a.key for a in top] == [sources[i] for i in order]
    assert [a.value for a in top] == pytest.approx(row[order].tolist())
    neg = store.top_sources(target, k=1000, sign="negative")
    assert len(neg) == int((row < 0).sum()) and all(a.value < 0 for a in neg)
    assert [a.value for a in neg] == sorted(a.value for a in neg)

    source = "model.layers.0.self_attn.v_proj:2"
    s = layout.n_inputs + keys.index(source)
    col = dense[:, s].astype(np.float32).astype(np.float64)
    out_tokens = col[layout.n_components :] @ llama_w
    comp = store.top_targets(source, k=3, targets="components")
    assert [a.key for a in comp] == [keys[i] for i in np.argsort(-col[: layout.n_components])[:3]]
    outs = store.top_targets(source, k=4, sign="negative", targets="output")
    assert [a.key for a in outs] == [f"output:{t}" for t in np.argsort(out_tokens)[:4]]
    assert [a.value for a in outs] == pytest.approx(np.sort(out_tokens)[:4].tolist())
    both = store.top_targets(source, k=1000)
    assert len(both) == int((col[: layout.n_components] > 0).sum() + (out_tokens > 0).sum())
    assert store.between(source, target) == pytest.approx(dense[keys.index(target), s], rel=1e-6)
    out_rows = dense[layout.n_components :].astype(np.float32).astype(np.float64)
    assert store.between("wte:4", "output:9") == pytest.approx(out_rows[:, 4] @ llama_w[:, 9])

    # A later subcomponent never feeds an earlier one: exactly zero, and left out of the top.
    late, early = "model.layers.1.mlp.up_proj:0", "model.layers.0.mlp.up_proj:0"
    assert store.between(late, early) == 0.0
    assert late not in [a.key for a in store.top_sources(early, k=1000)]

    dead = "model.layers.0.self_attn.v_proj:1"  # left out of the layout above
    for call, match in [
        (lambda: store.top_targets(dead), "not among"),
        (lambda: store.top_sources(dead), "not among"),
        (lambda: store.top_targets("nope.module:0"), "no layer"),
        (lambda: store.top_targets("wte:50"), "0..49"),
        (lambda: store.top_targets("output:3"), "is a target"),
        (lambda: store.top_sources("output:50"), "0..49"),
    ]:
        with pytest.raises(InputError, match=match):
            call()
    with pytest.raises(InputError, match="is a source"):
        store.top_sources("wte:1")
    with pytest.raises(InputError, match="sign"):
        store.top_sources(target, sign="both")  # type: ignore[arg-type]


def test_sharded_write_equals_whole_and_missing_is_an_error(
    llama: ComponentModel, llama_attr: tuple[Layout, Accumulator], tmp_path: Path
) -> None:
    layout, acc = llama_attr
    whole_run, shard_run = _run_dir(tmp_path / "a"), _run_dir(tmp_path / "b")
    save_attributions(whole_run, layout, acc.state(), unembed_matrix(llama), {})
    folder = attributions_dir(shard_run)
    folder.mkdir()
    create_matrix(folder, layout)
    cuts = [0, 5, 40, layout.n_targets]
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        write_state(folder, acc.state(lo, hi))
    write_unembed(folder, unembed_matrix(llama))
    finish(folder, layout, acc.n_tokens, acc.n_batches, {})
    a, b = Attributions(whole_run), Attributions(shard_run)
    np.testing.assert_array_equal(a.attr, b.attr)
    np.testing.assert_array_equal(a.unembed, b.unembed)
    assert a.meta == b.meta
    assert isinstance(b.attr, np.memmap)

    with pytest.raises(NotFoundError, match="no attributions"):
        Attributions(_run_dir(tmp_path / "c"))


def test_toy_output_features_are_stored_directly(tms: ComponentModel, tmp_path: Path) -> None:
    alive = {p: list(range(tms.C(p))) for p in tms.module_paths}
    layout = make_layout(tms, "toy", alive)
    acc = Accumulator(tms, layout)
    acc.add(torch.rand(16, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    run = _run_dir(tmp_path)
    save_attributions(run, layout, acc.state(), None, {}, dtype=np.float64)
    store = Attributions(run)
    dense = state_means(acc.state()).numpy()
    o0 = layout.n_components
    np.testing.assert_array_equal(store.target_row("output:2"), dense[o0 + 2])
    assert store.between("input:3", "output:2") == dense[o0 + 2, 3]
    top = store.top_targets("input:1", k=1, targets="output")
    assert top[0].key == f"output:{int(np.argmax(dense[o0:, 1]))}"
    with pytest.raises(InputError, match="0..4"):
        store.top_sources("output:5")
