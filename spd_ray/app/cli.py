"""`spd-ray app RUN [RUN ...]`: the viewer on loopback (or, with `--host`, behind a random access
token), its URL printed last once it answers."""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import socket
import sys
from typing import Any

from spd_ray.argtypes import positive_int
from spd_ray.errors import InputError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_of(host: str, port: int, token: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = socket.gethostname()
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def cmd_app(args: argparse.Namespace) -> int:
    import uvicorn

    from spd_ray.app.server import create_app

    device = "cpu"
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise InputError("--gpu: no CUDA device is visible here")
        device = "cuda"
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    token = None if is_loopback(args.host) else secrets.token_urlsafe(24)
    app = create_app(args.runs, token=token, device=device, out=args.out)  # every run checked first
    for run in app.state.runs.values():
        if run.kind in ("lm", "toy"):
            print(f"loading {run.id} ({run.path}) ...", file=sys.stderr, flush=True)
            run.loaded  # noqa: B018 - the model once, before the URL says it is ready
            if run.kind == "lm":
                run.tokenizer  # noqa: B018
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as err:
        raise InputError(f"--host {args.host} --port {args.port}: cannot bind: {err}") from None
    port = sock.getsockname()[1]
    url = url_of(args.host, port, token)

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            print(url, flush=True)
            if args.open:
                import webbrowser

                webbrowser.open(url)

    config = uvicorn.Config(app, log_level="warning", access_log=args.verbose)
    Server(config).run(sockets=[sock])
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "app",
        help="the viewer: browse runs, components, prompts, graphs and interventions",
        description=__doc__,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or names under --out)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default loopback; any other needs the access token the URL carries)",
    )
    p.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    p.add_argument("--gpu", action="store_true", help="load the models on the GPU")
    p.add_argument("--open", action="store_true", help="open the URL in a browser")
    p.add_argument(
        "--threads", type=positive_int, help="torch threads for the model (default: torch's)"
    )
    p.add_argument(
        "--out", help="output root of run names (default: $SPD_RAY_OUT, else ~/spd_ray_out)"
    )
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=cmd_app)
