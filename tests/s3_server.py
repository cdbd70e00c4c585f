"""A real S3-compatible server (moto) on 127.0.0.1 for object-storage tests.

with s3_server(buckets=("bkt",)) as s3:
    monkeypatch.setenv(...) for each of s3.env   # endpoint, dummy credentials, region
    ...
    with s3.denying():                           # every request is refused (403)
        ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGION = "us-east-1"
ACCESS_KEY = "spd-ray-test-access-key"
SECRET_KEY = "spd-ray-test-secret-key-not-real"  # tests assert it never appears in a message


BUCKET = "bucket"  # the bucket of the `s3` fixture (tests/conftest.py)


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    env: dict[str, str]  # what a client process needs: endpoint, dummy credentials, region

    def client(self) -> Any:
        """A boto3 S3 client of this server (to arrange what pyarrow would refuse to write)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def driver_env(self, staging: Path, **extra: str) -> dict[str, str]:
        """Environment of an spd-ray command using this server: a private local Ray started by the
        driver (its workers inherit the bucket's settings), `staging` as the staging root."""
        return {
            **os.environ,
            **self.env,
            "RAY_ADDRESS": "local",
            "SPD_RAY_STAGING": str(staging),
            "SPD_RAY_THREADS": "1",
            **extra,
        }

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def _set_auth(self, no_auth_requests: str) -> None:
        # moto's control endpoint: after this many requests, authenticate every request (there
        # are no IAM users, so every access key is refused); "inf" turns checking off again.
        req = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=no_auth_requests.encode(),
            headers={"Content-Type": "text/plain"},  # a form body would be parsed away
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200, resp.read()

    @contextlib.contextmanager
    def denying(self) -> Iterator[None]:
        """Inside the block the server refuses every request's credentials."""
        self._set_auth("0")
        try:
            yield
        finally:
            self._set_auth("inf")


@contextlib.contextmanager
def s3_server(buckets: tuple[str, ...] = ()) -> Iterator[S3Server]:
    """A moto S3 server in a thread of this process on a free loopback port, with `buckets`
    created; stopped when the block ends."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            # nothing from the user's ~/.aws or an instance's metadata service
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        s3 = S3Server(endpoint, env)
        for bucket in buckets:
            s3.create_bucket(bucket)
        yield s3
    finally:
        server.stop()
