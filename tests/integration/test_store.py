"""SqliteStore against real SQLite files: durability, retention, atomicity, concurrency."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from tether_server.core.model import (
    AttemptEnding,
    ErrorReason,
    GracePeriods,
    InterruptCause,
    InterruptRecord,
    RetryPolicy,
    Task,
    TaskAttempt,
    TaskError,
    TaskState,
)
from tether_server.store import (
    IDEMPOTENCY_TTL_SECONDS,
    SCHEMA_VERSION,
    IdempotencyRecord,
    Loaded,
    SqliteStore,
    StoredEvent,
    StoreError,
    StoreWriteError,
    WriteBatch,
)
from tether_server.store.codec import task_to_dict

DAY = 86400.0


def make_task(n: int, **changes: object) -> Task:
    task = Task(id=f"t{n}", task="demo.sleep", args={"seconds": n}, seq=n, create_time=1000.0 + n)
    for name, value in changes.items():
        setattr(task, name, value)
    return task


def make_event(
    revision: int, task: Task, *, at: float | None = None, chunk: str = ""
) -> StoredEvent:
    return StoredEvent(
        revision=revision,
        kind=2,
        task_id=task.id,
        time=time.time() if at is None else at,
        chunk=chunk,
        task=task,
    )


def event_batch(revision: int, *, at: float | None = None) -> WriteBatch:
    task = make_task(revision, revision=revision)
    return WriteBatch(tasks=[task], events=[make_event(revision, task, at=at)])


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "tether.db"


@contextlib.contextmanager
def opened(path: Path, **options: Any) -> Iterator[SqliteStore]:
    store = SqliteStore(path, **options)
    store.open()
    try:
        yield store
    finally:
        store.close()


def reload(path: Path, **options: Any) -> Loaded:
    """What a restarted controller would load from ``path``."""
    store = SqliteStore(path, **options)
    try:
        return store.open()
    finally:
        store.close()


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock from another connection: the store's writer blocks on it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


# --------------------------------------------------------------------------- open / reload
def test_a_new_file_loads_empty_and_counts_from_one(db_path: Path) -> None:
    loaded = reload(db_path)
    assert (loaded.tasks, loaded.events, loaded.idempotency) == ([], [], {})
    assert (loaded.next_revision, loaded.next_seq) == (1, 1)


def test_tasks_events_checkpoints_and_keys_survive_close_and_reopen(db_path: Path) -> None:
    running = make_task(
        1,
        state=TaskState.INTERRUPTED,
        labels={"team": "llm"},
        required_tags=("gpu",),
        timeout=float("inf"),
        interrupt=InterruptRecord("alice", "stop", 5.0, InterruptCause.USER, GracePeriods(1, 2, 3)),
        error=TaskError(ErrorReason.INTERRUPTED, "stopped"),
        revision=2,
    )
    pending = make_task(2, revision=3)
    events = [
        make_event(1, make_task(1), at=10.0 + time.time()),
        make_event(2, running, chunk="tokens…"),
        make_event(3, pending),
    ]
    key = IdempotencyRecord("req-1", "SubmitTask", "abc", "t1", time.time())
    with opened(db_path) as store:
        store.submit(
            WriteBatch(
                tasks=[pending, running],
                events=events,
                idempotency=[key],
                checkpoints=[("t1", '{"step": 7}')],
            )
        ).result(timeout=5)

    reopened = SqliteStore(db_path)
    loaded = reopened.open()
    try:
        assert loaded.tasks == [pending]  # live tasks only: finished ones are read on demand
        assert reopened.get_task("t1") == running
        assert reopened.get_task("nope") is None
        assert loaded.events == events
        assert loaded.idempotency == {"req-1": key}
        assert reopened.get_checkpoint("t1") == '{"step": 7}'
        assert reopened.get_checkpoint("t2") is None
        assert (loaded.next_revision, loaded.next_seq) == (4, 3)
    finally:
        reopened.close()


def test_a_task_upsert_keeps_only_the_last_version(db_path: Path) -> None:
    with opened(db_path) as store:
        store.submit(WriteBatch(tasks=[make_task(1)]))
        store.submit(WriteBatch(tasks=[make_task(1, state=TaskState.RUNNING, engine_id=0)]))
    assert reload(db_path).tasks == [make_task(1, state=TaskState.RUNNING, engine_id=0)]


def test_the_epoch_is_stable_across_reopen(db_path: Path) -> None:
    epochs = [reload(db_path).epoch for _ in range(3)]
    assert len(set(epochs)) == 1
    assert len(epochs[0]) == 32


def test_a_new_file_gets_a_new_epoch(tmp_path: Path) -> None:
    assert reload(tmp_path / "a.db").epoch != reload(tmp_path / "b.db").epoch


def test_the_file_is_in_wal_mode_with_the_current_schema_version(db_path: Path) -> None:
    with opened(db_path):
        assert rows(db_path, "PRAGMA journal_mode") == [("wal",)]
        assert rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_a_file_from_a_newer_schema_is_refused(db_path: Path) -> None:
    with opened(db_path):
        pass
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="schema version"):
        SqliteStore(db_path).open()


# --------------------------------------------------------------------------- retention
def test_events_beyond_the_count_limit_are_pruned_while_running(db_path: Path) -> None:
    with opened(db_path, retain_events=10) as store:
        for revision in range(1, 26):
            store.submit(event_batch(revision))
        store.flush()
        assert rows(db_path, "SELECT min(revision), count(*) FROM events") == [(16, 10)]


def test_events_beyond_the_count_limit_are_pruned_at_open(db_path: Path) -> None:
    with opened(db_path) as store:
        for revision in range(1, 26):
            store.submit(event_batch(revision))
    loaded = reload(db_path, retain_events=10)
    assert [e.revision for e in loaded.events] == list(range(16, 26))
    assert len(loaded.tasks) == 25  # retention applies to the log, never to task records


def test_events_older_than_the_age_limit_are_pruned(db_path: Path) -> None:
    now = time.time()
    with opened(db_path, retain_seconds=DAY, prune_interval=0) as store:
        for revision, age in enumerate([3 * DAY, 2 * DAY, DAY + 60, 60, 1], start=1):
            store.submit(event_batch(revision, at=now - age))
        store.flush()
        assert rows(db_path, "SELECT revision FROM events") == [(4,), (5,)]


def test_revisions_are_never_reused_after_every_event_was_pruned(db_path: Path) -> None:
    with opened(db_path) as store:
        store.submit(
            WriteBatch(events=[make_event(r, make_task(1), at=0.0) for r in range(1, 8)])
        ).result(timeout=5)
    loaded = reload(db_path, retain_seconds=DAY)
    assert loaded.events == []
    assert loaded.next_revision == 8


def test_idempotency_keys_older_than_a_day_are_dropped(db_path: Path) -> None:
    now = time.time()
    fresh = IdempotencyRecord("fresh", "SubmitTask", "f1", "t1", now - 60)
    stale = IdempotencyRecord("stale", "SubmitTask", "f2", "t2", now - IDEMPOTENCY_TTL_SECONDS - 60)
    with opened(db_path) as store:
        store.submit(WriteBatch(idempotency=[fresh, stale])).result(timeout=5)
    assert reload(db_path).idempotency == {"fresh": fresh}


# --------------------------------------------------------------------------- atomicity
def test_a_failing_batch_is_rolled_back_and_fails_its_future(db_path: Path) -> None:
    with opened(db_path) as store:
        store.submit(event_batch(1)).result(timeout=5)
        # Revision 1 again: the event insert fails after the task upsert succeeded.
        duplicate = WriteBatch(
            tasks=[make_task(99)],
            events=[make_event(1, make_task(99))],
            checkpoints=[("t99", "{}")],
        )
        with pytest.raises(StoreWriteError) as failure:
            store.submit(duplicate).result(timeout=5)
        assert isinstance(failure.value.__cause__, sqlite3.IntegrityError)

        store.submit(event_batch(2)).result(timeout=5)
        assert store.get_checkpoint("t99") is None

    assert rows(db_path, "PRAGMA integrity_check") == [("ok",)]
    loaded = reload(db_path)
    assert [t.id for t in loaded.tasks] == ["t1", "t2"]
    assert [e.revision for e in loaded.events] == [1, 2]


def test_a_failing_batch_does_not_fail_the_others_committed_with_it(db_path: Path) -> None:
    with opened(db_path) as store:
        store.submit(event_batch(1)).result(timeout=5)
        with write_lock_held(db_path):  # the batches below queue up into one group
            good = [store.submit(event_batch(revision)) for revision in range(2, 102)]
            bad = store.submit(
                WriteBatch(tasks=[make_task(999)], events=[make_event(1, make_task(999))])
            )
            good += [store.submit(event_batch(revision)) for revision in range(102, 202)]
        for future in good:
            future.result(timeout=5)
        with pytest.raises(StoreWriteError):
            bad.result(timeout=5)
        assert rows(db_path, "SELECT count(*), max(seq) FROM tasks") == [(201, 201)]


def test_the_last_of_many_upserts_of_a_task_in_one_group_wins(db_path: Path) -> None:
    with opened(db_path) as store:
        with write_lock_held(db_path):
            for attempt in range(300):
                store.submit(WriteBatch(tasks=[make_task(1, attempt=attempt)]))
        store.flush(timeout=5)
    assert reload(db_path).tasks == [make_task(1, attempt=299)]


def test_a_batch_that_cannot_be_serialized_fails_its_future_and_writes_nothing(
    db_path: Path,
) -> None:
    with opened(db_path) as store:
        future = store.submit(WriteBatch(tasks=[make_task(1, args={"x": object()})]))
        with pytest.raises(StoreWriteError, match="serialize"):
            future.result(timeout=5)
        store.flush()
        assert rows(db_path, "SELECT count(*) FROM tasks") == [(0,)]


def test_a_submitted_write_cannot_be_cancelled(db_path: Path) -> None:
    with opened(db_path) as store, write_lock_held(db_path):
        future = store.submit(event_batch(1))
        assert not future.cancel()
    assert future.result(timeout=5) is None


# --------------------------------------------------------------------------- concurrency
def test_concurrent_submits_are_group_committed(db_path: Path) -> None:
    threads, per_thread = 8, 250
    futures: list[Future[None]] = []
    with opened(db_path) as store:
        commits_before = store.commits

        def submit_many(offset: int) -> None:
            for i in range(per_thread):
                futures.append(store.submit(event_batch(offset * per_thread + i + 1)))

        with write_lock_held(db_path):
            workers = [threading.Thread(target=submit_many, args=(n,)) for n in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        for future in futures:
            future.result(timeout=10)
        # At most the one batch the writer was already holding, then everything else at once.
        assert store.commits - commits_before <= 2
        assert rows(db_path, "SELECT count(*) FROM events") == [(threads * per_thread,)]


def test_close_writes_everything_still_queued(db_path: Path) -> None:
    store = SqliteStore(db_path)
    store.open()
    futures = [store.submit(event_batch(revision)) for revision in range(1, 1001)]
    store.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert rows(db_path, "SELECT count(*) FROM events") == [(1000,)]


def test_close_is_idempotent_and_later_submits_are_refused(db_path: Path) -> None:
    store = SqliteStore(db_path)
    store.open()
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.submit(event_batch(1))
    with pytest.raises(StoreError, match="closed"):
        store.get_checkpoint("t1")


def test_flush_times_out_while_the_writer_cannot_commit(db_path: Path) -> None:
    with opened(db_path) as store:
        with write_lock_held(db_path):
            store.submit(event_batch(1))
            with pytest.raises(TimeoutError):
                store.flush(timeout=0.05)
        store.flush(timeout=5)


def test_get_checkpoint_reads_committed_data_while_a_write_is_in_progress(db_path: Path) -> None:
    with opened(db_path) as store:
        store.submit(WriteBatch(checkpoints=[("t1", '{"step": 1}')])).result(timeout=5)
        with write_lock_held(db_path) as other_writer:
            other_writer.execute(
                "UPDATE checkpoints SET data = '{\"step\": 2}' WHERE task_id = 't1'"
            )
            started = time.monotonic()
            assert store.get_checkpoint("t1") == '{"step": 1}'
            assert time.monotonic() - started < 1.0  # did not wait for the write lock


def test_get_checkpoint_reads_while_the_writer_writes(db_path: Path) -> None:
    steps = 2000
    seen: list[int] = []
    with opened(db_path) as store:

        def write_checkpoints() -> None:
            for step in range(1, steps + 1):
                store.submit(
                    WriteBatch(
                        events=[make_event(step, make_task(1))],
                        checkpoints=[("t1", json.dumps({"step": step}))],
                    )
                )

        def read_checkpoint() -> None:
            text = store.get_checkpoint("t1")
            if text is not None:
                seen.append(json.loads(text)["step"])

        writer = threading.Thread(target=write_checkpoints)
        writer.start()
        while writer.is_alive():
            read_checkpoint()
        writer.join()
        store.flush(timeout=10)
        read_checkpoint()
    assert seen == sorted(seen)  # each read sees a committed state, never an older one
    assert seen[-1] == steps


# --------------------------------------------------------------------------- history on disk
def test_an_older_revision_of_a_task_never_overwrites_a_newer_one(db_path: Path) -> None:
    newer = make_task(1, state=TaskState.SUCCEEDED, revision=9)
    with opened(db_path) as store:
        store.submit(WriteBatch(tasks=[newer])).result(timeout=5)
        # A retried batch from before (revision 4) arrives after the newer row.
        store.submit(WriteBatch(tasks=[make_task(1, state=TaskState.RUNNING, revision=4)]))
        store.flush()
        assert store.get_task("t1") == newer


def test_open_loads_live_tasks_and_the_newest_events_only(db_path: Path) -> None:
    finished = [make_task(n, state=TaskState.SUCCEEDED, revision=n) for n in range(1, 6)]
    live = make_task(6, state=TaskState.PENDING, revision=6)
    with opened(db_path) as store:
        store.submit(
            WriteBatch(
                tasks=[*finished, live],
                events=[make_event(r, make_task(1)) for r in range(1, 31)],
            )
        ).result(timeout=5)
    loaded = reload(db_path, load_events=10)
    assert loaded.tasks == [live]
    assert [e.revision for e in loaded.events] == list(range(21, 31))
    assert loaded.first_revision == 1
    assert loaded.next_revision == 31


def test_list_tasks_pages_by_seq_narrowed_by_state_and_name(db_path: Path) -> None:
    tasks = [
        make_task(n, state=TaskState.SUCCEEDED if n % 2 else TaskState.FAILED) for n in range(1, 11)
    ]
    with opened(db_path) as store:
        store.submit(WriteBatch(tasks=tasks)).result(timeout=5)
        assert [t.seq for t in store.list_tasks(after_seq=0, limit=3)] == [1, 2, 3]
        assert [t.seq for t in store.list_tasks(after_seq=3, limit=3)] == [4, 5, 6]
        failed = store.list_tasks(after_seq=0, limit=100, states=["FAILED"])
        assert [t.seq for t in failed] == [2, 4, 6, 8, 10]
        assert store.list_tasks(after_seq=0, limit=100, task_names=["other"]) == []


def test_list_tasks_narrows_by_labels_through_the_label_index(db_path: Path) -> None:
    tasks = [
        make_task(n, labels={"team": "a" if n % 2 else "b", "shard": str(n % 3)})
        for n in range(1, 13)
    ]
    with opened(db_path) as store:
        store.submit(WriteBatch(tasks=tasks)).result(timeout=5)
        # Later records of the same tasks (attempt 1, another state) add no label rows.
        later = [
            make_task(n, labels=t.labels, attempt=1, revision=2) for n, t in enumerate(tasks, 1)
        ]
        store.submit(WriteBatch(tasks=later)).result(timeout=5)
        team_a = store.list_tasks(after_seq=0, limit=100, labels={"team": "a"})
        assert [t.seq for t in team_a] == [1, 3, 5, 7, 9, 11]
        both = store.list_tasks(after_seq=3, limit=2, labels={"team": "a", "shard": "2"})
        assert [t.seq for t in both] == [5, 11]
        assert store.list_tasks(after_seq=0, limit=100, labels={"team": "c"}) == []
    assert rows(db_path, "SELECT count(*) FROM task_labels") == [(24,)]
    plan = rows(
        db_path,
        "EXPLAIN QUERY PLAN SELECT seq FROM task_labels WHERE key = 'team' AND value = 'a'",
    )
    assert "USING PRIMARY KEY" in str(plan)  # the index, not a scan


def test_events_after_reads_a_range_of_the_log(db_path: Path) -> None:
    with opened(db_path) as store:
        store.submit(WriteBatch(events=[make_event(r, make_task(1)) for r in range(1, 21)])).result(
            timeout=5
        )
        assert [e.revision for e in store.events_after(5, before=9, limit=100)] == [6, 7, 8]
        assert [e.revision for e in store.events_after(0, before=99, limit=4)] == [1, 2, 3, 4]
        assert store.oldest_event_revision() == 1


def test_a_probe_writes_while_the_store_can(db_path: Path) -> None:
    with opened(db_path) as store:
        store.probe()
    assert rows(db_path, "SELECT count(*) FROM meta WHERE key = 'probe'") == [(1,)]


def test_a_file_that_is_not_a_database_is_refused_and_left_alone(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"not a database at all" * 50)
    before = db_path.read_bytes()
    with pytest.raises(StoreError, match="unreadable or corrupt"):
        SqliteStore(db_path).open()
    assert db_path.read_bytes() == before


def test_another_programs_database_is_refused_and_left_alone(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
        conn.commit()
    with pytest.raises(StoreError, match="something else"):
        SqliteStore(db_path).open()
    assert rows(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'") == [("photos",)]


def test_a_version_1_store_is_upgraded_with_task_revisions(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    from tether_server.store.schema import migrate_0_to_1

    task = make_task(1, state=TaskState.SUCCEEDED, revision=7)
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        migrate_0_to_1(conn)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO tasks (id, seq, state, task, data) VALUES (?, ?, ?, ?, ?)",
            (task.id, task.seq, task.state.name, task.task, json.dumps(task_to_dict(task))),
        )
    with opened(db_path) as store:
        assert store.get_task("t1") == task
    assert rows(db_path, "SELECT revision FROM tasks") == [(7,)]


def test_a_version_2_store_is_upgraded_with_its_labels_indexed(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    from tether_server.store.schema import migrate_0_to_1, migrate_1_to_2

    tasks = [make_task(1, labels={"team": "a"}), make_task(2, labels={"team": "b", "x": "y"})]
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        migrate_0_to_1(conn)
        migrate_1_to_2(conn)
        conn.execute("PRAGMA user_version = 2")
        for task in tasks:
            conn.execute(
                "INSERT INTO tasks (id, seq, state, task, revision, data)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (task.id, task.seq, task.state.name, task.task, 0, json.dumps(task_to_dict(task))),
            )
    with opened(db_path) as store:
        assert [t.id for t in store.list_tasks(after_seq=0, limit=9, labels={"team": "b"})] == [
            "t2"
        ]
    assert rows(db_path, "PRAGMA user_version") == [(3,)]
    assert sorted(rows(db_path, "SELECT key, value, seq FROM task_labels")) == [
        ("team", "a", 1),
        ("team", "b", 2),
        ("x", "y", 2),
    ]


def test_attempts_a_retry_policy_and_preemptible_survive_close_and_reopen(db_path: Path) -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=frozenset({ErrorReason.ENGINE_LOST}))
    attempts = [
        TaskAttempt(1, 0, 10.0, 12.0, AttemptEnding.PREEMPTED, "PREEMPTED", "stopped", "tasks/u"),
        TaskAttempt(2, 1, 13.0),
    ]
    task = make_task(1, retry=policy, preemptible=True, attempts=attempts, attempt=2)
    with opened(db_path) as store:
        store.submit(WriteBatch(tasks=[task])).result(timeout=5)
    (loaded,) = reload(db_path).tasks
    assert loaded == task


def test_a_version_2_task_without_the_retry_fields_reads_with_their_defaults(
    db_path: Path,
) -> None:
    """What a store written before issue 13 holds: no ``retry``, ``preemptible`` or
    ``attempts`` keys in the task's JSON. The schema did not change for them (version 3
    added only the label index)."""
    with opened(db_path) as store:
        store.submit(WriteBatch(tasks=[make_task(1, revision=3)])).result(timeout=5)
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute(
            "UPDATE tasks SET data = json_remove(data, '$.retry', '$.preemptible', '$.attempts')"
        )
    assert "attempts" not in rows(db_path, "SELECT data FROM tasks")[0][0]
    assert rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)] == [(3,)]
    (loaded,) = reload(db_path).tasks
    assert (loaded.retry, loaded.preemptible, loaded.attempts) == (None, False, [])
