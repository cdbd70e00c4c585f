// JSON API client. Relative URLs so the access-token cookie and any path prefix ride along.

export class ApiError extends Error {
  constructor(status, body) {
    const detail = (body && body.detail) || `HTTP ${status}`;
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
    this.detail = this.message;
    this.missing = body && body.missing ? body.missing : null;
    this.command = body && body.command ? body.command : null;
  }
}

async function parse(resp) {
  const text = await resp.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { detail: text.slice(0, 300) };
  }
  if (!resp.ok) throw new ApiError(resp.status, body);
  return body;
}

export function qs(params) {
  const parts = [];
  for (const [k, v] of Object.entries(params)) {
    if (v === null || v === undefined || v === "") continue;
    parts.push(`${encodeURIComponent(k)}=${encodeURIComponent(v)}`);
  }
  return parts.length ? `?${parts.join("&")}` : "";
}

export async function get(path, params = {}) {
  return parse(await fetch(`api/${path}${qs(params)}`, { headers: { Accept: "application/json" } }));
}

export async function post(path, body) {
  return parse(
    await fetch(`api/${path}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
    }),
  );
}

export const runPath = (rid) => `runs/${encodeURIComponent(rid)}`;
export const componentPath = (rid, key) => `${runPath(rid)}/components/${encodeURIComponent(key)}`;
export const figureUrl = (rid, rel) =>
  `api/${runPath(rid)}/figures/${rel.split("/").map(encodeURIComponent).join("/")}`;

const runCache = new Map();

/** The run overview, fetched once per page load. */
export function runInfo(rid) {
  if (!runCache.has(rid)) {
    const p = get(runPath(rid));
    p.catch(() => runCache.delete(rid));
    runCache.set(rid, p);
  }
  return runCache.get(rid);
}

/**
 * POST to a text/event-stream endpoint and read it with fetch + ReadableStream (EventSource
 * cannot POST). Calls onEvent(name, data) per event; resolves with the `result` event's data and
 * rejects with an ApiError on an `error` event or a non-2xx answer.
 */
export async function postStream(path, body, onEvent) {
  const resp = await fetch(`api/${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(body),
  });
  if (!resp.ok) await parse(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let result = null;
  let failure = null;
  const handle = (block) => {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? "" : line.slice(i + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return;
    const payload = JSON.parse(data.join("\n"));
    if (name === "result") result = payload;
    else if (name === "error") failure = new ApiError(500, payload);
    onEvent(name, payload);
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buf += decoder.decode(value, { stream: true });
    // A "\r\n" may be split across chunks: hold a trailing "\r" back until the next chunk.
    const held = !done && buf.endsWith("\r") ? "\r" : "";
    if (held) buf = buf.slice(0, -1);
    buf = buf.replace(/\r\n?/g, "\n");
    let k;
    while ((k = buf.indexOf("\n\n")) >= 0) {
      handle(buf.slice(0, k));
      buf = buf.slice(k + 2);
    }
    buf += held;
    if (done) break;
  }
  if (buf.trim()) handle(buf);
  if (failure) throw failure;
  if (result === null) throw new ApiError(500, { detail: "the stream ended without a result" });
  return result;
}
