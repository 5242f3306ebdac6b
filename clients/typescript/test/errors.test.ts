// TetherError's decoding of the rich status details (no server).
import assert from "node:assert/strict";
import { test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { TetherError, isTetherError } from "../src/index.js";

test("ErrorInfo, BadRequest and RetryInfo become typed fields", () => {
  const cause = new ConnectError("task is required", Code.InvalidArgument, undefined, [
    { desc: ErrorInfoSchema, value: { reason: "INVALID_REQUEST", domain: "tether.dev", metadata: { field: "task" } } },
    { desc: BadRequestSchema, value: { fieldViolations: [{ field: "task", description: "required" }] } },
    { desc: RetryInfoSchema, value: { retryDelay: { seconds: 1n, nanos: 500_000_000 } } },
  ]);
  const error = TetherError.from(cause);
  assert.equal(error.code, Code.InvalidArgument);
  assert.equal(error.codeName, "INVALID_ARGUMENT");
  assert.equal(error.reason, "INVALID_REQUEST");
  assert.equal(error.domain, "tether.dev");
  assert.deepEqual(error.metadata, { field: "task" });
  assert.deepEqual(error.violations, [{ field: "task", description: "required", reason: "" }]);
  assert.equal(error.retryDelayMs, 1500);
  assert.equal(error.rawMessage, "task is required");
  assert.equal(error.message, "INVALID_ARGUMENT (INVALID_REQUEST): task is required");
  assert.equal(error.cause, cause);
  assert.ok(isTetherError(error, "INVALID_REQUEST"));
  assert.ok(!isTetherError(error, "OTHER"));
  assert.equal(TetherError.from(error), error);
});

test("a status without details still converts, with an empty reason", () => {
  const error = TetherError.from(new Error("boom"));
  assert.equal(error.code, Code.Unknown);
  assert.equal(error.reason, "");
  assert.deepEqual(error.violations, []);
});
