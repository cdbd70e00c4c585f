"""The viewer's HTTP side: a FastAPI app over the runs it was given (`create_app`), JSON endpoints
under `/api` (documented at `/docs`, schema at `/openapi.json`) and the static frontend at `/`.

Every file it reads is inside a given run directory: runs are addressed by id, never by path, and
a figure path is resolved and checked to stay inside the run's figures folder. With an access
token (`spd-ray app --host` other than loopback), every request must carry it (`?token=`, the
`X-SPD-Ray-Token` header, or the cookie set when a page is opened with a valid `?token=`): else
403. Model computations run one at a time per run (the model is shared); long ones stream
progress as server-sent events.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from spd_ray.app.state import DEFAULT_PROMPTS, AppRun, Missing, label_text, open_runs
from spd_ray.errors import InputError, NotFoundError

STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "spd_ray_token"
TOKEN_HEADER = "X-SPD-Ray-Token"
MAX_FIRING_PER_POSITION = 1000
SORTS = ("density", "mean_ci", "score", "index")


# -- request bodies ------------------------------------------------------------------------------


class PromptBody(BaseModel):
    """A prompt: text or token ids (language models) or an input vector (toy models)."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    tokens: list[int] | None = None
    x: list[float] | None = None
    ci_threshold: float = 0.0
    top_k: int = Field(5, ge=1, le=100)


class GraphBody(PromptBody):
    edge_threshold: float = Field(0.0, ge=0.0)
    max_edges: int = Field(5000, ge=1, le=5000)
    output_p_min: float = Field(0.01, ge=0.0, le=1.0)


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid")
    position: int
    key: str


class InterveneBody(PromptBody):
    mode: Literal["keep", "ablate"]
    nodes: list[Node] = Field(default_factory=list)
    components: list[str] = Field(default_factory=list)  # at every position
    position: int | None = None
    delta: bool = True
    top_k: int = Field(10, ge=1, le=100)


# -- helpers -------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return f if np.isfinite(f) else None


def _split_key(run: AppRun, key: str) -> tuple[str, int]:
    module, sep, idx = key.rpartition(":")
    paths = list(run.loaded.model.module_paths)
    if not sep or module not in paths:
        raise InputError(f"component key {key!r}: no module {module!r}; modules: {paths}")
    C = run.loaded.model.C(module)
    if not idx.isdigit() or not 0 <= int(idx) < C:
        raise InputError(f"component key {key!r}: the index must be in 0..{C - 1}")
    return module, int(idx)


class _Components:
    """The harvest's component table as rows, with labels, scores and clusters joined."""

    def __init__(self, run: AppRun):
        h = run.harvest()
        labels = run.labels()
        mapping = run.cluster_mapping()
        clusters = mapping["clusters"] if mapping else {}
        self.rows: list[dict[str, Any]] = []
        for r in h.components.to_pylist():
            key = r["key"]
            lab = labels.labels.get(key) if labels else None
            self.rows.append(
                {
                    "key": key,
                    "module": r["module"],
                    "index": int(key.rpartition(":")[2]),
                    "firing_density": _num(r["firing_density"]),
                    "mean_ci": _num(r["mean_ci"]),
                    "firing_count": int(r["firing_count"]),
                    "label": lab.get("label") if lab else None,
                    "confidence": lab.get("confidence") if lab else None,
                    "score": labels.score(key) if labels else None,
                    "cluster": clusters.get(key),
                }
            )
        self.modules = [{"path": m["path"], "C": m["C"]} for m in h.meta["modules"]]


def _ranked(run: AppRun, r: Any) -> list[dict[str, Any]]:
    return [
        {
            "id": int(i),
            "text": run.token_text(int(i)),
            "value": _num(v),
            "count": _num(c),
        }
        for i, v, c in zip(r.index, r.value, r.count, strict=True)
    ]


def _sse(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


# -- the app -------------------------------------------------------------------------------------


def create_app(
    run_paths: list[str | Path],
    token: str | None = None,
    device: str = "cpu",
    out: str | Path | None = None,
) -> FastAPI:
    runs = open_runs(run_paths, device, out)  # every run checked before the app exists
    app = FastAPI(
        title="spd-ray viewer",
        description="Browse a decomposition: runs, components, examples, labels, prompts, "
        "attribution graphs and interventions.",
    )
    app.state.runs = runs
    app.state.token = token
    component_tables: dict[str, tuple[int, _Components]] = {}

    @app.middleware("http")
    async def require_token(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if token is None:
            return await call_next(request)  # type: ignore[no-any-return]
        given = (
            request.query_params.get("token")
            or request.headers.get(TOKEN_HEADER)
            or request.cookies.get(TOKEN_COOKIE)
        )
        if given is None or not secrets.compare_digest(given, token):
            return JSONResponse({"detail": "a valid access token is required"}, status_code=403)
        response: Response = await call_next(request)
        if request.query_params.get("token") == token:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(Missing)
    async def missing(_: Request, err: Missing) -> JSONResponse:
        return JSONResponse(
            {"detail": str(err), "missing": err.what, "command": err.command}, status_code=404
        )

    @app.exception_handler(NotFoundError)
    async def not_found(_: Request, err: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=404)

    @app.exception_handler(InputError)
    async def bad_input(_: Request, err: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    def get_run(rid: str) -> AppRun:
        if rid not in runs:
            raise NotFoundError(f"no run {rid!r}; runs: {sorted(runs)}")
        return runs[rid]

    def components_of(run: AppRun) -> _Components:
        h = run.harvest()
        labels, mapping = run.labels(), run.cluster_mapping()
        stamp = hash((id(h), id(labels), id(mapping)))
        hit = component_tables.get(run.id)
        if hit is None or hit[0] != stamp:
            hit = (stamp, _Components(run))
            component_tables[run.id] = hit
        return hit[1]

    # -- runs ------------------------------------------------------------------------------------

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/api/runs")
    def list_runs() -> list[dict[str, Any]]:
        return [
            {
                "id": r.id,
                "name": r.path.name,
                "path": str(r.path),
                "kind": r.kind,
                "step": _last_step(r.metrics()),
            }
            for r in runs.values()
        ]

    @app.get("/api/runs/{rid}")
    def run_overview(rid: str) -> dict[str, Any]:
        run = get_run(rid)
        metrics = run.metrics()
        keys = _metric_keys(metrics)
        paths_and_C = run.modules()
        modules = [{"path": p, "C": c} for p, c in paths_and_C]
        return {
            "id": run.id,
            "name": run.path.name,
            "path": str(run.path),
            "kind": run.kind,
            "step": _last_step(metrics),
            "steps": run.config.steps,
            "finished": run.rundir.finished(),
            "config": run.config.model_dump(mode="json"),
            "modules": modules,
            "ci_l0": _ci_l0(metrics, [p for p, _ in paths_and_C]),
            "figures": run.figures(),
            "analyses": _analyses(run),
            "metric_keys": keys,
            # toy runs: the length of a prompt's input vector
            "n_inputs": run.n_inputs() if run.kind == "toy" else None,
        }

    @app.get("/api/runs/{rid}/metrics")
    def metrics(rid: str, keys: str | None = None) -> dict[str, Any]:
        run = get_run(rid)
        rows = run.metrics()
        all_keys = _metric_keys(rows)
        if keys:
            wanted = [k for k in keys.split(",") if k]
            unknown = [k for k in wanted if k not in all_keys]
            if unknown:
                raise NotFoundError(f"no metric {unknown[0]!r} in run {rid}")
        else:
            wanted = [k for k in all_keys if "loss" in k][:4] or all_keys[:4]
        series = {
            k: [[row["step"], float(row[k])] for row in rows if _is_number(row.get(k))]
            for k in wanted
        }
        return {"keys": all_keys, "series": series}

    @app.get("/api/runs/{rid}/figures/{rel:path}")
    def figure(rid: str, rel: str) -> FileResponse:
        return FileResponse(get_run(rid).figure_path(rel))

    # -- components ------------------------------------------------------------------------------

    @app.get("/api/runs/{rid}/components")
    def components(
        rid: str,
        module: str | None = None,
        sort: str = "density",
        q: str | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(50, ge=1, le=1000),
    ) -> dict[str, Any]:
        run = get_run(rid)
        if sort not in SORTS:
            raise InputError(f"sort must be one of {list(SORTS)}, got {sort!r}")
        table = components_of(run)
        rows = table.rows
        if module:
            if module not in {m["path"] for m in table.modules}:
                raise NotFoundError(f"no module {module!r} in run {rid}")
            rows = [r for r in rows if r["module"] == module]
        if q:
            needle = q.lower()
            rows = [
                r
                for r in rows
                if needle in r["key"].lower() or needle in (r["label"] or "").lower()
            ]
        if sort == "density":
            rows = sorted(rows, key=lambda r: -(r["firing_density"] or 0.0))
        elif sort == "mean_ci":
            rows = sorted(rows, key=lambda r: -(r["mean_ci"] or 0.0))
        elif sort == "score":
            rows = sorted(rows, key=lambda r: (r["score"] is None, -(r["score"] or 0.0)))
        return {
            "total": len(rows),
            "modules": table.modules,
            "items": rows[offset : offset + limit],
        }

    @app.get("/api/runs/{rid}/components/{key}")
    def component(rid: str, key: str) -> dict[str, Any]:
        run = get_run(rid)
        h = run.harvest()
        i = _component_index(h, key)
        row = h.summary(i)
        labels = run.labels()
        lab = labels.labels.get(key) if labels else None
        corr = h.correlated(i, "pmi", 10)
        attributions = None
        attr = run.attributions()
        if attr is not None and key in attr.keys:
            attributions = {
                "sources": [{"key": a.key, "value": a.value} for a in attr.top_sources(key, k=10)],
                "targets": [{"key": a.key, "value": a.value} for a in attr.top_targets(key, k=10)],
            }
        cluster = None
        mapping = run.cluster_mapping()
        if mapping and mapping["clusters"].get(key) is not None:
            gid = mapping["clusters"][key]
            members = [k for k, g in mapping["clusters"].items() if g == gid]
            cluster = {"clustering": mapping["clustering"], "id": gid, "members": members}
        return {
            "key": key,
            "module": row["module"],
            "index": int(key.rpartition(":")[2]),
            "firing_density": _num(row["firing_density"]),
            "mean_ci": _num(row["mean_ci"]),
            "firing_count": int(row["firing_count"]),
            "label": (
                {
                    "label": lab.get("label"),
                    "confidence": lab.get("confidence"),
                    "reasoning": lab.get("reasoning"),
                    "model": labels.model if labels else None,
                }
                if lab
                else None
            ),
            "scores": labels.scores.get(key, {}) if labels else {},
            "input_tokens": _ranked(run, h.tokens(i, "input", "precision", 10)),
            "output_tokens": (
                _ranked(run, h.tokens(i, "output", "precision", 10)) if h.kind == "lm" else []
            ),
            "correlated": [
                {
                    "key": h.keys[int(j)],
                    "value": _num(v),
                    "label": label_text(labels, h.keys[int(j)]),
                }
                for j, v in zip(corr.index, corr.value, strict=True)
            ],
            "attributions": attributions,
            "cluster": cluster,
        }

    @app.get("/api/runs/{rid}/components/{key}/examples")
    def examples(
        rid: str,
        key: str,
        kind: Literal["top", "reservoir"] | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(20, ge=1, le=500),
    ) -> dict[str, Any]:
        run = get_run(rid)
        h = run.harvest()
        i = _component_index(h, key)
        found = h.examples(i, kind)
        items = []
        for e in found[offset : offset + limit]:
            item: dict[str, Any] = {
                "kind": e.kind,
                "rank": e.rank,
                "doc": e.doc,
                "offset": e.offset,
                "center": e.center,
                "tokens": None,
                "ci": e.ci,
                "act": e.act,
                "x": e.x,
            }
            if e.tokens is not None:  # drop the positions outside the document
                keep = [j for j, t in enumerate(e.tokens) if t >= 0]
                item["tokens"] = [
                    {"id": e.tokens[j], "text": run.token_text(e.tokens[j])} for j in keep
                ]
                item["ci"] = [e.ci[j] for j in keep] if isinstance(e.ci, list) else e.ci
                item["act"] = [e.act[j] for j in keep] if isinstance(e.act, list) else e.act
                item["center"] = keep.index(e.center) if e.center in keep else 0
            items.append(item)
        return {"total": len(found), "items": items}

    # -- prompts ---------------------------------------------------------------------------------

    @app.get("/api/runs/{rid}/prompts")
    def prompts(rid: str) -> dict[str, Any]:
        run = get_run(rid)
        if run.kind != "lm":
            return {"prompts": []}
        return {"prompts": _example_prompts(run)}

    def _batch(run: AppRun, body: PromptBody) -> torch.Tensor:
        from spd_ray.app import compute

        given = [f for f in ("text", "tokens", "x") if getattr(body, f) is not None]
        if len(given) != 1:
            raise InputError("give exactly one of text, tokens (language models) or x (toy models)")
        tokens = body.tokens
        if body.text is not None:
            if run.kind != "lm" or run.tokenizer is None:
                raise InputError("text prompts need a language-model run with a tokenizer")
            if not body.text:
                raise InputError("text is empty")
            tokens = list(run.tokenizer(body.text, add_special_tokens=False)["input_ids"])
        return compute.prompt_batch(run.loaded.model, run.prompt_kind(), tokens=tokens, x=body.x)

    def _token_list(run: AppRun, batch: torch.Tensor) -> list[dict[str, Any]]:
        if run.kind == "lm":
            return [{"id": int(t), "text": run.token_text(int(t))} for t in batch[0].tolist()]
        return [
            {"id": i, "text": f"x[{i}]={v:.3g}"} for i, v in enumerate(batch[0].tolist()) if v != 0
        ]

    def _top(run: AppRun, probs: torch.Tensor, k: int) -> list[dict[str, Any]]:
        p = probs.detach().float().cpu()
        if run.kind == "lm":
            vals, idx = p.topk(min(k, p.numel()))
            return [
                {"id": int(i), "text": run.token_text(int(i)), "p": float(v)}
                for v, i in zip(vals.tolist(), idx.tolist(), strict=True)
            ]
        order = p.abs().argsort(descending=True)[:k]
        return [{"id": int(j), "text": f"y[{int(j)}]", "p": float(p[j])} for j in order.tolist()]

    @app.post("/api/runs/{rid}/prompt")
    def prompt(rid: str, body: PromptBody) -> dict[str, Any]:
        from spd_ray.app import compute

        run = get_run(rid)
        with run.lock:
            batch = _batch(run, body)
            model = run.loaded.model
            ci = compute.prompt_ci(model, batch)
            target, masked = compute.predictions(model, run.prompt_kind(), batch)
        labels = run.labels()
        S = next(iter(ci.values())).shape[0]
        firing: list[list[dict[str, Any]]] = [[] for _ in range(S)]
        for path, values in ci.items():
            pos, comp = torch.nonzero(values > body.ci_threshold, as_tuple=True)
            for s, c in zip(pos.tolist(), comp.tolist(), strict=True):
                key = f"{path}:{c}"
                firing[s].append(
                    {
                        "key": key,
                        "module": path,
                        "index": c,
                        "ci": float(values[s, c]),
                        "label": label_text(labels, key),
                    }
                )
        for f in firing:
            f.sort(key=lambda e: -e["ci"])
            del f[MAX_FIRING_PER_POSITION:]
        return {
            "kind": run.kind,
            "tokens": _token_list(run, batch),
            "modules": [{"path": p, "C": model.C(p)} for p in model.module_paths],
            "firing": firing,
            "predictions": {
                "target": [_top(run, target[s], body.top_k) for s in range(target.shape[0])],
                "masked": [_top(run, masked[s], body.top_k) for s in range(masked.shape[0])],
            },
        }

    def _graph_json(
        run: AppRun,
        body: GraphBody,
        batch: torch.Tensor,
        progress: Callable[[int, int], None] | None,
    ) -> dict[str, Any]:
        from spd_ray.app import compute

        with run.lock:
            g = compute.attribution_graph(
                run.loaded.model,
                run.prompt_kind(),
                batch,
                ci_threshold=body.ci_threshold,
                output_p_min=body.output_p_min,
                edge_threshold=body.edge_threshold,
                max_edges=body.max_edges,
                progress=progress,
            )
        labels = run.labels()
        tokens = batch[0].tolist()
        nodes = []
        for n in g.nodes:
            layer, pos, idx = n["layer"], int(n["position"]), int(n["index"])
            node = {**n}
            if layer in ("wte", "input"):
                node["key"] = None
                node["text"] = run.token_text(int(tokens[pos])) if run.kind == "lm" else f"x[{idx}]"
            elif layer == "output":
                node["key"] = None
                node["text"] = run.token_text(idx) if run.kind == "lm" else f"y[{idx}]"
            else:
                key = f"{layer}:{idx}"
                node["key"] = key
                node["text"] = key
                node["label"] = label_text(labels, key)
            node.setdefault("label", None)
            nodes.append(node)
        return {
            "nodes": nodes,
            "edges": [{"source": s, "target": t, "value": float(v)} for s, t, v in g.edges],
            "layers": list(g.layers),
            "n_edges_total": int(g.n_edges_total),
            "tokens": _token_list(run, batch),
        }

    @app.post("/api/runs/{rid}/graph")
    def graph(rid: str, body: GraphBody) -> dict[str, Any]:
        run = get_run(rid)
        with run.lock:
            batch = _batch(run, body)
        return _graph_json(run, body, batch, None)

    @app.post("/api/runs/{rid}/graph/stream")
    def graph_stream(rid: str, body: GraphBody) -> StreamingResponse:
        run = get_run(rid)
        with run.lock:
            batch = _batch(run, body)  # bad input answers 422 before the stream starts
        events: queue.Queue[str | None] = queue.Queue()

        def work() -> None:
            try:
                result = _graph_json(
                    run,
                    body,
                    batch,
                    lambda d, t: events.put(_sse("progress", {"done": d, "total": t})),
                )
                events.put(_sse("result", result))
            except (InputError, NotFoundError) as err:
                events.put(_sse("error", {"detail": str(err)}))
            except Exception as err:  # the client must hear of it; the traceback goes to the log
                events.put(
                    _sse("error", {"detail": f"internal error: {type(err).__name__}: {err}"})
                )
                raise
            finally:
                events.put(None)

        threading.Thread(target=work, daemon=True).start()

        def stream() -> Iterator[str]:
            while (item := events.get()) is not None:
                yield item

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/api/runs/{rid}/intervene")
    def intervene(rid: str, body: InterveneBody) -> dict[str, Any]:
        from spd_ray.app import compute

        run = get_run(rid)
        with run.lock:
            batch = _batch(run, body)
            S = batch.shape[1] if run.kind == "lm" else 1
            chosen: list[tuple[int, str, int]] = []
            for n in body.nodes:  # intervene checks the positions
                chosen.append((n.position, *_split_key(run, n.key)))
            for key in body.components:
                module, idx = _split_key(run, key)
                chosen.extend((s, module, idx) for s in range(S))
            res = compute.intervene(
                run.loaded.model,
                run.prompt_kind(),
                batch,
                chosen,
                body.mode,
                delta=body.delta,
                position=body.position,
            )
        return {
            "position": int(res.position),
            "target": _top(run, res.target, body.top_k),
            "intervened": _top(run, res.intervened, body.top_k),
            "max_abs_diff": float(res.max_abs_diff),
            "kl": float(res.kl),
            "changed_top1": bool(res.changed_top1),
        }

    # -- the frontend ----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name:path}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        root = STATIC.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise NotFoundError(f"no static file {name!r}")
        return FileResponse(path)

    return app


def _metric_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Every key with a finite numeric value in some metrics row, but the step."""
    return sorted({k for row in rows for k, v in row.items() if _is_number(v)} - {"step"})


def _last_step(rows: list[dict[str, Any]]) -> int:
    return int(rows[-1]["step"]) if rows else 0


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)


def _component_index(h: Any, key: str) -> int:
    """A component's row in the harvest; an unknown key is not found (404), naming it."""
    try:
        return int(h.index(key))
    except InputError as err:
        raise NotFoundError(str(err)) from None


def _ci_l0(metrics: list[dict[str, Any]], paths: list[str]) -> dict[str, float]:
    """The latest CI-L0 per module (eval values preferred over train ones)."""
    found: dict[str, tuple[int, int, float]] = {}
    for row in metrics:
        for k, v in row.items():
            head, sep, path = k.partition("/l0/")
            if sep and path in paths and _is_number(v):
                rank = (int(row.get("step", 0)), int(head.startswith("eval")))
                if path not in found or rank >= found[path][:2]:
                    found[path] = (*rank, float(v))
    return {p: found[p][2] for p in paths if p in found}


def _analyses(run: AppRun) -> dict[str, Any]:
    path = run.path
    out: dict[str, Any] = {}
    try:
        h = run.harvest()
        out["harvest"] = {"present": True, "info": {"n_tokens": h.n_tokens, "kind": h.kind}}
    except Missing:
        out["harvest"] = {"present": False, "info": {}}
    out["harvest"]["command"] = f"spd-ray harvest {path}"
    labels = run.labels()
    out["labels"] = {
        "present": labels is not None,
        "command": f"spd-ray autointerp {path} --base-url URL --model MODEL",
        "info": (
            {"model": labels.model, "n_labels": len(labels.labels), "n_scored": len(labels.scores)}
            if labels
            else {}
        ),
    }
    attr = run.attributions()
    out["attributions"] = {
        "present": attr is not None,
        "command": f"spd-ray attributions {path}",
        "info": {"n_tokens": attr.n_tokens} if attr is not None else {},
    }
    names = run.clusterings()
    mapping = run.cluster_mapping()
    out["clustering"] = {
        "present": bool(names),
        "command": (
            f"spd-ray cluster-mapping {path}/clustering/{names[0]} --k K"
            if names and mapping is None
            else f"spd-ray clustering {path}"
        ),
        "info": {
            "names": names,
            "mapping": (
                {"clustering": mapping["clustering"], "k": mapping["k"]} if mapping else None
            ),
        },
    }
    return out


def _example_prompts(run: AppRun, n: int = 8) -> list[str]:
    """Texts to start from: the windows of the top examples of the most often firing components
    (the run's own data), else a few stock openings."""
    try:
        h = run.harvest()
    except Missing:
        return list(DEFAULT_PROMPTS)
    counts = h.firing_counts()
    texts: list[str] = []
    for i in np.argsort(-counts)[: 4 * n].tolist():
        for e in h.examples(int(i), "top")[:1]:
            ids = [t for t in (e.tokens or []) if t >= 0]
            text = run.tokenizer.decode(ids).strip() if run.tokenizer is not None and ids else ""
            if text and text not in texts:
                texts.append(text)
        if len(texts) >= n:
            break
    return texts or list(DEFAULT_PROMPTS)
