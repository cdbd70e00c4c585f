"""One driver per run in a bucket: a lease object with holder and expiry, renewed while held.

S3 has no lock: acquiring is read, write, wait `settle_s`, read back; safe while each competing
driver's read-then-write takes less than `settle_s` and host clocks agree to well under `ttl_s`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
from spd_ray.errors import UserError
from spd_ray.objstore import delete, join, parse_uri, read_bytes, write_bytes

LEASE_NAME = ".lease.json"
LEASE_TTL_S = 600.0
LEASE_SETTLE_S = 1.0


class LeaseHeldError(UserError, RuntimeError):
    """Another live driver holds the lease (or took it over after this one's expired)."""


def _machine() -> str:
    """This host and pid namespace: pids compared across two processes only mean something when
    this matches (containers may share a hostname)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    ns = Path("/proc/self/ns/pid")
    extra = f"/{boot.read_text().strip()}/{ns.stat().st_ino}" if boot.exists() else ""
    return socket.gethostname() + extra


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RemoteLease:
    """One writer per remote root: `<uri>/.lease.json` records the holder (host, pid, expiry).
    Acquiring refuses while another holder's lease is unexpired, unless that holder is a dead
    process on this machine (a crashed driver's rerun takes over at once). A daemon thread
    renews the lease every `ttl_s / 3` while held; `check()` raises once it was lost.

    The race window, honestly: an object store has no lock, so acquiring is read, write,
    wait `settle_s`, read back. Two drivers that start together both write; the one whose write
    lands last wins and the other sees it on read-back and refuses - as long as each driver's
    read-then-write takes less than `settle_s` (one request, normally milliseconds). A request
    stalled for longer can let both believe they hold it. Clocks of the hosts are assumed to agree
    to well under `ttl_s`."""

    def __init__(
        self, uri: str, ttl_s: float = LEASE_TTL_S, settle_s: float = LEASE_SETTLE_S
    ) -> None:
        self.root = str(parse_uri(uri, "lease of"))
        self.uri = join(self.root, LEASE_NAME)
        self.ttl_s = ttl_s
        self.settle_s = settle_s
        self.token = uuid.uuid4().hex
        self.lost: LeaseHeldError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(read_bytes(self.uri)))
        except FileNotFoundError:
            return None

    def _write(self) -> None:
        expires = time.time() + self.ttl_s
        info = {
            "token": self.token,
            "host": socket.gethostname(),
            "machine": _machine(),
            "pid": os.getpid(),
            "expires": expires,
            "expires_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)),
        }
        write_bytes(self.uri, json.dumps(info).encode())

    def _refusal(self, info: dict[str, Any]) -> LeaseHeldError:
        return LeaseHeldError(
            f"{self.root} is in use by pid {info.get('pid')} on host {info.get('host')} "
            f"(lease until {info.get('expires_utc')}); wait for it to end, or delete {self.uri} "
            "if that driver is gone"
        )

    @staticmethod
    def _live(info: dict[str, Any]) -> bool:
        if float(info.get("expires", 0)) <= time.time():
            return False
        return info.get("machine") != _machine() or _pid_alive(int(info.get("pid", -1)))

    @property
    def held(self) -> bool:
        return self._thread is not None

    def acquire(self) -> RemoteLease:
        assert not self.held, f"{self.uri} is already held by this object"
        info = self._read()
        if info is not None and info.get("token") != self.token and self._live(info):
            raise self._refusal(info)
        self._write()
        time.sleep(self.settle_s)
        info = self._read()
        if info is None or info.get("token") != self.token:
            raise self._refusal(info or {})
        self.lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep, name="spd-ray-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> None:
        """Push the expiry out by `ttl_s`; LeaseHeldError when another driver holds it now."""
        info = self._read()
        if info is None or info.get("token") != self.token:
            self.lost = self._refusal(info or {})
            raise self.lost
        self._write()

    def check(self) -> None:
        """Raise if the lease was lost (call before each sync)."""
        if self.lost is not None:
            raise self.lost

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseHeldError:
                return
            except OSError:  # a network blip: the next renewal, well before expiry, retries
                continue

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        info = self._read()
        if info is not None and info.get("token") == self.token:
            delete(self.uri)

    def __enter__(self) -> RemoteLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
