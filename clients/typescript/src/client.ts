/**
 * TetherClient: the typed, idiomatic face of tether.v1 for Node.
 *
 * It speaks the gRPC protocol over HTTP/2 (Connect's gRPC transport; grpcio
 * servers speak neither the Connect protocol nor gRPC-web). Every method
 * rejects with a {@link TetherError}. Unary calls that fail with UNAVAILABLE are
 * retried with capped exponential backoff; SubmitTask and InterruptTask carry a
 * request_id (a UUID unless you give one) that stays the same across those
 * retries, so a retry never creates a second task.
 */
import { create, type JsonObject } from "@bufbuild/protobuf";
import { Code, createClient, type CallOptions, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { randomUUID } from "node:crypto";
import { backoffDelayMs, resolveBackoff, sleep, type BackoffOptions, type ResolvedBackoff } from "./backoff.js";
import { TetherError } from "./errors.js";
import { ClusterService, type GetClusterResponse } from "./gen/tether/v1/cluster_service_pb.js";
import { TaskView, type Task } from "./gen/tether/v1/task_pb.js";
import {
  InterruptTaskRequestSchema,
  ListTasksRequestSchema,
  SubmitTaskRequestSchema,
  TaskService,
  type ListTasksResponse,
  type TaskFilter,
} from "./gen/tether/v1/task_service_pb.js";
import {
  secondsToDuration,
  toGracePeriods,
  toRetryPolicy,
  toTaskFilter,
  type GraceSeconds,
  type RetryPolicyInit,
  type TaskFilterInit,
} from "./tasks.js";
import { TaskWatch, type WatchBackend, type WatchOptions } from "./watch.js";

/** Options of {@link TetherClient}. */
export interface TetherClientOptions {
  /** Deadline of each unary call attempt, in ms. Default 30 000. Streams have none. */
  readonly timeoutMs?: number;
  /** Retries of unary calls that fail with UNAVAILABLE; default 5 attempts, 100 ms doubling up to 2 s. */
  readonly retry?: BackoffOptions;
  /** Bearer token sent as `authorization: Bearer <token>` on every call. */
  readonly token?: string;
  /** Extra Connect interceptors (logging, metadata...). */
  readonly interceptors?: readonly Interceptor[];
  /**
   * A transport of your own (TLS, custom HTTP/2 settings). When given, `address`
   * is informational only and `close()` does not close the transport.
   */
  readonly transport?: Transport;
}

/** Options common to every call. */
export interface CallOpts {
  /** Aborting cancels the call (and its retries). */
  readonly signal?: AbortSignal;
  /** Deadline of this call's attempts, in ms, instead of the client's `timeoutMs`. */
  readonly timeoutMs?: number;
}

/** Options of {@link TetherClient.submit}. */
export interface SubmitOptions extends CallOpts {
  /** Keyword arguments of the task (JSON-shaped). */
  readonly args?: JsonObject;
  /** Labels to attach, filterable in list() and watch(). */
  readonly labels?: Readonly<Record<string, string>>;
  /** Higher runs first; default 0. */
  readonly priority?: number;
  /** Run-time limit from start to end, in seconds; past it the task ends TIMED_OUT. */
  readonly timeoutSeconds?: number;
  /** Longest time the task may wait in the queue, in seconds. */
  readonly queueTimeoutSeconds?: number;
  /** Grace periods of the escalation ladder for this task. */
  readonly graceSeconds?: GraceSeconds;
  /** Engine tags the task needs (e.g. "gpu"). */
  readonly requiredTags?: readonly string[];
  /** Earlier task whose last checkpoint the new one resumes from ("tasks/{id}"). */
  readonly resumeFrom?: string;
  /** Idempotency key; default a fresh UUID, reused on every retry of this call. */
  readonly requestId?: string;
  /**
   * When a failed attempt runs again (resuming from the task's last checkpoint);
   * default: the server's policy. A user's interrupt is never retried.
   */
  readonly retry?: RetryPolicyInit;
  /** Whether a higher-priority task may preempt this one (it resumes later); default: the server's choice by task name. */
  readonly preemptible?: boolean;
}

/** Result of {@link TetherClient.submit}. */
export interface SubmitResult {
  /** The accepted task (PENDING, or later when deduplicated). */
  readonly task: Task;
  /** True when the request_id matched an earlier request and no new task was created. */
  readonly deduplicated: boolean;
  /** The request_id that was sent (pass it again to retry the same submission). */
  readonly requestId: string;
}

/** Options of {@link TetherClient.interrupt}. */
export interface InterruptOptions extends CallOpts {
  /** Why the task is stopped; recorded on the task. */
  readonly reason?: string;
  /** Grace periods for this interrupt; a number is the time after SIGINT before SIGTERM. */
  readonly graceSeconds?: GraceSeconds;
  /** Idempotency key; default a fresh UUID, reused on every retry of this call. */
  readonly requestId?: string;
}

/** Result of {@link TetherClient.interrupt}. */
export interface InterruptResult {
  /** The task after the request: CANCELLED, INTERRUPTING, or unchanged. */
  readonly task: Task;
  /** True when request_id matched an earlier request. */
  readonly deduplicated: boolean;
  /** The request_id that was sent. */
  readonly requestId: string;
}

/** Options of {@link TetherClient.get}. */
export interface GetOptions extends CallOpts {
  /** Default FULL (result and traceback included). */
  readonly view?: TaskView;
}

/** Options of {@link TetherClient.list} and {@link TetherClient.listPages}. */
export interface ListOptions extends CallOpts {
  /** Which tasks; default all. */
  readonly filter?: TaskFilterInit;
  /** Tasks per page (the server caps it); default the server's (100). */
  readonly pageSize?: number;
  /** Default BASIC. */
  readonly view?: TaskView;
}

const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_RETRY: ResolvedBackoff = { initialDelayMs: 100, maxDelayMs: 2000, multiplier: 2, maxAttempts: 5 };

/** A client of one tether server. Cheap to keep; call close() when done. */
export class TetherClient {
  /** The server's base URL, e.g. "http://127.0.0.1:50051". */
  readonly baseUrl: string;
  private readonly tasks: Client<typeof TaskService>;
  private readonly clusterService: Client<typeof ClusterService>;
  private readonly sessionManager: Http2SessionManager | undefined;
  private readonly timeoutMs: number;
  private readonly retry: ResolvedBackoff;

  /**
   * @param address "host:port" (plain-text HTTP/2) or a URL, "http://host:port" or "https://host:port".
   */
  constructor(address: string, options: TetherClientOptions = {}) {
    this.baseUrl = /^[a-z]+:\/\//i.test(address) ? address : `http://${address}`;
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.retry = resolveBackoff(options.retry, DEFAULT_RETRY);
    const interceptors = [...(options.interceptors ?? [])];
    if (options.token !== undefined) {
      const header = `Bearer ${options.token}`;
      interceptors.unshift((next) => (request) => {
        request.header.set("authorization", header);
        return next(request);
      });
    }
    let transport = options.transport;
    if (transport === undefined) {
      this.sessionManager = new Http2SessionManager(this.baseUrl);
      transport = createGrpcTransport({ baseUrl: this.baseUrl, sessionManager: this.sessionManager, interceptors });
    }
    this.tasks = createClient(TaskService, transport);
    this.clusterService = createClient(ClusterService, transport);
  }

  /**
   * Submits a registered task and returns at once with the task PENDING.
   *
   * ```ts
   * const { task } = await client.submit("demo.echo", { args: { value: "hi" } });
   * ```
   */
  async submit(task: string, options: SubmitOptions = {}): Promise<SubmitResult> {
    const requestId = options.requestId ?? randomUUID();
    const request = create(SubmitTaskRequestSchema, {
      task,
      args: options.args,
      labels: { ...(options.labels ?? {}) },
      priority: options.priority ?? 0,
      timeout: secondsToDuration(options.timeoutSeconds),
      queueTimeout: secondsToDuration(options.queueTimeoutSeconds),
      grace: toGracePeriods(options.graceSeconds),
      requiredTags: [...(options.requiredTags ?? [])],
      resumeFrom: options.resumeFrom ?? "",
      requestId,
      retry: toRetryPolicy(options.retry),
      preemptible: options.preemptible,
    });
    const response = await this.unary(options, (call) => this.tasks.submitTask(request, call));
    return { task: required(response.task, "SubmitTaskResponse.task"), deduplicated: response.deduplicated, requestId };
  }

  /**
   * Stops a task: a PENDING one ends CANCELLED at once; a RUNNING one goes
   * INTERRUPTING and its terminal state follows on a watch. Interrupting a task
   * that already SUCCEEDED, FAILED or TIMED_OUT rejects with FAILED_PRECONDITION
   * (reason TASK_ALREADY_TERMINAL).
   */
  async interrupt(name: string, options: InterruptOptions = {}): Promise<InterruptResult> {
    const requestId = options.requestId ?? randomUUID();
    const request = create(InterruptTaskRequestSchema, {
      name,
      reason: options.reason ?? "",
      requestId,
      grace: toGracePeriods(options.graceSeconds),
    });
    const response = await this.unary(options, (call) => this.tasks.interruptTask(request, call));
    return { task: required(response.task, "InterruptTaskResponse.task"), deduplicated: response.deduplicated, requestId };
  }

  /** Returns one task ("tasks/{id}"), by default in the FULL view (result included). */
  async get(name: string, options: GetOptions = {}): Promise<Task> {
    const response = await this.unary(options, (call) =>
      this.tasks.getTask({ name, view: options.view ?? TaskView.FULL }, call),
    );
    return required(response.task, "GetTaskResponse.task");
  }

  /** Every matching task, oldest first, fetching pages as the iteration goes. */
  async *list(options: ListOptions = {}): AsyncGenerator<Task, void, undefined> {
    for await (const page of this.listPages(options)) {
      yield* page.tasks;
    }
  }

  /**
   * The raw pages of ListTasks. Each carries a `resumeToken`: pass the first
   * page's to watch() to see every change after the listing (list, then watch).
   */
  async *listPages(options: ListOptions = {}): AsyncGenerator<ListTasksResponse, void, undefined> {
    yield* this.pages(toTaskFilter(options.filter), options.view ?? TaskView.BASIC, options.pageSize ?? 0, options);
  }

  /** The cluster: engines, their state and load, limits and registered task names. */
  async cluster(options: CallOpts = {}): Promise<GetClusterResponse> {
    return this.unary(options, (call) => this.clusterService.getCluster({}, call));
  }

  /**
   * Watches one task (`name`) or every task matching `filter`; see {@link TaskWatch}
   * for the guarantees (reconnects, no duplicates, resets on expired tokens).
   *
   * ```ts
   * for await (const item of client.watch({ name: task.name })) {
   *   if (item.kind === "event") console.log(stateName(item.task.state));
   * }
   * ```
   */
  watch(options: WatchOptions = {}): TaskWatch {
    const backend: WatchBackend = {
      stream: (request, signal) => this.tasks.streamTaskStatus(request, { signal }),
      listPages: (filter, view, pageSize, signal) => this.pages(filter, view, pageSize, { signal }),
      getTask: (name, view, signal) => this.get(name, { view, signal }),
    };
    return new TaskWatch(backend, options);
  }

  /**
   * Waits until a task reaches a terminal state and returns it in the FULL view
   * (result and traceback included).
   */
  async wait(name: string, options: CallOpts = {}): Promise<Task> {
    const watch = this.watch({ name, sendInitialState: true, excludeProgress: true, signal: options.signal });
    for await (const item of watch) {
      void item; // the watch ends by itself after the terminal event
    }
    options.signal?.throwIfAborted();
    return this.get(name, options);
  }

  /** Closes the HTTP/2 connection (and every open stream) of this client. */
  close(): void {
    this.sessionManager?.abort();
  }

  private async *pages(
    filter: TaskFilter | undefined,
    view: TaskView,
    pageSize: number,
    options: CallOpts,
  ): AsyncGenerator<ListTasksResponse, void, undefined> {
    let pageToken = "";
    do {
      const request = create(ListTasksRequestSchema, { filter, view, pageSize, pageToken });
      const page = await this.unary(options, (call) => this.tasks.listTasks(request, call));
      yield page;
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
  }

  /** One unary call with the deadline, the typed error and the UNAVAILABLE retries. */
  private async unary<T>(options: CallOpts, call: (callOptions: CallOptions) => Promise<T>): Promise<T> {
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    for (let attempt = 1; ; attempt++) {
      try {
        return await call({ timeoutMs, signal: options.signal });
      } catch (error) {
        const tetherError = TetherError.from(error);
        if (tetherError.code !== Code.Unavailable || attempt >= this.retry.maxAttempts || options.signal?.aborted) {
          throw tetherError;
        }
        const delay = Math.max(backoffDelayMs(attempt, this.retry), tetherError.retryDelayMs ?? 0);
        await sleep(delay, options.signal).catch(() => {
          throw tetherError;
        });
      }
    }
  }
}

function required<T>(value: T | undefined, what: string): T {
  if (value === undefined) {
    throw new TetherError({ code: Code.Internal, message: `the server sent no ${what}` });
  }
  return value;
}
