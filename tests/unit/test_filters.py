"""TaskFilter: matching and the stable fingerprint that page tokens carry."""

from __future__ import annotations

import subprocess
import sys

from tether_server.core.filters import TaskFilter
from tether_server.core.model import Task, TaskState


def task(**fields: object) -> Task:
    base: dict[str, object] = {"id": "t", "task": "demo.sleep", "args": {}}
    base.update(fields)
    return Task(**base)  # type: ignore[arg-type]


def test_empty_filter_matches_every_task() -> None:
    assert TaskFilter().is_empty
    assert TaskFilter().matches(task(state=TaskState.FAILED, labels={"a": "b"}))


def test_states_match_any_of_them() -> None:
    flt = TaskFilter(states=frozenset({TaskState.RUNNING, TaskState.PENDING}))
    assert flt.matches(task(state=TaskState.RUNNING))
    assert not flt.matches(task(state=TaskState.SUCCEEDED))


def test_tasks_match_registered_task_names_not_ids() -> None:
    flt = TaskFilter(tasks=frozenset({"llm.generate"}))
    assert flt.matches(task(id="x", task="llm.generate"))
    assert not flt.matches(task(id="llm.generate", task="demo.sleep"))


def test_labels_must_all_be_present_with_their_values() -> None:
    flt = TaskFilter(labels={"team": "nlp", "env": "prod"})
    assert flt.matches(task(labels={"team": "nlp", "env": "prod", "extra": "x"}))
    assert not flt.matches(task(labels={"team": "nlp"}))
    assert not flt.matches(task(labels={"team": "nlp", "env": "dev"}))


def test_ids_match_task_ids_whatever_the_state() -> None:
    flt = TaskFilter(ids=frozenset({"a", "b"}))
    assert not flt.is_empty
    for state in TaskState:
        assert flt.matches(task(id="a", state=state))
    assert not flt.matches(task(id="c"))
    assert not TaskFilter(ids=frozenset({"a"}), tasks=frozenset({"x"})).matches(task(id="a"))


def test_a_filter_without_ids_keeps_the_fingerprint_page_tokens_carried_before_ids() -> None:
    # The digest of the canonical text as it was before ``ids`` existed.
    assert TaskFilter().fingerprint() == "05151954f14033b491f6"


def test_every_set_field_must_match() -> None:
    flt = TaskFilter(states=frozenset({TaskState.RUNNING}), labels={"team": "nlp"})
    assert not flt.matches(task(state=TaskState.RUNNING))
    assert not flt.matches(task(labels={"team": "nlp"}))


def test_labels_are_copied_so_the_filter_cannot_change_under_its_fingerprint() -> None:
    labels = {"team": "nlp"}
    flt = TaskFilter(labels=labels)
    before = flt.fingerprint()
    labels["team"] = "vision"
    assert flt.fingerprint() == before


def test_equal_filters_have_equal_fingerprints_whatever_the_order() -> None:
    a = TaskFilter(
        states=frozenset({TaskState.RUNNING, TaskState.PENDING}),
        tasks=frozenset({"x", "y"}),
        labels={"a": "1", "b": "2"},
    )
    b = TaskFilter(
        states=frozenset({TaskState.PENDING, TaskState.RUNNING}),
        tasks=frozenset({"y", "x"}),
        labels={"b": "2", "a": "1"},
    )
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    assert hash(a) == hash(b)


def test_different_filters_have_different_fingerprints() -> None:
    prints = {
        TaskFilter().fingerprint(),
        TaskFilter(states=frozenset({TaskState.RUNNING})).fingerprint(),
        TaskFilter(tasks=frozenset({"RUNNING"})).fingerprint(),
        TaskFilter(labels={"RUNNING": ""}).fingerprint(),
        TaskFilter(labels={"a": "b"}).fingerprint(),
        TaskFilter(labels={"a=b": ""}).fingerprint(),
        TaskFilter(ids=frozenset({"RUNNING"})).fingerprint(),
    }
    assert len(prints) == 7


def test_fingerprint_is_the_same_in_another_process() -> None:
    code = (
        "from tether_server.core.filters import TaskFilter;"
        "print(TaskFilter(tasks=frozenset({'a', 'b', 'c'}), labels={'k': 'v'}).fingerprint())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
    )
    here = TaskFilter(tasks=frozenset({"a", "b", "c"}), labels={"k": "v"}).fingerprint()
    assert other.stdout.strip() == here
