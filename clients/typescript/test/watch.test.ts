// Unit tests of TaskWatch's stream logic against a scripted backend (no server):
// reconnection with the last token, checkpoints, de-duplication, single-task end,
// expired tokens and the snapshot phase.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { TaskSchema, TaskState, TaskView, type Task } from "../src/gen/tether/v1/task_pb.js";
import {
  ListTasksResponseSchema,
  StreamTaskStatusResponseSchema,
  TaskEventType,
  type ListTasksResponse,
  type StreamTaskStatusRequest,
  type StreamTaskStatusResponse,
} from "../src/gen/tether/v1/task_service_pb.js";
import { TaskWatch, TetherError, type WatchBackend, type WatchItem } from "../src/index.js";

/** One scripted connection: the messages the server sends, then how the stream ends. */
interface Connection {
  messages: StreamTaskStatusResponse[];
  end?: Error;
}

function event(
  revision: number,
  name = "tasks/a",
  state = TaskState.RUNNING,
  type = TaskEventType.STATE_CHANGED,
): StreamTaskStatusResponse {
  return create(StreamTaskStatusResponseSchema, {
    resumeToken: `t${revision}`,
    event: {
      case: "taskEvent",
      value: { type, revision: BigInt(revision), task: { name, state, revision: BigInt(revision) } },
    },
  });
}

function snapshot(revision: number, name: string, token: string): StreamTaskStatusResponse {
  const message = event(revision, name, TaskState.RUNNING, TaskEventType.SNAPSHOT);
  message.resumeToken = token;
  return message;
}

function checkpoint(token: string, initialStateComplete = false): StreamTaskStatusResponse {
  return create(StreamTaskStatusResponseSchema, {
    resumeToken: token,
    event: { case: "checkpoint", value: { initialStateComplete } },
  });
}

function statusError(code: Code, reason = "", domain = "tether.dev"): ConnectError {
  const details = reason ? [{ desc: ErrorInfoSchema, value: { reason, domain } }] : [];
  return new ConnectError("scripted", code, undefined, details);
}

class ScriptedBackend implements WatchBackend {
  readonly requests: StreamTaskStatusRequest[] = [];
  readonly signals: AbortSignal[] = [];
  listCalls = 0;
  constructor(
    private readonly connections: Connection[],
    private readonly listing: ListTasksResponse[] = [],
    private readonly current: Task = create(TaskSchema, {}),
  ) {}

  async *stream(request: StreamTaskStatusRequest, signal: AbortSignal): AsyncIterable<StreamTaskStatusResponse> {
    this.requests.push(request);
    this.signals.push(signal);
    const connection = this.connections.shift();
    if (connection === undefined) {
      throw new Error("the test script has no more connections");
    }
    for (const message of connection.messages) {
      signal.throwIfAborted();
      yield message;
    }
    if (connection.end) {
      throw connection.end;
    }
  }

  async *listPages(): AsyncIterable<ListTasksResponse> {
    this.listCalls += 1;
    yield* this.listing;
  }

  async getTask(): Promise<Task> {
    return this.current;
  }
}

const fast = { initialDelayMs: 1, maxDelayMs: 2 };

async function collect(watch: TaskWatch): Promise<WatchItem[]> {
  const items: WatchItem[] = [];
  for await (const item of watch) {
    items.push(item);
  }
  return items;
}

function revisions(items: WatchItem[]): number[] {
  return items.flatMap((item) => (item.kind === "event" ? [Number(item.revision)] : []));
}

describe("TaskWatch", () => {
  test("reconnects after UNAVAILABLE with the token of the last message, checkpoints included", async () => {
    const backend = new ScriptedBackend([
      { messages: [event(1), checkpoint("c1")], end: statusError(Code.Unavailable, "SHUTTING_DOWN") },
      { messages: [event(2), event(3, "tasks/a", TaskState.SUCCEEDED)] },
    ]);
    const watch = new TaskWatch(backend, { name: "tasks/a", reconnect: fast });
    const items = await collect(watch);
    assert.deepEqual(revisions(items), [1, 2, 3]);
    assert.equal(backend.requests[1]?.resumeToken, "c1");
    assert.equal(watch.reconnects, 1);
    assert.equal(watch.resumeToken, "t3");
  });

  test("never yields a revision twice when the server replays too much", async () => {
    const backend = new ScriptedBackend([
      { messages: [event(1), event(2)], end: statusError(Code.Unavailable) },
      { messages: [event(2), event(1), event(3, "tasks/a", TaskState.FAILED)] },
    ]);
    const items = await collect(new TaskWatch(backend, { name: "tasks/a", reconnect: fast }));
    assert.deepEqual(revisions(items), [1, 2, 3]);
  });

  test("a single-task watch ends after the terminal event without waiting for the stream", async () => {
    const backend = new ScriptedBackend([
      { messages: [event(1), event(2, "tasks/a", TaskState.INTERRUPTED), event(3)] },
    ]);
    const items = await collect(new TaskWatch(backend, { name: "tasks/a" }));
    assert.deepEqual(revisions(items), [1, 2]);
    assert.equal(backend.signals[0]?.aborted, true, "the stream is cancelled");
  });

  test("a filter watch treats a stream that ends with OK as a break and resumes", async () => {
    const backend = new ScriptedBackend([{ messages: [event(1)] }, { messages: [event(2)], end: statusError(Code.NotFound, "X") }]);
    const watch = new TaskWatch(backend, { filter: { tasks: ["demo.echo"] }, reconnect: fast });
    const items: WatchItem[] = [];
    await assert.rejects(async () => {
      for await (const item of watch) items.push(item);
    }, (error: unknown) => error instanceof TetherError && error.code === Code.NotFound);
    assert.deepEqual(revisions(items), [1, 2]);
    assert.equal(backend.requests[1]?.resumeToken, "t1");
    assert.deepEqual(backend.requests[1]?.filter?.tasks, ["demo.echo"]);
  });

  test("an expired token re-lists and yields a reset, then goes on from the listing's token", async () => {
    const listed = create(TaskSchema, { name: "tasks/a", state: TaskState.RUNNING, revision: 40n });
    const backend = new ScriptedBackend(
      [
        { messages: [event(5)], end: statusError(Code.Unavailable) },
        { messages: [], end: statusError(Code.OutOfRange, "RESUME_TOKEN_EXPIRED") },
        { messages: [event(41)], end: statusError(Code.PermissionDenied, "STOP") },
      ],
      [
        create(ListTasksResponseSchema, { tasks: [listed], nextPageToken: "p2", resumeToken: "L1" }),
        create(ListTasksResponseSchema, { tasks: [], resumeToken: "L2" }),
      ],
    );
    const items: WatchItem[] = [];
    await assert.rejects(async () => {
      for await (const item of new TaskWatch(backend, { reconnect: fast })) items.push(item);
    }, (error: unknown) => error instanceof TetherError && error.reason === "STOP");
    assert.deepEqual(
      items.map((item) => item.kind),
      ["event", "reset", "event"],
    );
    const reset = items[1];
    assert.ok(reset?.kind === "reset");
    assert.equal(reset.tasks[0]?.name, "tasks/a");
    assert.equal(reset.resumeToken, "L1", "the first page's token precedes the whole listing");
    assert.equal(backend.requests[2]?.resumeToken, "L1");
  });

  test('onExpired: "throw" surfaces the expired token as a TetherError', async () => {
    const backend = new ScriptedBackend([{ messages: [], end: statusError(Code.OutOfRange, "RESUME_TOKEN_EXPIRED") }]);
    await assert.rejects(
      collect(new TaskWatch(backend, { resumeToken: "old", onExpired: "throw" })),
      (error: unknown) => error instanceof TetherError && error.reason === "RESUME_TOKEN_EXPIRED" && error.code === Code.OutOfRange,
    );
    assert.equal(backend.listCalls, 0);
  });

  test("a single-task reset ends the watch when the task is already terminal", async () => {
    const done = create(TaskSchema, { name: "tasks/a", state: TaskState.SUCCEEDED, revision: 9n });
    const backend = new ScriptedBackend(
      [{ messages: [], end: statusError(Code.OutOfRange, "RESUME_TOKEN_EXPIRED") }],
      [create(ListTasksResponseSchema, { resumeToken: "L" })],
      done,
    );
    const items = await collect(new TaskWatch(backend, { name: "tasks/a", resumeToken: "old", view: TaskView.FULL }));
    assert.equal(items.length, 1);
    assert.ok(items[0]?.kind === "reset");
    assert.equal(items[0].tasks[0]?.state, TaskState.SUCCEEDED);
  });

  test("a break during the snapshot phase asks for the initial state again without repeating snapshots", async () => {
    const backend = new ScriptedBackend([
      { messages: [snapshot(7, "tasks/a", "s"), snapshot(3, "tasks/b", "s")], end: statusError(Code.Unavailable) },
      {
        messages: [snapshot(7, "tasks/a", "s"), snapshot(3, "tasks/b", "s"), snapshot(8, "tasks/c", "s"), checkpoint("c8", true), event(9)],
        end: statusError(Code.Unavailable),
      },
      { messages: [], end: statusError(Code.InvalidArgument, "STOP") },
    ]);
    const items: WatchItem[] = [];
    await assert.rejects(async () => {
      for await (const item of new TaskWatch(backend, { sendInitialState: true, reconnect: fast })) items.push(item);
    });
    assert.deepEqual(revisions(items), [7, 3, 8, 9]);
    assert.equal(backend.requests[1]?.sendInitialState, true);
    assert.equal(backend.requests[1]?.resumeToken, "");
    assert.equal(backend.requests[2]?.sendInitialState, false);
    assert.equal(backend.requests[2]?.resumeToken, "t9");
  });

  test("gives up after maxAttempts consecutive failures with the last error", async () => {
    const backend = new ScriptedBackend([
      { messages: [], end: statusError(Code.Unavailable, "A") },
      { messages: [], end: statusError(Code.Unavailable, "B") },
    ]);
    await assert.rejects(
      collect(new TaskWatch(backend, { reconnect: { ...fast, maxAttempts: 1 } })),
      (error: unknown) => error instanceof TetherError && error.reason === "B",
    );
  });

  test("close() and an aborted signal end the iteration quietly", async () => {
    const controller = new AbortController();
    const backend = new ScriptedBackend([{ messages: [event(1), event(2), event(3)] }]);
    const items: WatchItem[] = [];
    for await (const item of new TaskWatch(backend, { signal: controller.signal })) {
      items.push(item);
      controller.abort();
    }
    assert.deepEqual(revisions(items), [1]);
    assert.equal(backend.signals[0]?.aborted, true);
  });

  test("name and filter together are refused", () => {
    assert.throws(() => new TaskWatch(new ScriptedBackend([]), { name: "tasks/a", filter: {} }), TypeError);
  });
});
