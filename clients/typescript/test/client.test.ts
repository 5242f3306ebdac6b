// The client against a real tether-server (2 engines, embedded cluster): submit,
// watch, list, interrupt, cluster, idempotency and typed errors.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";
import {
  AttemptEnding,
  Code,
  TaskEventType,
  TaskState,
  TaskView,
  TetherClient,
  TetherError,
  isTetherError,
  stateName,
  taskResult,
  type Task,
  type WatchItem,
} from "../src/index.js";
import { TetherServer } from "./server.js";

describe("TetherClient against a real server", { timeout: 300_000 }, () => {
  let server: TetherServer;
  let client: TetherClient;

  before(async () => {
    server = await TetherServer.start();
    client = new TetherClient(server.address, { timeoutMs: 10_000 });
  });

  after(async () => {
    client?.close();
    await server?.dispose();
  });

  async function events(name: string, view = TaskView.BASIC): Promise<WatchItem[]> {
    const items: WatchItem[] = [];
    for await (const item of client.watch({ name, sendInitialState: true, view })) {
      items.push(item);
    }
    return items;
  }

  function lastTask(items: WatchItem[]): Task {
    const last = items.at(-1);
    assert.ok(last?.kind === "event", "the watch yielded at least one event");
    return last.task;
  }

  test("submit demo.echo and watch it to SUCCEEDED with its result", { timeout: 60_000 }, async () => {
    const { task, deduplicated } = await client.submit("demo.echo", { args: { value: "hi" }, labels: { suite: "ts" } });
    assert.match(task.name, /^tasks\//);
    assert.equal(deduplicated, false);
    assert.equal(task.task, "demo.echo");

    const items = await events(task.name, TaskView.FULL);
    const final = lastTask(items);
    assert.equal(stateName(final.state), "SUCCEEDED");
    assert.equal(taskResult(final), "hi");
    const revs = items.flatMap((item) => (item.kind === "event" ? [item.revision] : []));
    assert.deepEqual(revs, [...revs].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)), "revisions increase");
    assert.equal(new Set(revs).size, revs.length, "no revision twice");

    const fetched = await client.get(task.name);
    assert.equal(fetched.state, TaskState.SUCCEEDED);
    assert.equal(taskResult(fetched), "hi");
    assert.deepEqual(await client.wait(task.name).then(taskResult), "hi");
  });

  test("list finds a submitted task, across pages", { timeout: 60_000 }, async () => {
    const label = randomUUID();
    const names: string[] = [];
    for (let i = 0; i < 3; i++) {
      names.push((await client.submit("demo.echo", { args: { value: i }, labels: { batch: label } })).task.name);
    }
    const listed: string[] = [];
    for await (const task of client.list({ filter: { labels: { batch: label } }, pageSize: 2 })) {
      listed.push(task.name);
    }
    assert.deepEqual(listed, names, "oldest first, every page");

    const everything: string[] = [];
    for await (const task of client.list({ filter: { tasks: ["demo.echo"] } })) {
      everything.push(task.name);
    }
    for (const name of names) {
      assert.ok(everything.includes(name), `${name} is listed`);
    }
    const page = await client.listPages({ filter: { labels: { batch: label } } }).next();
    assert.ok(!page.done && page.value.resumeToken !== "", "a listing hands out a resume token");

    const byName: string[] = [];
    for await (const task of client.list({ filter: { names: [names[2]!, names[0]!] } })) {
      byName.push(task.name);
    }
    assert.deepEqual(byName, [names[0], names[2]], "a names filter lists exactly those tasks");
  });

  test("interrupt a running demo.sleep ends it INTERRUPTED", { timeout: 90_000 }, async () => {
    const { task } = await client.submit("demo.sleep", { args: { seconds: 60 } });
    const items: WatchItem[] = [];
    let interrupted = false;
    for await (const item of client.watch({ name: task.name, sendInitialState: true })) {
      items.push(item);
      if (!interrupted && item.kind === "event" && item.task.state === TaskState.RUNNING) {
        interrupted = true;
        const answer = await client.interrupt(task.name, { reason: "test", graceSeconds: 2 });
        assert.ok(
          [TaskState.INTERRUPTING, TaskState.INTERRUPTED].includes(answer.task.state),
          `answer is ${stateName(answer.task.state)}`,
        );
      }
    }
    assert.ok(interrupted, "the task reached RUNNING");
    const final = lastTask(items);
    assert.equal(stateName(final.state), "INTERRUPTED");
    assert.equal(final.interrupt?.reason, "test");

    // Interrupting an ended task again is a no-op for INTERRUPTED (idempotent).
    const again = await client.interrupt(task.name);
    assert.equal(again.task.state, TaskState.INTERRUPTED);
  });

  test("interrupting a SUCCEEDED task is FAILED_PRECONDITION / TASK_ALREADY_TERMINAL", { timeout: 60_000 }, async () => {
    const { task } = await client.submit("demo.echo", { args: { value: 1 } });
    await client.wait(task.name);
    await assert.rejects(client.interrupt(task.name), (error: unknown) => {
      assert.ok(error instanceof TetherError);
      assert.equal(error.code, Code.FailedPrecondition);
      assert.equal(error.reason, "TASK_ALREADY_TERMINAL");
      return true;
    });
  });

  test("a retry policy runs a failing task again and every attempt is on the task", { timeout: 60_000 }, async () => {
    const { task } = await client.submit("demo.fail", {
      retry: { maxAttempts: 2, retryOn: ["TASK_RAISED"], initialBackoffSeconds: 0 },
      preemptible: true,
    });
    assert.equal(task.retry?.maxAttempts, 2);
    assert.equal(task.preemptible, true);
    const final = await client.wait(task.name);
    assert.equal(final.state, TaskState.FAILED);
    assert.equal(final.attempt, 2);
    assert.deepEqual(
      final.attempts.map((a) => [a.attempt, a.ending, a.reason]),
      [
        [1, AttemptEnding.RETRIED, "TASK_RAISED"],
        [2, AttemptEnding.FINAL, "TASK_RAISED"],
      ],
    );
  });

  test("a bad retry policy is INVALID_ARGUMENT naming the field", async () => {
    await assert.rejects(client.submit("demo.echo", { retry: { maxAttempts: 2, retryOn: ["INTERRUPTED"] } }), (error: unknown) => {
      assert.ok(error instanceof TetherError, String(error));
      assert.equal(error.reason, "INVALID_RETRY_POLICY");
      assert.ok(error.violations.some((v) => v.field === "retry.retry_on"), JSON.stringify(error.violations));
      return true;
    });
  });

  test("an unknown task name is INVALID_ARGUMENT with reason UNKNOWN_TASK", async () => {
    await assert.rejects(client.submit("no.such.task"), (error: unknown) => {
      assert.ok(error instanceof TetherError, String(error));
      assert.equal(error.code, Code.InvalidArgument);
      assert.equal(error.codeName, "INVALID_ARGUMENT");
      assert.equal(error.reason, "UNKNOWN_TASK");
      assert.equal(error.domain, "tether.dev");
      return true;
    });
  });

  test("a request with a wrong field carries BadRequest field violations", async () => {
    await assert.rejects(client.submit(""), (error: unknown) => {
      assert.ok(error instanceof TetherError, String(error));
      assert.equal(error.code, Code.InvalidArgument);
      assert.ok(error.violations.some((v) => v.field === "task"), JSON.stringify(error.violations));
      return true;
    });
  });

  test('GetTask of "tasks/nope" is NOT_FOUND with reason TASK_NOT_FOUND', async () => {
    await assert.rejects(client.get("tasks/nope"), (error: unknown) => {
      assert.ok(isTetherError(error, "TASK_NOT_FOUND"), String(error));
      assert.equal(error.code, Code.NotFound);
      return true;
    });
  });

  test("a repeated request_id returns the first task (deduplicated)", async () => {
    const requestId = randomUUID();
    const first = await client.submit("demo.echo", { args: { value: "once" }, requestId });
    const second = await client.submit("demo.echo", { args: { value: "once" }, requestId });
    assert.equal(second.task.name, first.task.name);
    assert.equal(second.deduplicated, true);
    await assert.rejects(
      client.submit("demo.echo", { args: { value: "other" }, requestId }),
      (error: unknown) => error instanceof TetherError && error.code === Code.AlreadyExists,
    );
  });

  test("cluster() reports the engines and the registered tasks", async () => {
    const cluster = await client.cluster();
    assert.equal(cluster.targetSize, 2);
    assert.ok(cluster.registeredTasks.includes("demo.echo"), cluster.registeredTasks.join(","));
    assert.ok(cluster.engines.length >= 2);
  });

  test("a filter watch yields live events for matching tasks only", { timeout: 60_000 }, async () => {
    const label = randomUUID();
    const first = await client.listPages({ filter: { labels: { w: label } } }).next();
    assert.ok(!first.done);
    const watch = client.watch({ filter: { labels: { w: label } }, resumeToken: first.value.resumeToken });
    await client.submit("demo.echo", { args: { value: "other" } });
    const { task } = await client.submit("demo.echo", { args: { value: "mine" }, labels: { w: label } });
    for await (const item of watch) {
      assert.ok(item.kind === "event");
      assert.equal(item.task.name, task.name);
      assert.notEqual(item.type, TaskEventType.SNAPSHOT);
      if (item.task.state === TaskState.SUCCEEDED) {
        break;
      }
    }
  });
});
