"""Object storage against a real S3 server (moto on 127.0.0.1): URIs, staging folders, sync up and
down, fail-fast reachability checks and the remote lease."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import SECRET_KEY, S3Server, s3_server

from spd_ray import lease as lease_mod
from spd_ray import objstore, sync
from spd_ray.io import Lock, LockedError
from spd_ray.lease import LeaseHeldError, RemoteLease
from spd_ray.objstore import (
    check_reachable,
    exists,
    is_uri,
    join,
    local_path,
    read_bytes,
    remote_fs,
    write_bytes,
)
from spd_ray.sync import MANIFEST, open_run_root, staging_dir, sync_down, sync_up

BUCKET = "bkt"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(buckets=(BUCKET,)) as server, pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.setenv("SPD_RAY_STAGING", str(tmp_path_factory.mktemp("staging")))
        yield server


def _tree(root: Path) -> dict[str, bytes]:
    """A run-like tree: a large checkpoint, nested binary files, index files."""
    rng = __import__("random").Random(0)
    files = {
        "checkpoint_000010/model.pt": rng.randbytes(11_000_000),  # several multipart parts
        "checkpoint_000010/meta/rng.bin": rng.randbytes(3_000),
        "figures/a/b/ci.png": rng.randbytes(20_000),
        "config.yaml": b"seed: 0\n",
        "metrics.jsonl": b'{"step": 1}\n{"step": 2}\n',
        "summary.json": b'{"checkpoint": "checkpoint_000010"}\n',
        "empty.bin": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, ".sync.lock")
    }


def test_uris_and_local_paths(tmp_path: Path) -> None:
    assert is_uri("s3://bkt/runs") and is_uri("gs://bkt") and is_uri("gcs://bkt/x")
    assert is_uri("hdfs://host/x")  # a URI, refused by remote_fs below
    assert not is_uri("/tmp/runs") and not is_uri("runs") and not is_uri(tmp_path)
    assert not is_uri("file:///tmp/runs")
    assert local_path("file:///tmp/runs") == Path("/tmp/runs")
    assert local_path("~/x") == Path.home() / "x"
    with pytest.raises(ValueError, match="turned into a Path"):
        is_uri(Path("s3://bkt/runs"))
    with pytest.raises(ValueError, match=r"--out hdfs://host/x: unsupported scheme"):
        remote_fs("hdfs://host/x")
    with pytest.raises(ValueError, match="credentials do not belong") as err:
        remote_fs("s3://AKIA:topsecret@bkt/runs")
    assert "topsecret" not in str(err.value)
    with pytest.raises(ValueError, match="query"):
        remote_fs("s3://bkt/runs?region=eu-west-1")
    assert join("s3://bkt/runs", "r", "harvest") == "s3://bkt/runs/r/harvest"
    assert join("gcs://bkt", "r") == "gs://bkt/r"
    with pytest.raises(ValueError, match="not a valid name"):
        join("s3://bkt/runs", "..")


def test_staging_dir_is_safe(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(os.environ["SPD_RAY_STAGING"])
    assert staging_dir("s3://bkt/runs/r") == root / "s3" / "bkt" / "runs" / "r"
    assert staging_dir(join("s3://bkt/runs", "r")) == staging_dir("s3://bkt/runs") / "r"
    assert staging_dir("gcs://bkt/x") == root / "gs" / "bkt" / "x"
    for hostile in (
        "s3://b/../x",
        "s3://bkt/runs/../../etc",
        "s3://bkt/a//b",
        "s3://../x",
        "s3://",
    ):
        with pytest.raises(ValueError, match="not a valid name"):
            staging_dir(hostile)
    # a link inside the staging root that points out of it is refused too
    monkeypatch.setenv("SPD_RAY_STAGING", str(tmp_path / "staging"))
    (tmp_path / "staging" / "s3").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "staging" / "s3" / "evil").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="leaves the staging root"):
        staging_dir("s3://evil/runs")


def test_round_trip_and_order(s3: S3Server, tmp_path: Path) -> None:
    uri = "s3://bkt/round/r"
    src = tmp_path / "src"
    files = _tree(src)
    t0 = time.perf_counter()
    report = sync_up(src, uri)
    up_s = time.perf_counter() - t0
    assert sorted(report.transferred) == sorted(files)
    assert report.bytes == sum(len(b) for b in files.values())
    # the checkpoint goes first, index files after data, summary.json last
    assert report.transferred[0] == "checkpoint_000010/model.pt"
    assert report.transferred[-1] == "summary.json"
    assert report.transferred.index("metrics.jsonl") > report.transferred.index("empty.bin")
    assert not exists(join(uri, MANIFEST)) and not exists(join(uri, ".sync.lock"))
    assert read_bytes(join(uri, "figures", "a", "b", "ci.png")) == files["figures/a/b/ci.png"]

    dest = tmp_path / "dest"
    t0 = time.perf_counter()
    down = sync_down(uri, dest)
    down_s = time.perf_counter() - t0
    assert sorted(down.transferred) == sorted(files)
    assert down.transferred[-1] == "summary.json"
    assert _read_tree(dest) == files
    assert sync_down(uri, dest).transferred == []  # nothing changed
    print(f"round trip of {report.bytes / 1e6:.1f} MB: up {up_s:.2f} s, down {down_s:.2f} s")


def test_second_sync_sends_only_changes(s3: S3Server, tmp_path: Path) -> None:
    uri = "s3://bkt/incremental/r"
    src = tmp_path / "src"
    _tree(src)
    assert len(sync_up(src, uri).transferred) == 7
    (src / "metrics.jsonl").write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3}\n')  # changed
    (src / "figures/a/b/ci.png").touch()  # new mtime, same bytes: hashed, not sent
    os.utime(src / "config.yaml", ns=(1, 1))
    (src / "figures/new.png").write_bytes(b"\x89PNG")  # new
    report = sync_up(src, uri)
    assert report.transferred == ["figures/new.png", "metrics.jsonl"]
    assert sync_up(src, uri).transferred == []
    # an object removed from the bucket behind our back is sent again
    fs, path = remote_fs(uri)
    fs.delete_file(f"{path}/config.yaml")
    assert sync_up(src, uri).transferred == ["config.yaml"]
    # delete=False keeps objects the local folder no longer has; delete=True removes them
    (src / "figures/new.png").unlink()
    assert sync_up(src, uri).deleted == [] and exists(join(uri, "figures", "new.png"))
    assert sync_up(src, uri, delete=True).deleted == ["figures/new.png"]
    assert not exists(join(uri, "figures", "new.png"))


def test_temp_lock_and_partial_files_never_sent(s3: S3Server, tmp_path: Path) -> None:
    uri = "s3://bkt/skips/r"
    src = tmp_path / "src"
    (src / "ckpt").mkdir(parents=True)
    (src / "ckpt/model.pt").write_bytes(b"whole")
    torn = {
        "ckpt/.model.pt.1234.0123abcd.tmp": b"half a checkpoint",  # io.atomic_write mid-write
        ".harvest.partial-77-abcd1234/stats.bin": b"half a harvest",  # io.building_dir
        "run.lock": b"{}",
        "x.tmp": b"temp",
        ".spd-ray-probe-0123": b"probe",
    }
    for rel, data in torn.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "link.pt").symlink_to(src / "ckpt/model.pt")
    assert sync_up(src, uri).transferred == ["ckpt/model.pt"]
    fs, path = remote_fs(uri)
    listed = sync._remote_files(fs, path)
    assert list(listed) == ["ckpt/model.pt"]
    for rel in [*torn, "link.pt"]:
        assert not exists(join(uri, *rel.split("/")))


def test_resume_from_bucket_after_staging_is_deleted(s3: S3Server, tmp_path: Path) -> None:
    uri = "s3://bkt/resume/r"
    src = staging_dir(uri)
    files = _tree(src)
    sync_up(src, uri)
    __import__("shutil").rmtree(src)
    local = open_run_root(uri)
    assert local == src and _read_tree(local) == files
    assert sync_up(local, uri).transferred == []  # the manifest came back with the files
    # a second writer elsewhere changes one object: only that one is fetched
    other = tmp_path / "other"
    sync_down(uri, other)
    (other / "summary.json").write_bytes(b'{"checkpoint": "checkpoint_000020"}\n')
    assert sync_up(other, uri).transferred == ["summary.json"]
    assert sync_down(uri, local).transferred == ["summary.json"]
    assert (local / "summary.json").read_bytes() == (other / "summary.json").read_bytes()
    assert open_run_root(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="s3://bkt/resume/nothing"):
        open_run_root("s3://bkt/resume/nothing")


def test_sync_down_refuses_unsafe_keys(s3: S3Server, tmp_path: Path) -> None:
    s3.client().put_object(Bucket=BUCKET, Key="evil/r/../../../escaped", Body=b"x")
    with pytest.raises(ValueError, match="unsafe key"):
        sync_down("s3://bkt/evil/r", tmp_path / "dest")
    assert not (tmp_path / "escaped").exists()


def test_one_sync_per_folder(s3: S3Server, tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"a")
    with Lock(tmp_path / ".sync.lock", "test"), pytest.raises(LockedError, match="sync of"):
        sync_up(tmp_path, "s3://bkt/locked/r")


def test_bytes_helpers(s3: S3Server) -> None:
    uri = "s3://bkt/bytes/x.json"
    assert not exists(uri)
    with pytest.raises(FileNotFoundError, match=uri):
        read_bytes(uri)
    write_bytes(uri, b"{}")
    assert exists(uri) and exists("s3://bkt/bytes") and read_bytes(uri) == b"{}"


def _one_line(err: pytest.ExceptionInfo[ValueError]) -> str:
    text = str(err.value)
    assert "\n" not in text and SECRET_KEY not in text
    return text


def test_check_reachable_passes_and_leaves_nothing(s3: S3Server) -> None:
    t0 = time.perf_counter()
    check_reachable("s3://bkt/probe", write=True)
    assert time.perf_counter() - t0 < 5
    fs, path = remote_fs("s3://bkt/probe")
    assert sync._remote_files(fs, path) == {}


def test_unreachable_endpoint_fails_fast(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        check_reachable("s3://bkt/runs", "--out")
    elapsed = time.perf_counter() - t0
    text = _one_line(err)
    assert elapsed < 5, elapsed
    assert text.startswith("--out s3://bkt/runs: cannot reach") and "AWS_ENDPOINT_URL" in text
    assert f"127.0.0.1:{port}" in text
    # an endpoint that accepts but never answers: the request's stall limit ends it
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=r"s3://bkt/runs: cannot reach .*(too slow|Timeout)"):
            check_reachable("s3://bkt/runs", "--out")
        assert time.perf_counter() - t0 < 5
    # whatever the SDK does, the check gives up after timeout_s
    monkeypatch.setattr(objstore, "_probe", lambda *args: time.sleep(3))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"s3://bkt/runs: no answer from .* in 0.5 s"):
        check_reachable("s3://bkt/runs", "--out", timeout_s=0.5)
    assert time.perf_counter() - t0 < 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:9000")
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL must be http"):
        check_reachable("s3://bkt/runs")


def test_missing_bucket_fails_with_one_line(s3: S3Server) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        check_reachable("s3://no-such-bucket/runs", "--out")
    assert time.perf_counter() - t0 < 5
    text = _one_line(err)
    assert "--out s3://no-such-bucket/runs" in text and "'no-such-bucket' does not exist" in text


def test_denied_credentials_fail_with_one_line(s3: S3Server) -> None:
    with s3.denying(), pytest.raises(ValueError) as err:
        check_reachable("s3://bkt/runs", "--out", write=True)
    text = _one_line(err)
    assert "--out s3://bkt/runs: access denied" in text and "AWS_SECRET_ACCESS_KEY" in text


def test_lease_admits_one_holder(s3: S3Server, tmp_path: Path) -> None:
    uri = "s3://bkt/lease/r"
    first = RemoteLease(uri, ttl_s=60, settle_s=0.05).acquire()
    info = json.loads(read_bytes(join(uri, ".lease.json")))
    assert info["pid"] == os.getpid() and "secret" not in json.dumps(info).lower()
    with pytest.raises(LeaseHeldError, match=f"{uri} is in use by pid {os.getpid()}"):
        RemoteLease(uri, settle_s=0.05).acquire()
    first.release()
    assert not exists(join(uri, ".lease.json"))
    with RemoteLease(uri, settle_s=0.05) as second:
        second.check()
    stale = RemoteLease(uri, ttl_s=0.5, settle_s=0.05).acquire()
    stale._stop.set()  # a driver that stopped renewing
    time.sleep(0.6)
    # the lease object is never synced, nor deleted by a sync with delete=True
    taker = RemoteLease(uri, ttl_s=60, settle_s=0.05).acquire()  # admitted after expiry
    with pytest.raises(LeaseHeldError):
        stale.renew()
    stale.release()  # not its lease any more: left in place
    assert json.loads(read_bytes(join(uri, ".lease.json")))["token"] == taker.token
    (tmp_path / "a.bin").write_bytes(b"a")
    assert sync_up(tmp_path, uri, delete=True).transferred == ["a.bin"]
    assert exists(join(uri, ".lease.json")) and sync_down(uri, tmp_path).transferred == []
    taker.release()


def test_lease_of_a_dead_driver_on_this_machine_is_taken_over(s3: S3Server) -> None:
    uri = "s3://bkt/lease/dead"
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = {
        "token": "old",
        "host": socket.gethostname(),
        "machine": lease_mod._machine(),
        "pid": int(proc.stdout),
        "expires": time.time() + 3600,
        "expires_utc": "later",
    }
    write_bytes(join(uri, ".lease.json"), json.dumps(dead).encode())
    with RemoteLease(uri, settle_s=0.05) as lease:
        assert json.loads(read_bytes(join(uri, ".lease.json")))["token"] == lease.token
    # the same record from another machine is respected until it expires
    write_bytes(join(uri, ".lease.json"), json.dumps({**dead, "machine": "other"}).encode())
    with pytest.raises(LeaseHeldError, match="until later"):
        RemoteLease(uri, settle_s=0.05).acquire()


def test_same_second_rewrite_is_caught_by_etag(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = "s3://bkt/racy/r"
    s3.client().put_object(Bucket=BUCKET, Key="racy/r/state.json", Body=b'{"step": 10}')
    local = tmp_path / "local"
    assert sync_down(uri, local).transferred == ["state.json"]
    recorded = json.loads((local / MANIFEST).read_text())["files"]["state.json"]
    # the object is rewritten, same size, and the listing shows the mtime it had (same second)
    s3.client().put_object(Bucket=BUCKET, Key="racy/r/state.json", Body=b'{"step": 20}')
    listed = sync._remote_files
    same_second = (recorded["remote_size"], recorded["remote_mtime_ns"])
    monkeypatch.setattr(
        sync, "_remote_files", lambda fs, base: {**listed(fs, base), "state.json": same_second}
    )
    monkeypatch.setattr(sync, "RACY_S", 0.0)  # without the ETag check it goes unseen
    assert sync_down(uri, local).transferred == []
    monkeypatch.setattr(sync, "RACY_S", 5.0)
    assert sync_down(uri, local).transferred == ["state.json"]
    assert (local / "state.json").read_bytes() == b'{"step": 20}'
    assert sync_down(uri, local).transferred == []  # its ETag is recorded now
