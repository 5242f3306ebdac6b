/**
 * tether's TypeScript client.
 *
 * - {@link TetherClient}: submit, interrupt, get, list, cluster, watch, wait.
 * - {@link TaskWatch}: a resumable watch (reconnects, no duplicates, resets).
 * - {@link TetherError}: every failure, with ErrorInfo reason, metadata and field violations.
 * - The generated tether.v1 types and enums (Task, TaskState, ...), for when you need them.
 */
export { TetherClient } from "./client.js";
export type {
  CallOpts,
  GetOptions,
  InterruptOptions,
  InterruptResult,
  ListOptions,
  SubmitOptions,
  SubmitResult,
  TetherClientOptions,
} from "./client.js";
export { TaskWatch, isStreamRetryable } from "./watch.js";
export type { TaskChange, WatchBackend, WatchItem, WatchOptions, WatchReset } from "./watch.js";
export { TETHER_ERROR_DOMAIN, TetherError, codeToName, isTetherError } from "./errors.js";
export type { FieldViolation } from "./errors.js";
export type { BackoffOptions } from "./backoff.js";
export { TERMINAL_STATES, isTerminal, stateName, taskResult, toDate } from "./tasks.js";
export type { GraceSeconds, RetryPolicyInit, TaskFilterInit } from "./tasks.js";
export { Code } from "@connectrpc/connect";

export * from "./gen/tether/v1/task_pb.js";
export * from "./gen/tether/v1/task_service_pb.js";
export * from "./gen/tether/v1/cluster_service_pb.js";
