/**
 * Typed errors of the tether client.
 *
 * Every failed call rejects with a {@link TetherError}. tether puts a
 * `google.rpc.ErrorInfo` (domain "tether.dev") and, for validation errors, a
 * `google.rpc.BadRequest` into the rich status (`grpc-status-details-bin`
 * trailer); this module decodes them so callers branch on stable values:
 *
 * ```ts
 * try { await client.get("tasks/nope"); }
 * catch (e) { if (isTetherError(e, "TASK_NOT_FOUND")) { ... } }
 * ```
 *
 * `code` is Connect's `Code`, whose numbers are the canonical gRPC status codes
 * (`Code.NotFound === 5`); `codeName` is the gRPC spelling ("NOT_FOUND").
 */
import { durationMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/** The ErrorInfo domain of errors raised by tether itself. */
export const TETHER_ERROR_DOMAIN = "tether.dev";

/** One wrong field of a request (google.rpc.BadRequest.FieldViolation). */
export interface FieldViolation {
  /** Path of the field in the request, e.g. "task" or "grace.sigint". */
  readonly field: string;
  /** Why the value is wrong. */
  readonly description: string;
  /** Machine-readable reason of this violation, when the server gives one. */
  readonly reason: string;
}

/** A failed tether call, with the details the server attached to its status. */
export class TetherError extends Error {
  /** Canonical status code (Connect's `Code`; numerically the gRPC code). */
  readonly code: Code;
  /** The gRPC name of `code`, e.g. "INVALID_ARGUMENT". */
  readonly codeName: string;
  /** `ErrorInfo.reason`, e.g. "TASK_NOT_FOUND"; "" when the status carried no ErrorInfo. */
  readonly reason: string;
  /** `ErrorInfo.domain`; "tether.dev" for tether's own errors, "" when absent. */
  readonly domain: string;
  /** `ErrorInfo.metadata`: the dynamic values of the message (e.g. the task name). */
  readonly metadata: Readonly<Record<string, string>>;
  /** `BadRequest.field_violations`; empty unless a request field was wrong. */
  readonly violations: readonly FieldViolation[];
  /** `RetryInfo.retry_delay` in milliseconds, when the server suggested one. */
  readonly retryDelayMs: number | undefined;
  /** The server's status message, without the "[code]" prefix Connect adds. */
  readonly rawMessage: string;

  constructor(init: {
    code: Code;
    message: string;
    reason?: string;
    domain?: string;
    metadata?: Record<string, string>;
    violations?: FieldViolation[];
    retryDelayMs?: number | undefined;
    cause?: unknown;
  }) {
    const codeName = codeToName(init.code);
    const reason = init.reason ?? "";
    super(`${codeName}${reason ? ` (${reason})` : ""}: ${init.message}`, { cause: init.cause });
    this.name = "TetherError";
    this.code = init.code;
    this.codeName = codeName;
    this.reason = reason;
    this.domain = init.domain ?? "";
    this.metadata = Object.freeze({ ...(init.metadata ?? {}) });
    this.violations = Object.freeze([...(init.violations ?? [])]);
    this.retryDelayMs = init.retryDelayMs;
    this.rawMessage = init.message;
  }

  /** Converts any error thrown by a Connect call into a TetherError (idempotent). */
  static from(error: unknown): TetherError {
    if (error instanceof TetherError) {
      return error;
    }
    const connectError = ConnectError.from(error);
    const info = connectError.findDetails(ErrorInfoSchema)[0];
    const violations = connectError
      .findDetails(BadRequestSchema)
      .flatMap((badRequest) => badRequest.fieldViolations)
      .map((v) => ({ field: v.field, description: v.description, reason: v.reason }));
    const retry = connectError.findDetails(RetryInfoSchema)[0];
    return new TetherError({
      code: connectError.code,
      message: connectError.rawMessage,
      reason: info?.reason ?? "",
      domain: info?.domain ?? "",
      metadata: info?.metadata ?? {},
      violations,
      retryDelayMs: retry?.retryDelay ? durationMs(retry.retryDelay) : undefined,
      cause: error,
    });
  }
}

/** True when `error` is a TetherError, and (if given) carries this ErrorInfo reason. */
export function isTetherError(error: unknown, reason?: string): error is TetherError {
  return error instanceof TetherError && (reason === undefined || error.reason === reason);
}

const CODE_NAMES: Record<number, string> = {
  0: "OK",
  [Code.Canceled]: "CANCELLED",
  [Code.Unknown]: "UNKNOWN",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.PermissionDenied]: "PERMISSION_DENIED",
  [Code.ResourceExhausted]: "RESOURCE_EXHAUSTED",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.Internal]: "INTERNAL",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.DataLoss]: "DATA_LOSS",
  [Code.Unauthenticated]: "UNAUTHENTICATED",
};

/** The gRPC name of a status code ("NOT_FOUND" for Code.NotFound). */
export function codeToName(code: Code): string {
  return CODE_NAMES[code] ?? `CODE_${code}`;
}
