// A filter watch survives a server restart in the middle of a run: the server is
// stopped with SIGTERM and started again on the same port and data directory
// while tasks keep coming; the watch must deliver every event exactly once, in
// order, compared with a fresh replay of the log from before the first task.
// And a token from another controller epoch turns into a reset.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { Code, TaskState, TetherClient, TetherError, isTerminal, stateName, type TaskChange } from "../src/index.js";
import { TetherServer } from "./server.js";

async function until(condition: () => boolean, timeoutMs: number, what: () => string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function describeEvent(item: TaskChange): string {
  return `${item.revision} ${item.task.name} ${stateName(item.task.state)} type=${item.type}`;
}

describe("a filter watch across a server restart", { timeout: 400_000 }, () => {
  let server: TetherServer;
  let client: TetherClient;

  before(async () => {
    server = await TetherServer.start();
    // Generous unary retries: one submission is made while the server is down.
    client = new TetherClient(server.address, {
      timeoutMs: 10_000,
      retry: { maxAttempts: 200, initialDelayMs: 100, maxDelayMs: 500 },
    });
  });

  after(async () => {
    client?.close();
    await server?.dispose();
  });

  test("delivers every event exactly once, in order", { timeout: 360_000 }, async (t) => {
    const filter = { labels: { restart: randomUUID() } };
    const labels = filter.labels;
    const first = await client.listPages({ filter }).next();
    assert.ok(!first.done);
    const startToken = first.value.resumeToken;

    const breaks: string[] = [];
    const watch = client.watch({
      filter,
      resumeToken: startToken,
      reconnect: { initialDelayMs: 100, maxDelayMs: 1000 },
      onReconnect: ({ error, attempt }) => breaks.push(`${attempt}: ${error?.message ?? "stream ended"}`),
    });
    const seen: TaskChange[] = [];
    const states = new Map<string, TaskState>();
    const consumer = (async () => {
      for await (const item of watch) {
        assert.equal(item.kind, "event", "no reset: the restarted server keeps the log");
        if (item.kind === "event") {
          seen.push(item);
          states.set(item.task.name, item.task.state);
        }
      }
    })();
    const allTerminal = (names: string[]) => () => names.every((name) => isTerminal(states.get(name) ?? TaskState.UNSPECIFIED));
    const pendingOf = (names: string[]) => () =>
      names.filter((name) => !isTerminal(states.get(name) ?? TaskState.UNSPECIFIED)).join(", ");

    // Before the restart: quick tasks that finish, and one still running when the server goes.
    const submitted: string[] = [];
    for (let i = 0; i < 3; i++) {
      submitted.push((await client.submit("demo.echo", { args: { value: `before ${i}` }, labels })).task.name);
    }
    const sleeper = (await client.submit("demo.sleep", { args: { seconds: 15 }, labels })).task.name;
    submitted.push(sleeper);
    await until(allTerminal(submitted.slice(0, 3)), 60_000, pendingOf(submitted.slice(0, 3)));
    await until(() => states.get(sleeper) === TaskState.RUNNING, 60_000, () => `${sleeper} RUNNING`);
    const beforeRestart = seen.length;

    // Restart on the same port and data directory; one submission is in flight meanwhile
    // (it is retried with the same request_id until the new server takes it).
    const stopping = server.stop();
    const duringDowntime = client.submit("demo.echo", { args: { value: "downtime" }, labels });
    await stopping;
    await server.restart();

    for (let i = 0; i < 3; i++) {
      submitted.push((await client.submit("demo.echo", { args: { value: `after ${i}` }, labels })).task.name);
    }
    submitted.push((await duringDowntime).task.name);
    await until(allTerminal(submitted), 120_000, pendingOf(submitted));
    watch.close();
    await consumer;

    t.diagnostic(`${seen.length} events (${beforeRestart} before the restart), ${watch.reconnects} reconnects`);
    for (const line of breaks.slice(0, 5)) {
      t.diagnostic(`break ${line}`);
    }
    assert.ok(watch.reconnects >= 1, "the watch reconnected");
    assert.ok(seen.length > beforeRestart, "events arrived after the restart");
    for (let i = 1; i < seen.length; i++) {
      assert.ok(seen[i]!.revision > seen[i - 1]!.revision, `revisions strictly increase at ${describeEvent(seen[i]!)}`);
    }

    // A fresh replay of the log from the same starting point must match event for event.
    const lastRevision = seen.at(-1)!.revision;
    const replay: TaskChange[] = [];
    for await (const item of client.watch({ filter, resumeToken: startToken })) {
      assert.ok(item.kind === "event");
      replay.push(item);
      if (item.revision >= lastRevision) {
        break;
      }
    }
    assert.deepEqual(seen.map(describeEvent), replay.map(describeEvent));

    // The submission retried across the restart created one task, not two.
    const listed: string[] = [];
    for await (const task of client.list({ filter })) {
      listed.push(task.name);
    }
    assert.deepEqual([...listed].sort(), [...submitted].sort());
  });
});

describe("a token from another controller epoch", { timeout: 300_000 }, () => {
  let first: TetherServer | undefined;
  let second: TetherServer | undefined;

  after(async () => {
    await Promise.all([first?.dispose(), second?.dispose()]);
  });

  test("yields a reset with the current tasks, then the events after it", { timeout: 240_000 }, async () => {
    [first, second] = await Promise.all([TetherServer.start({ engines: 1 }), TetherServer.start({ engines: 1 })]);
    const a = new TetherClient(first.address);
    const b = new TetherClient(second.address);
    try {
      const labels = { epoch: randomUUID() };
      const foreign = await a.listPages({ filter: { labels } }).next();
      assert.ok(!foreign.done);
      const existing = (await b.submit("demo.echo", { args: { value: "old" }, labels })).task.name;
      await b.wait(existing);

      await assert.rejects(
        async () => {
          for await (const item of b.watch({ filter: { labels }, resumeToken: foreign.value.resumeToken, onExpired: "throw" })) {
            void item;
          }
        },
        (error: unknown) => error instanceof TetherError && error.code === Code.OutOfRange && error.reason === "RESUME_TOKEN_EXPIRED",
      );

      const watch = b.watch({ filter: { labels }, resumeToken: foreign.value.resumeToken });
      let fresh = "";
      const kinds: string[] = [];
      for await (const item of watch) {
        kinds.push(item.kind);
        if (item.kind === "reset") {
          assert.equal(item.reason, "RESUME_TOKEN_EXPIRED");
          assert.deepEqual(
            item.tasks.map((task) => [task.name, task.state]),
            [[existing, TaskState.SUCCEEDED]],
          );
          fresh = (await b.submit("demo.echo", { args: { value: "new" }, labels })).task.name;
        } else {
          assert.equal(item.task.name, fresh, "only changes after the reset follow it");
          if (item.task.state === TaskState.SUCCEEDED) {
            break;
          }
        }
      }
      assert.equal(kinds[0], "reset");
      assert.equal(kinds.filter((kind) => kind === "reset").length, 1);
    } finally {
      a.close();
      b.close();
    }
  });
});
