/**
 * Small helpers over the generated tether.v1 types: task states, results and
 * the conversions between plain JavaScript values and protobuf messages.
 */
import { create, toJson, type JsonValue } from "@bufbuild/protobuf";
import { durationFromMs, timestampDate, ValueSchema, type Timestamp } from "@bufbuild/protobuf/wkt";
import {
  GracePeriodsSchema,
  RetryPolicySchema,
  TaskState,
  type GracePeriods,
  type RetryPolicy,
  type Task,
} from "./gen/tether/v1/task_pb.js";
import { TaskFilterSchema, type TaskFilter } from "./gen/tether/v1/task_service_pb.js";

/** States a task never leaves. */
export const TERMINAL_STATES: ReadonlySet<TaskState> = new Set([
  TaskState.SUCCEEDED,
  TaskState.FAILED,
  TaskState.INTERRUPTED,
  TaskState.TIMED_OUT,
  TaskState.CANCELLED,
]);

/** True for SUCCEEDED, FAILED, INTERRUPTED, TIMED_OUT and CANCELLED. */
export function isTerminal(state: TaskState): boolean {
  return TERMINAL_STATES.has(state);
}

/** The state's short name, e.g. "SUCCEEDED". */
export function stateName(state: TaskState): string {
  return TaskState[state] ?? `STATE_${state}`;
}

/**
 * The task's return value as plain JSON, or undefined when it has none (the
 * result is only sent in the FULL view, and only once the task SUCCEEDED).
 */
export function taskResult(task: Task): JsonValue | undefined {
  return task.result === undefined ? undefined : toJson(ValueSchema, task.result);
}

/** A protobuf Timestamp as a Date (undefined stays undefined). */
export function toDate(timestamp: Timestamp | undefined): Date | undefined {
  return timestamp === undefined ? undefined : timestampDate(timestamp);
}

/**
 * Grace periods of the escalation ladder, in seconds. A bare number is the time
 * a task gets after SIGINT before SIGTERM is sent; unset stages take the
 * server's (or the task's) values.
 */
export type GraceSeconds = number | { readonly sigint?: number; readonly sigterm?: number; readonly sigkill?: number };

export function toGracePeriods(grace: GraceSeconds | undefined): GracePeriods | undefined {
  if (grace === undefined) {
    return undefined;
  }
  const stages = typeof grace === "number" ? { sigint: grace } : grace;
  return create(GracePeriodsSchema, {
    sigint: secondsToDuration(stages.sigint),
    sigterm: secondsToDuration(stages.sigterm),
    sigkill: secondsToDuration(stages.sigkill),
  });
}

export function secondsToDuration(seconds: number | undefined): ReturnType<typeof durationFromMs> | undefined {
  return seconds === undefined ? undefined : durationFromMs(Math.round(seconds * 1000));
}

/**
 * A retry policy for {@link TetherClient.submit}. A retried attempt is the same task
 * with attempt + 1 and resumes from its last checkpoint; unset fields take the
 * server's defaults (jitter unset: none).
 */
export interface RetryPolicyInit {
  /** Attempts that may end in a retried failure, the first run included (at most 100). */
  readonly maxAttempts?: number;
  /** Reasons retried: ENGINE_LOST, CLUSTER_LOST, RESOURCE_LIMIT, TASK_RAISED, TIMED_OUT (default the first two). */
  readonly retryOn?: readonly string[];
  /** Wait before the first retry, in seconds. */
  readonly initialBackoffSeconds?: number;
  /** Longest wait between two attempts, in seconds. */
  readonly maxBackoffSeconds?: number;
  /** Growth of the wait per retry (at least 1). */
  readonly backoffMultiplier?: number;
  /** Random spread of each wait, a fraction in [0, 1]. */
  readonly jitter?: number;
}

export function toRetryPolicy(policy: RetryPolicyInit | undefined): RetryPolicy | undefined {
  if (policy === undefined) {
    return undefined;
  }
  return create(RetryPolicySchema, {
    maxAttempts: policy.maxAttempts ?? 0,
    retryOn: [...(policy.retryOn ?? [])],
    initialBackoff: secondsToDuration(policy.initialBackoffSeconds),
    maxBackoff: secondsToDuration(policy.maxBackoffSeconds),
    backoffMultiplier: policy.backoffMultiplier ?? 0,
    jitter: policy.jitter ?? 0,
  });
}

/** Which tasks a list or a watch covers; empty fields match everything, set fields must all match. */
export interface TaskFilterInit {
  /** Match tasks in any of these states. */
  readonly states?: readonly TaskState[];
  /** Match tasks of any of these registered task names, e.g. ["demo.echo"]. */
  readonly tasks?: readonly string[];
  /** Match tasks carrying all of these labels with these values. */
  readonly labels?: Readonly<Record<string, string>>;
  /** Match tasks with any of these names, "tasks/{id}" (at most 1000): every event of those tasks. */
  readonly names?: readonly string[];
}

export function toTaskFilter(filter: TaskFilterInit | undefined): TaskFilter | undefined {
  if (filter === undefined) {
    return undefined;
  }
  return create(TaskFilterSchema, {
    states: [...(filter.states ?? [])],
    tasks: [...(filter.tasks ?? [])],
    labels: { ...(filter.labels ?? {}) },
    names: [...(filter.names ?? [])],
  });
}
