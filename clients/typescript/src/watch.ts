/**
 * A resumable watch over TaskService.StreamTaskStatus.
 *
 * The server guarantees, per stream, strictly increasing revisions and a
 * resume_token on every message (DESIGN §7). {@link TaskWatch} turns that into a
 * subscription that outlives any one stream:
 *
 * - It remembers the token of every message it consumed, checkpoints included
 *   (checkpoints are never yielded; they only advance the token).
 * - When the stream breaks (UNAVAILABLE, e.g. a restarting server or a lagging
 *   subscriber cut off; a reset connection), it reconnects with that token after
 *   a capped exponential backoff, so nothing is missed.
 * - It yields no event twice: live events whose revision is not above the last
 *   yielded revision are dropped (the server replays strictly after the token,
 *   so this only guards against a server that replays too much).
 * - A single-task watch ends right after the task's terminal event.
 * - When the token is older than the server's retained log (OUT_OF_RANGE,
 *   reason RESUME_TOKEN_EXPIRED) the events in between are gone for good. By
 *   default (`onExpired: "reset"`) the watch re-lists the matching tasks with
 *   ListTasks, yields one `{kind: "reset"}` item with their current state, and
 *   goes on watching from the listing's token; consumers must replace their view
 *   of the world with `reset.tasks`. With `onExpired: "throw"` the watch rejects
 *   with the TetherError instead.
 *
 * With `sendInitialState` the server first sends a SNAPSHOT event per matching
 * task. Tokens are adopted only once the snapshot phase has ended (the
 * checkpoint with initial_state_complete): a stream that breaks during the
 * snapshot phase asks for the initial state again, and snapshots already
 * yielded (same task, same revision) are not yielded twice.
 */
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import { backoffDelayMs, resolveBackoff, sleep, type BackoffOptions, type ResolvedBackoff } from "./backoff.js";
import { TETHER_ERROR_DOMAIN, TetherError } from "./errors.js";
import { TaskView, type Task } from "./gen/tether/v1/task_pb.js";
import {
  StreamTaskStatusRequestSchema,
  TaskEventType,
  type ListTasksResponse,
  type StreamTaskStatusRequest,
  type StreamTaskStatusResponse,
  type TaskEvent,
  type TaskFilter,
} from "./gen/tether/v1/task_service_pb.js";
import { isTerminal, toDate, toTaskFilter, type TaskFilterInit } from "./tasks.js";

/** What to watch and how. */
export interface WatchOptions {
  /** One task, "tasks/{id}": the watch ends after its terminal event. Excludes `filter`. */
  readonly name?: string;
  /** Tasks matching this filter (every task when neither name nor filter is set). Never ends on its own. */
  readonly filter?: TaskFilterInit;
  /** Start strictly after the message that carried this token (from an earlier watch or a listing). */
  readonly resumeToken?: string;
  /** Yield a SNAPSHOT event per matching task first. */
  readonly sendInitialState?: boolean;
  /** How much of each task the events carry; default BASIC (no result). */
  readonly view?: TaskView;
  /** Leave out PROGRESS and OUTPUT events. */
  readonly excludeProgress?: boolean;
  /** How often the server sends checkpoints on an idle stream (server bounds apply). */
  readonly checkpointIntervalMs?: number;
  /** On an expired resume token: re-list and yield a `reset` item (default), or throw. */
  readonly onExpired?: "reset" | "throw";
  /** Reconnection backoff; default 100 ms doubling up to 5 s, retrying forever. */
  readonly reconnect?: BackoffOptions;
  /** Aborting ends the watch: the iteration stops without an error. */
  readonly signal?: AbortSignal;
  /**
   * Called before each reconnection with the error that broke the stream
   * (undefined when a filter stream ended with OK), for logging and metrics.
   */
  readonly onReconnect?: (info: { error: TetherError | undefined; attempt: number; delayMs: number }) => void;
}

/** A change to a task, as yielded by a watch. */
export interface TaskChange {
  readonly kind: "event";
  /** SNAPSHOT, STATE_CHANGED, PROGRESS, OUTPUT or UPDATED. */
  readonly type: TaskEventType;
  /** The task after the change. */
  readonly task: Task;
  /** Revision of the event in the controller's log. */
  readonly revision: bigint;
  /** When the change happened. */
  readonly eventTime: Date | undefined;
  /** The new piece of output, on OUTPUT events. */
  readonly outputChunk: string;
  /**
   * Token of the message that carried this event. During the SNAPSHOT phase the
   * watch itself resumes from the token before the snapshots (see TaskWatch.resumeToken).
   */
  readonly resumeToken: string;
  /** The raw protobuf event. */
  readonly event: TaskEvent;
}

/**
 * The watch lost events (its token expired) and re-listed: `tasks` is the
 * current state of every task it covers. Replace any state built so far.
 */
export interface WatchReset {
  readonly kind: "reset";
  /** ErrorInfo reason that caused the reset: "RESUME_TOKEN_EXPIRED". */
  readonly reason: string;
  /** Every matching task now (for a single-task watch: that one task). */
  readonly tasks: readonly Task[];
  /** Token the watch continues from. */
  readonly resumeToken: string;
}

export type WatchItem = TaskChange | WatchReset;

/** The calls a watch needs; TetherClient provides them (tests may fake them). */
export interface WatchBackend {
  stream(request: StreamTaskStatusRequest, signal: AbortSignal): AsyncIterable<StreamTaskStatusResponse>;
  listPages(filter: TaskFilter | undefined, view: TaskView, pageSize: number, signal: AbortSignal): AsyncIterable<ListTasksResponse>;
  getTask(name: string, view: TaskView, signal: AbortSignal): Promise<Task>;
}

const RESUME_TOKEN_EXPIRED = "RESUME_TOKEN_EXPIRED";

const DEFAULT_RECONNECT: ResolvedBackoff = {
  initialDelayMs: 100,
  maxDelayMs: 5000,
  multiplier: 2,
  maxAttempts: Number.POSITIVE_INFINITY,
};

/**
 * True for failures that a reconnect can cure: the server going away or
 * cutting a lagging subscriber off (UNAVAILABLE), a connection reset under the
 * stream (surfacing as CANCELLED, INTERNAL or UNKNOWN without tether's
 * ErrorInfo), ABORTED.
 */
export function isStreamRetryable(error: TetherError): boolean {
  switch (error.code) {
    case Code.Unavailable:
    case Code.Aborted:
      return true;
    case Code.Canceled:
    case Code.Internal:
    case Code.Unknown:
      return error.domain !== TETHER_ERROR_DOMAIN;
    default:
      return false;
  }
}

/**
 * An async iterable of {@link WatchItem}s; see the module comment for the
 * guarantees. Iterate it once. `resumeToken` is the token of the last message
 * consumed: persist it to resume in another process.
 */
export class TaskWatch implements AsyncIterable<WatchItem> {
  private readonly controller = new AbortController();
  private readonly reconnectBackoff: ResolvedBackoff;
  private token: string;
  private reconnectCount = 0;
  private started = false;

  constructor(
    private readonly backend: WatchBackend,
    private readonly options: WatchOptions = {},
  ) {
    if (options.name && options.filter) {
      throw new TypeError("watch: give either name or filter, not both");
    }
    this.reconnectBackoff = resolveBackoff(options.reconnect, DEFAULT_RECONNECT);
    this.token = options.resumeToken ?? "";
  }

  /** The token of the last message consumed ("" before the first). */
  get resumeToken(): string {
    return this.token;
  }

  /** How many times the watch reconnected so far. */
  get reconnects(): number {
    return this.reconnectCount;
  }

  /** Ends the watch: the open stream is cancelled and iteration stops. */
  close(): void {
    this.controller.abort(new Error("watch closed"));
  }

  [Symbol.asyncIterator](): AsyncIterator<WatchItem> {
    if (this.started) {
      throw new Error("a TaskWatch can be iterated only once; start another watch from its resumeToken");
    }
    this.started = true;
    return this.run();
  }

  private async *run(): AsyncGenerator<WatchItem, void, undefined> {
    const signal = this.controller.signal;
    const onUserAbort = (): void => this.close();
    if (this.options.signal?.aborted) {
      this.close();
    }
    this.options.signal?.addEventListener("abort", onUserAbort, { once: true });
    const single = Boolean(this.options.name);
    const view = this.options.view ?? TaskView.BASIC;
    const filter = toTaskFilter(this.options.filter);
    // The snapshot phase lasts until the checkpoint with initial_state_complete.
    let initialPending = Boolean(this.options.sendInitialState);
    const initialToken = this.token;
    const snapshotsYielded = new Set<string>();
    let lastRevision: bigint | undefined;
    let failures = 0;
    let lastError: TetherError | undefined;

    try {
      for (;;) {
        if (signal.aborted) {
          return;
        }
        const request = create(StreamTaskStatusRequestSchema, {
          name: this.options.name ?? "",
          filter,
          resumeToken: initialPending ? initialToken : this.token,
          sendInitialState: initialPending,
          view,
          excludeProgress: this.options.excludeProgress ?? false,
          checkpointInterval:
            this.options.checkpointIntervalMs === undefined ? undefined : durationFromMs(this.options.checkpointIntervalMs),
        });
        try {
          for await (const message of this.backend.stream(request, signal)) {
            failures = 0;
            lastError = undefined;
            const event = message.event;
            if (event.case === "checkpoint") {
              if (!initialPending) {
                this.token = message.resumeToken;
              } else if (event.value.initialStateComplete) {
                initialPending = false;
                snapshotsYielded.clear();
                this.token = message.resumeToken;
              }
              continue;
            }
            if (event.case !== "taskEvent") {
              continue; // a message kind newer than this client: keep going, but do not move the token
            }
            const taskEvent = event.value;
            const task = taskEvent.task;
            let fresh: boolean;
            if (taskEvent.type === TaskEventType.SNAPSHOT) {
              const key = `${task?.name ?? ""}@${taskEvent.revision}`;
              fresh = !snapshotsYielded.has(key);
              snapshotsYielded.add(key);
            } else {
              fresh = lastRevision === undefined || taskEvent.revision > lastRevision;
              if (fresh) {
                lastRevision = taskEvent.revision;
              }
            }
            if (!initialPending) {
              this.token = message.resumeToken;
            }
            if (fresh && task !== undefined) {
              yield {
                kind: "event",
                type: taskEvent.type,
                task,
                revision: taskEvent.revision,
                eventTime: toDate(taskEvent.eventTime),
                outputChunk: taskEvent.outputChunk,
                resumeToken: message.resumeToken,
                event: taskEvent,
              };
            }
            if (single && task !== undefined && isTerminal(task.state)) {
              return;
            }
          }
          // The server ended the stream with OK. A single-task stream does so after
          // the terminal event (or at once when the task had ended before the token);
          // a filter stream never ends on its own, so treat it as a break.
          if (single) {
            return;
          }
          lastError = undefined;
        } catch (error) {
          if (signal.aborted) {
            return;
          }
          const tetherError = TetherError.from(error);
          if (tetherError.code === Code.OutOfRange && tetherError.reason === RESUME_TOKEN_EXPIRED) {
            if (this.options.onExpired === "throw") {
              throw tetherError;
            }
            const reset = await this.relist(filter, view, signal);
            initialPending = false;
            snapshotsYielded.clear();
            lastRevision = undefined; // the old revisions may belong to another controller epoch
            this.token = reset.resumeToken;
            yield reset;
            if (single && reset.tasks.every((task) => isTerminal(task.state))) {
              return;
            }
            continue;
          }
          if (!isStreamRetryable(tetherError)) {
            throw tetherError;
          }
          lastError = tetherError;
        }
        failures += 1;
        if (failures > this.reconnectBackoff.maxAttempts) {
          throw lastError ?? new TetherError({ code: Code.Unavailable, message: "stream ended unexpectedly" });
        }
        const delay = Math.max(backoffDelayMs(failures, this.reconnectBackoff), lastError?.retryDelayMs ?? 0);
        this.options.onReconnect?.({ error: lastError, attempt: failures, delayMs: delay });
        try {
          await sleep(delay, signal);
        } catch {
          return; // closed while waiting
        }
        this.reconnectCount += 1;
      }
    } finally {
      // Whatever ended the iteration (a break in the caller's loop included), drop the stream.
      this.options.signal?.removeEventListener("abort", onUserAbort);
      this.close();
    }
  }

  /**
   * Re-synchronizes after an expired token: takes a fresh token first, then
   * reads the current state, so no change after the token can be missed (a
   * change may show in both the listing and the next events; that is harmless).
   */
  private async relist(filter: TaskFilter | undefined, view: TaskView, signal: AbortSignal): Promise<WatchReset> {
    try {
      if (this.options.name) {
        let token = "";
        for await (const page of this.backend.listPages(undefined, TaskView.BASIC, 1, signal)) {
          token = page.resumeToken;
          break;
        }
        const task = await this.backend.getTask(this.options.name, view, signal);
        return { kind: "reset", reason: RESUME_TOKEN_EXPIRED, tasks: [task], resumeToken: token };
      }
      let token: string | undefined;
      const tasks: Task[] = [];
      for await (const page of this.backend.listPages(filter, view, 0, signal)) {
        token ??= page.resumeToken; // the first page's token precedes everything listed
        tasks.push(...page.tasks);
      }
      return { kind: "reset", reason: RESUME_TOKEN_EXPIRED, tasks, resumeToken: token ?? "" };
    } catch (error) {
      throw TetherError.from(error);
    }
  }
}
