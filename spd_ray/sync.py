"""Staging folders mirror object-store URIs, and sync moves changed files between them.

Work happens in a local staging folder that mirrors the URI, `staging_dir(uri)` =
`$SPD_RAY_STAGING/<scheme>/<bucket>/<prefix>` (default `~/.cache/spd_ray/staging`), so
`staging_dir(join(root, name)) == staging_dir(root) / name`. A writer of a run:

    check_reachable(root, "--out", write=True)        # seconds, a one-line ValueError
    run_uri = join(root, name)
    with RemoteLease(run_uri):                          # one driver per run in the bucket
        local = fetch(run_uri)                          # resume from the bucket
        ...                                             # write into `local`, and at each
        sync_up(local, run_uri)                         # checkpoint, at the end and on failure

A reader: `open_run_root("s3://bucket/runs/r")` is the staging folder after `sync_down`.

Sync promises. Each object is written whole (an S3 PUT or multipart upload appears complete or not
at all; a killed upload leaves nothing). Files are sent in stages - data files largest first, then
index-like files (.json, .jsonl, .yaml, ...), then `summary.json` last - so a reader never sees a
summary naming a checkpoint that is not there yet; downloads go in the same order and each file is
replaced atomically. Only changed files travel: a manifest in the local folder (`MANIFEST`, never
uploaded) records each file's size, mtime and sha256 and the object's size and mtime; a file
whose size+mtime changed but whose hash did not is not sent again. Lock files, temp files and
half-built folders (`SKIP_PATTERNS`) and symbolic links are never sent. Listed mtimes have
one-second steps, so `sync_down` asks for the ETag of objects that were modified within `RACY_S`
of the listing that recorded them: a rewrite of the same size in the same second is not missed
(as long as the clocks of the host and the store agree to a few seconds). `sync_up` trusts the
listing alone: one writer per run, held by `RemoteLease`. A tree with several writers (a sweep:
the driver's files, each trial's run directory) gives each its own part: `exclude` names the
top-level entries that a sync leaves alone on both sides, because another writer syncs them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spd_ray.io import Lock, atomic_write, write_json

if TYPE_CHECKING:
    import pyarrow.fs as pafs
from spd_ray.errors import InputError, NotFoundError
from spd_ray.lease import LEASE_NAME
from spd_ray.objstore import PROBE_PREFIX, exists, is_uri, join, local_path, parse_uri, remote_fs

MANIFEST = ".sync-manifest.json"
SYNC_LOCK = ".sync.lock"
SKIP_PATTERNS = (
    MANIFEST,
    LEASE_NAME,
    f"{PROBE_PREFIX}*",
    "*.lock",
    "*.tmp",  # io.atomic_write's temp files
    ".*.partial-*",  # io.building_dir's folders
    ".*.old-*",  # io.replace_dir's old folders
)
INDEX_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".csv", ".txt", ".md")
LAST = ("summary.json",)  # sent last, in this order: they name the files sent before them
SYNC_THREADS = 8
RACY_S = 5.0  # listed mtimes' one-second steps plus the clock skew between hosts and the store


def staging_root() -> Path:
    """`$SPD_RAY_STAGING`, else `~/.cache/spd_ray/staging`."""
    return Path(os.environ.get("SPD_RAY_STAGING") or "~/.cache/spd_ray/staging").expanduser()


def staging_dir(uri: str) -> Path:
    """The local folder that mirrors `uri`: `staging_root()/<scheme>/<bucket>/<key...>` (not
    created). A URI whose folder would leave the staging root is refused."""
    u = parse_uri(uri, "staging of")
    root = staging_root()
    path = root.joinpath(u.scheme, u.bucket, *(u.key.split("/") if u.key else []))
    if not path.resolve().is_relative_to(root.resolve()):
        raise InputError(f"staging of {u}: {path} leaves the staging root {root} (a link?)")
    return path


def _skipped(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in SKIP_PATTERNS)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _local_files(local: Path, exclude: tuple[str, ...] = ()) -> dict[str, os.stat_result]:
    """Regular files under `local` by relative posix path, without skipped names, links or the
    top-level entries named in `exclude`."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(local):  # does not enter linked folders
        top = Path(dirpath) == local
        dirnames[:] = sorted(d for d in dirnames if not _skipped(d) and not (top and d in exclude))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if _skipped(name) or (top and name in exclude):
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted by its writer meanwhile
                st = path.lstat()
                if stat.S_ISREG(st.st_mode):
                    files[path.relative_to(local).as_posix()] = st
    return files


def _remote_files(fs: pafs.FileSystem, base: str) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of the objects under `base` by relative path, without skipped names."""
    import pyarrow.fs as pafs

    objects = {}
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        assert info.path.startswith(base + "/"), f"{info.path} is not under {base}"
        rel = info.path[len(base) + 1 :]
        segments = rel.split("/")
        if any(s in ("", ".", "..") for s in segments):
            raise InputError(f"object {info.path!r} has an unsafe key; refusing to mirror {base}")
        if not any(_skipped(s) for s in segments):
            objects[rel] = (int(info.size), int(info.mtime_ns))
    return objects


def _remote_files_except(
    fs: pafs.FileSystem, base: str, exclude: tuple[str, ...]
) -> dict[str, tuple[int, int]]:
    """`_remote_files` without the top-level entries named in `exclude`, which are not even
    listed (another writer's trees may hold many objects)."""
    import pyarrow.fs as pafs

    if not exclude:
        return _remote_files(fs, base)
    objects = {}
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True)):
        name = info.base_name
        if name in exclude or _skipped(name) or name in ("", ".", ".."):
            continue
        if info.type == pafs.FileType.Directory:
            inner = _remote_files(fs, f"{base}/{name}")
            objects.update({f"{name}/{rel}": listed for rel, listed in inner.items()})
        elif info.type == pafs.FileType.File:
            objects[name] = (int(info.size), int(info.mtime_ns))
    return objects


def _stages(rels: list[str], sizes: dict[str, int]) -> list[list[str]]:
    """Send order: data files (largest first), index-like files, then each of `LAST`."""
    ordered = sorted(rels, key=lambda r: (-sizes[r], r))
    data = [r for r in ordered if r not in LAST and not r.endswith(INDEX_SUFFIXES)]
    index = [r for r in ordered if r not in LAST and r.endswith(INDEX_SUFFIXES)]
    return [data, index] + [[r] for r in LAST if r in rels]


def _run_stages(stages: list[list[str]], send: Callable[[str], None]) -> None:
    """Each stage's files in parallel; a stage starts when the one before it has all landed."""
    with ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="spd-ray-sync") as pool:
        for stage in stages:
            list(pool.map(send, stage))


def _copy(src_fs: pafs.FileSystem, src: str, dest_fs: pafs.FileSystem, dest: str) -> None:
    import pyarrow.fs as pafs

    # One C++ call: no Python code runs mid-copy, so an interrupt cannot close a half-sent
    # object (which would publish it); a killed process never completes the upload.
    pafs.copy_files(src, dest, source_filesystem=src_fs, destination_filesystem=dest_fs)


@dataclass
class SyncReport:
    """What one sync moved: relative paths in send order, deleted objects, bytes and seconds."""

    transferred: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0


def _load_manifest(local: Path, uri: str) -> dict[str, dict[str, Any]]:
    path = local / MANIFEST
    if not path.exists():
        return {}
    data = json.loads(path.read_text())  # written atomically: whole or absent
    return dict(data["files"]) if data.get("uri") == uri else {}


def _save_manifest(local: Path, uri: str, files: dict[str, dict[str, Any]]) -> None:
    write_json(local / MANIFEST, {"uri": uri, "files": files}, indent=None)


def sync_up(
    local_dir: Path, uri: str, delete: bool = False, exclude: tuple[str, ...] = ()
) -> SyncReport:
    """Upload the changed files of `local_dir` to `uri`; with `delete`, also delete the objects
    under `uri` that `local_dir` no longer has. An object missing or changed in the bucket since
    the last sync is sent again. The top-level entries named in `exclude` are left alone."""
    import pyarrow.fs as pafs

    start = time.perf_counter()
    u = parse_uri(uri, "sync to")
    if not local_dir.is_dir():
        raise NotFoundError(f"sync to {u}: {local_dir} is not a folder")
    fs, base = remote_fs(u, "sync to")
    local_fs = pafs.LocalFileSystem()
    report = SyncReport()
    with Lock(local_dir / SYNC_LOCK, f"sync of {local_dir}"):
        files = _load_manifest(local_dir, str(u))
        remote = _remote_files_except(fs, base, exclude)
        local = _local_files(local_dir, exclude)
        todo, sizes = [], {}
        for rel, st in local.items():
            entry = files.get(rel)
            if entry is not None and remote.get(rel) != (
                entry["remote_size"],
                entry["remote_mtime_ns"],
            ):
                entry = None  # gone or changed in the bucket: send again
            if entry is not None and (st.st_size, st.st_mtime_ns) == (
                entry["size"],
                entry["mtime_ns"],
            ):
                continue
            digest = _sha256(local_dir / rel)
            new = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            if entry is not None and (entry["size"], entry["sha256"]) == (st.st_size, digest):
                files[rel] = {**entry, **new}  # touched, not changed
                continue
            files[rel] = new
            todo.append(rel)
            sizes[rel] = st.st_size

        stages = _stages(todo, sizes)
        _run_stages(stages, lambda rel: _copy(local_fs, str(local_dir / rel), fs, f"{base}/{rel}"))
        report.transferred = [rel for stage in stages for rel in stage]
        report.bytes = sum(sizes.values())
        if delete:
            report.deleted = sorted(set(remote) - set(local))
            for rel in report.deleted:
                fs.delete_file(f"{base}/{rel}")
        if todo:
            listed_ns = time.time_ns()
            remote = _remote_files_except(fs, base, exclude)
            with ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="spd-ray-sync") as pool:
                etags = pool.map(lambda r: _etag(fs, f"{base}/{r}") if r in remote else "", todo)
                for rel, etag in zip(todo, etags, strict=True):
                    files[rel].update(listed_ns=listed_ns, etag=etag)
        for rel in list(files):
            if rel not in local or rel not in remote:
                del files[rel]
            else:
                files[rel]["remote_size"], files[rel]["remote_mtime_ns"] = remote[rel]
        _save_manifest(local_dir, str(u), files)
    report.seconds = time.perf_counter() - start
    return report


def _etag(fs: pafs.FileSystem, path: str) -> str:
    """The object's ETag ("" where the store gives none): one HEAD request."""
    with fs.open_input_file(path) as f:
        return bytes(f.metadata().get("ETag", b"")).decode()


def sync_down(uri: str, local_dir: Path, exclude: tuple[str, ...] = ()) -> SyncReport:
    """Make every file of `local_dir` that has an object under `uri` equal to it, downloading
    only the objects that changed since the last sync (each file replaced atomically). Local
    files the bucket does not have are kept; the top-level entries named in `exclude` are left
    alone.

    An object is unchanged when its listed size and mtime and the local file's size and mtime
    match the manifest. Listed mtimes have one-second steps, so an object whose mtime was within
    `RACY_S` of the listing that recorded it could have been rewritten unseen in that second:
    its ETag (a HEAD request) decides."""
    import pyarrow.fs as pafs

    start = time.perf_counter()
    u = parse_uri(uri, "sync from")
    fs, base = remote_fs(u, "sync from")
    local_fs = pafs.LocalFileSystem()
    report = SyncReport()
    local_dir.mkdir(parents=True, exist_ok=True)
    with Lock(local_dir / SYNC_LOCK, f"sync of {local_dir}"):
        files = _load_manifest(local_dir, str(u))
        listed_ns = time.time_ns()
        remote = _remote_files_except(fs, base, exclude)
        local = _local_files(local_dir, exclude)
        todo, racy = [], []
        for rel, (size, mtime_ns) in remote.items():
            entry, st = files.get(rel), local.get(rel)
            if (
                entry is None
                or st is None
                or (st.st_size, st.st_mtime_ns) != (entry["size"], entry["mtime_ns"])
                or (size, mtime_ns) != (entry["remote_size"], entry["remote_mtime_ns"])
            ):
                todo.append(rel)
            elif mtime_ns >= entry["listed_ns"] - RACY_S * 1e9:
                racy.append(rel)
        with ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="spd-ray-sync") as pool:
            etags = dict(zip(racy, pool.map(lambda r: _etag(fs, f"{base}/{r}"), racy), strict=True))
        for rel, etag in etags.items():
            if etag and etag == files[rel].get("etag"):
                files[rel]["listed_ns"] = listed_ns
            else:
                todo.append(rel)

        def fetch_one(rel: str) -> None:
            dest = local_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            etag = _etag(fs, f"{base}/{rel}")  # before the copy: a newer copy is re-fetched later
            atomic_write(dest, lambda tmp: _copy(fs, f"{base}/{rel}", local_fs, str(tmp)))
            st = dest.stat()
            files[rel] = {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "sha256": _sha256(dest),
                "remote_size": remote[rel][0],
                "remote_mtime_ns": remote[rel][1],
                "listed_ns": listed_ns,
                "etag": etag,
            }

        stages = _stages(todo, {rel: remote[rel][0] for rel in todo})
        _run_stages(stages, fetch_one)
        report.transferred = [rel for stage in stages for rel in stage]
        report.bytes = sum(remote[rel][0] for rel in todo)
        _save_manifest(local_dir, str(u), files)
    report.seconds = time.perf_counter() - start
    return report


def fetch(uri: str) -> Path:
    """`staging_dir(uri)` after `sync_down` from `uri`."""
    local = staging_dir(uri)
    sync_down(uri, local)
    return local


def open_run_root(root: str | Path) -> Path:
    """A folder to read a run (or any tree) from: a local root as it is; for a URI, its staging
    folder brought up to date from the bucket. Nothing at the URI is a FileNotFoundError."""
    if not is_uri(root):
        return local_path(root)
    uri = str(root)
    if not exists(uri):
        raise NotFoundError(f"{uri}: nothing is stored there")
    return fetch(uri)


def remote_root(out: str | Path | None) -> str | None:
    """The object-store URI that `--out` (else `$SPD_RAY_OUT`) names, or None for a local root."""
    root = out if out is not None else os.environ.get("SPD_RAY_OUT")
    if root is None or isinstance(root, Path) or not is_uri(root):
        return None
    return root


def run_uri(run: str | Path, out: str | Path | None = None) -> str | None:
    """The URI of a run kept in object storage - `run` itself, or a run name under an
    object-store `out` - or None for a run on a local or shared filesystem."""
    if isinstance(run, Path):
        return None
    if is_uri(run):
        return run
    root = remote_root(out)
    return None if root is None else join(root, run)
