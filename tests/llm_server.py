"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests: the autointerp client and pipeline
are exercised over actual sockets with the official SDK, including the failures that matter
(rate limits, 5xx, timeouts, dropped and truncated responses, malformed JSON, bad keys, unknown
models), and the server counts what it saw so tests can assert exact numbers.

Usage:

    with LLMServer(faults=["429", "500"], latency_s=0.05) as server:
        settings = LLMSettings(base_url=server.base_url, model="test-model")
        ...
        assert server.requests == 3 and server.max_in_flight <= 4

Endpoints: `POST /v1/chat/completions` (auth, model check, fault plan, then `answer`) and
`GET /v1/models`. Any other path answers 404 `unknown_url`.

Faults, applied by chat-completion request number (0-based, counting every such request):
- "429" / "429:<s>": rate limited with `Retry-After: <s>` (default `retry_after_s`);
- "500": internal server error;
- "http:<status>": that status with an OpenAI-style error body that names nothing in particular;
- "timeout": hold the request `timeout_sleep_s` (longer than the client timeout), then close;
- "malformed": a 200 whose message content is not valid JSON;
- "garbage": a 200 whose HTTP body is not JSON at all (application/json content type);
- "truncated": a 200 announcing a longer Content-Length than it sends, then close;
- "drop": close the connection without answering.
`faults` is a list (None, "" or "ok" = answer normally) or a callable
`(request_number, request_json) -> fault | None`.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FAULTS = ("429", "500", "http", "timeout", "malformed", "garbage", "truncated", "drop")
DEFAULT_MODEL = "test-model"


class Label(BaseModel):
    """The label object tests ask for (importable by Ray workers through this module)."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="Short description of what the component does.")
    confidence: float = Field(ge=0.0, le=1.0, description="How sure the labeller is.")


Answer = Callable[[dict[str, Any]], str]
FaultPlan = Sequence[str | None] | Callable[[int, dict[str, Any]], str | None]


def stub_from_schema(schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """A small value that satisfies a JSON schema of the kind pydantic emits (objects, arrays,
    scalars, enums, $ref into $defs, anyOf, numeric bounds, minLength/minItems)."""
    root = root if root is not None else schema
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return stub_from_schema(root.get("$defs", {})[name], root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return stub_from_schema(options[0], root)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: stub_from_schema(sub, root) for name, sub in props.items()}
    if kind == "array":
        item = stub_from_schema(schema.get("items", {"type": "string"}), root)
        return [item] * int(schema.get("minItems", 1))
    if kind == "string":
        return "stub".ljust(int(schema.get("minLength", 0)), "x")
    if kind == "integer":
        if "minimum" in schema or "exclusiveMinimum" in schema:
            return math.floor(schema.get("minimum", schema.get("exclusiveMinimum", 0) + 1))
        if "maximum" in schema or "exclusiveMaximum" in schema:
            return math.ceil(schema.get("maximum", schema.get("exclusiveMaximum", 0) - 1))
        return 1
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        low = low if low is not None else (high - 1 if high is not None else 0.0)
        high = high if high is not None else low + 1
        return (low + high) / 2
    if kind == "boolean":
        return True
    return None


def default_answer(request: dict[str, Any]) -> str:
    """Valid JSON for the requested `response_format` schema, or a Label when none is given."""
    fmt = request.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema")
    if schema is None:
        return json.dumps({"label": "stub label", "confidence": 0.5})
    return json.dumps(stub_from_schema(schema))


class LLMServer:
    """OpenAI-compatible chat completions server in a background thread (see module docstring).

    Counters (read them after the client is done; they are updated under a lock):
    `requests` (every HTTP request), `chat_requests`, `answered` (200s with a usable answer),
    `fault_counts` (per fault kind, plus "401" and "404"), `in_flight` / `max_in_flight`,
    `timestamps` (time.monotonic() at arrival of each chat request), `bodies` (parsed JSON of each
    chat request).
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        models: Iterable[str] | None = None,
        unknown_model_status: int = 404,
        latency_s: float = 0.0,
        answer: Answer | None = None,
        faults: FaultPlan | None = None,
        retry_after_s: float = 1.0,
        timeout_sleep_s: float = 3.0,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ):
        """api_key: required bearer token (None accepts any); models: served model names (None
        accepts any); unknown_model_status: 404 like OpenAI and vLLM, or 400 like OpenRouter;
        latency_s: delay before every normal answer; answer: request json -> message content,
        called from the handler threads (concurrently when requests overlap);
        prompt_tokens / completion_tokens: fixed usage, else characters // 4."""
        self.api_key = api_key
        self.models = list(models) if models is not None else None
        self.unknown_model_status = unknown_model_status
        self.latency_s = latency_s
        self.answer = answer or default_answer
        if faults is not None and not callable(faults):
            for fault in faults:  # a typo would otherwise surface as a dropped connection
                _check_fault(fault)
        self.faults = faults
        self.retry_after_s = retry_after_s
        self.timeout_sleep_s = timeout_sleep_s
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._port: int | None = None
        self.reset_counters()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LLMServer:
        if self._httpd is not None:
            raise RuntimeError("LLMServer already started")
        self._stopping.clear()
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.llm = self
        self._httpd = httpd
        self._port = int(httpd.server_address[1])
        self._thread = threading.Thread(target=httpd.serve_forever, daemon=True, name="llm-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()  # wakes handlers sleeping in "timeout" or latency
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:  # idle keep-alive connections would block their threads
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port; still readable after stop() (then nothing listens there)."""
        if self._port is None:
            raise RuntimeError("LLMServer not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- counters -------------------------------------------------------------------------------

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = 0
            self.chat_requests = 0
            self.answered = 0
            self.fault_counts: Counter[str] = Counter()
            self.in_flight = 0
            self.max_in_flight = 0
            self.timestamps: list[float] = []
            self.bodies: list[dict[str, Any]] = []

    def _begin(self) -> None:
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _register_chat(self, body: dict[str, Any]) -> int:
        with self._lock:
            number = self.chat_requests
            self.chat_requests += 1
            self.timestamps.append(time.monotonic())
            self.bodies.append(body)
            return number

    def _count(self, kind: str) -> None:
        with self._lock:
            self.fault_counts[kind] += 1

    def _fault_for(self, number: int, body: dict[str, Any]) -> str | None:
        if self.faults is None:
            return None
        if callable(self.faults):
            fault = self.faults(number, body)
        else:
            fault = self.faults[number] if number < len(self.faults) else None
        return _check_fault(fault)

    def _usage(self, body: dict[str, Any], content: str) -> dict[str, int]:
        chars = sum(len(str(m.get("content") or "")) for m in body.get("messages", []))
        prompt = self.prompt_tokens if self.prompt_tokens is not None else chars // 4
        completion = (
            self.completion_tokens if self.completion_tokens is not None else len(content) // 4
        )
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def _check_fault(fault: str | None) -> str | None:
    """The fault to apply (None for a normal answer); ValueError for an unknown kind."""
    if fault in (None, "", "ok"):
        return None
    assert fault is not None
    kind, _, arg = fault.partition(":")
    if kind not in FAULTS or (kind == "http" and not arg.isdigit()):
        raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS} ('http:<status>')")
    return fault


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for handlers held by a "timeout" fault
    llm: LLMServer

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.llm._lock:
            self.llm._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.llm._lock:
            self.llm._connections.discard(request)
        super().shutdown_request(request)


def _error(message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers, so drops hit pooled sockets
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    @property
    def llm(self) -> LLMServer:
        return self.server.llm

    def _send_json(
        self, status: int, payload: object, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.llm.api_key is None:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {self.llm.api_key}":
            return True
        self.llm._count("401")
        self._send_json(
            401,
            _error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
        )
        return False

    def do_GET(self) -> None:
        self.llm._begin()
        try:
            if self.path.rstrip("/") != "/v1/models":
                self._send_json(
                    404, _error(f"Unknown path {self.path}", "not_found", "unknown_url")
                )
                return
            if not self._authorized():
                return
            names = self.llm.models if self.llm.models is not None else [DEFAULT_MODEL]
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in names]
            self._send_json(200, {"object": "list", "data": data})
        finally:
            self.llm._end()

    def do_POST(self) -> None:
        self.llm._begin()
        try:
            self._chat()
        finally:
            self.llm._end()

    def _chat(self) -> None:
        llm = self.llm
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(404, _error(f"Unknown path {self.path}", "not_found", "unknown_url"))
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as err:
            self._send_json(400, _error(f"Invalid JSON body: {err}", "invalid_request_error", None))
            return
        number = llm._register_chat(body)
        if not self._authorized():
            return
        model = body.get("model")
        if llm.models is not None and model not in llm.models:
            llm._count(str(llm.unknown_model_status))
            self._send_json(
                llm.unknown_model_status,
                _error(
                    f"The model `{model}` does not exist or you do not have access to it.",
                    "invalid_request_error",
                    "model_not_found",
                ),
            )
            return
        fault = llm._fault_for(number, body)
        if fault is not None:
            llm._count(fault.split(":")[0])
            self._apply_fault(fault, body)
            return
        if llm.latency_s > 0 and llm._stopping.wait(llm.latency_s):
            return
        content = llm.answer(body)
        with llm._lock:
            llm.answered += 1
        self._send_json(200, _completion(number, body, content, llm._usage(body, content)))

    def _apply_fault(self, fault: str, body: dict[str, Any]) -> None:
        llm = self.llm
        kind, _, arg = fault.partition(":")
        if kind == "429":
            wait = arg or f"{llm.retry_after_s:g}"
            self._send_json(
                429,
                _error("Rate limit reached, slow down.", "requests", "rate_limit_exceeded"),
                {"Retry-After": wait},
            )
        elif kind == "500":
            self._send_json(500, _error("The server had an error.", "server_error", None))
        elif kind == "http":
            status = int(arg)
            self._send_json(status, _error(f"Injected HTTP {status}.", "test_error", None))
        elif kind == "timeout":
            llm._stopping.wait(llm.timeout_sleep_s)
            self.close_connection = True
        elif kind == "malformed":
            content = 'Sure! Here is the label: {"label": "half a label", "confid'
            self._send_json(200, _completion(0, body, content, llm._usage(body, content)))
        elif kind == "garbage":
            data = b"<html>502 Bad Gateway</html>"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif kind == "truncated":
            data = json.dumps(_completion(0, body, llm.answer(body), llm._usage(body, ""))).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data) + 100))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif kind == "drop":
            self.close_connection = True


def _completion(
    number: int, body: dict[str, Any], content: str, usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", DEFAULT_MODEL),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": usage,
    }
