// The tether.v1 contract over the Connect protocol (JSON codec), as tether-server's
// gateway serves it: the same messages grpcurl prints (protobuf's JSON mapping), the
// same codes and google.rpc.ErrorInfo. Unary calls are one POST; StreamTaskStatus is a
// fetch whose body is read as a stream of envelopes (EventSource cannot send an
// Authorization header, and a token never goes in a URL).

/** A refused call: the canonical code and the ErrorInfo the server attached. */
export class TetherError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly reason: string = "",
    readonly metadata: Record<string, string> = {},
    readonly fields: string[] = [],
  ) {
    super(message);
  }
}

interface ConnectDetail {
  type: string;
  debug?: {
    reason?: string;
    metadata?: Record<string, string>;
    fieldViolations?: { field: string }[];
  };
}

interface ConnectErrorBody {
  code?: string;
  message?: string;
  details?: ConnectDetail[];
}

function toError(body: ConnectErrorBody, fallback: string): TetherError {
  let reason = "";
  let metadata: Record<string, string> = {};
  const fields: string[] = [];
  for (const detail of body.details ?? []) {
    if (detail.type === "google.rpc.ErrorInfo") {
      reason = detail.debug?.reason ?? "";
      metadata = detail.debug?.metadata ?? {};
    } else if (detail.type === "google.rpc.BadRequest") {
      for (const v of detail.debug?.fieldViolations ?? []) fields.push(v.field);
    }
  }
  return new TetherError(body.code ?? fallback, body.message ?? fallback, reason, metadata, fields);
}

const TOKEN_KEY = "tether.token";

/** The bearer token lives in this tab's sessionStorage only: never in a URL or a cookie. */
export const token = {
  get: (): string => sessionStorage.getItem(TOKEN_KEY) ?? "",
  set: (value: string): void => sessionStorage.setItem(TOKEN_KEY, value),
  clear: (): void => sessionStorage.removeItem(TOKEN_KEY),
};

function headers(contentType: string): Headers {
  const h = new Headers({ "Content-Type": contentType, "Connect-Protocol-Version": "1" });
  const t = token.get();
  if (t) h.set("Authorization", `Bearer ${t}`);
  return h;
}

/** One unary RPC, e.g. call("TaskService", "GetTask", {name}). */
export async function call<T>(service: string, method: string, request: object): Promise<T> {
  let response: Response;
  try {
    response = await fetch(`/tether.v1.${service}/${method}`, {
      method: "POST",
      headers: headers("application/json"),
      body: JSON.stringify(request),
    });
  } catch (err) {
    throw new TetherError("unavailable", `server unreachable: ${String(err)}`);
  }
  const text = await response.text();
  let body: unknown = {};
  try {
    body = text ? JSON.parse(text) : {};
  } catch {
    throw new TetherError("unknown", `HTTP ${response.status}: ${text.slice(0, 200)}`);
  }
  if (!response.ok) throw toError(body as ConnectErrorBody, `HTTP ${response.status}`);
  return body as T;
}

const END_STREAM = 0x02;

/**
 * A server-streaming RPC: calls onMessage for each response until the stream ends.
 * Resolves when the server ends it with OK; rejects with TetherError otherwise
 * (a dropped connection is "unavailable", like gRPC).
 */
export async function stream<T>(
  service: string,
  method: string,
  request: object,
  onMessage: (message: T) => void,
  signal: AbortSignal,
): Promise<void> {
  const json = new TextEncoder().encode(JSON.stringify(request));
  const body = new Uint8Array(5 + json.length);
  new DataView(body.buffer).setUint32(1, json.length);
  body.set(json, 5);
  let response: Response;
  try {
    response = await fetch(`/tether.v1.${service}/${method}`, {
      method: "POST",
      headers: headers("application/connect+json"),
      body,
      signal,
    });
  } catch (err) {
    throw new TetherError("unavailable", `server unreachable: ${String(err)}`);
  }
  if (!response.ok || response.body === null) {
    throw new TetherError("unavailable", `HTTP ${response.status}`);
  }
  const reader = response.body.getReader();
  let buffer = new Uint8Array(0);
  const decoder = new TextDecoder();
  for (;;) {
    let chunk: ReadableStreamReadResult<Uint8Array>;
    try {
      chunk = await reader.read();
    } catch (err) {
      throw new TetherError("unavailable", `stream broken: ${String(err)}`);
    }
    if (chunk.done) throw new TetherError("unavailable", "stream ended without its end message");
    const joined = new Uint8Array(buffer.length + chunk.value.length);
    joined.set(buffer);
    joined.set(chunk.value, buffer.length);
    buffer = joined;
    // Envelopes: 1 flag byte, 4-byte big-endian length, then the JSON message.
    while (buffer.length >= 5) {
      const view = new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
      const flags = view.getUint8(0);
      const length = view.getUint32(1);
      if (buffer.length < 5 + length) break;
      const payload = JSON.parse(decoder.decode(buffer.subarray(5, 5 + length))) as unknown;
      buffer = buffer.slice(5 + length);
      if (flags & END_STREAM) {
        const end = payload as { error?: ConnectErrorBody };
        if (end.error) throw toError(end.error, "unknown");
        return;
      }
      onMessage(payload as T);
    }
  }
}
