"""The in-memory event log, resume tokens and page tokens."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether_server.core.errors import InvalidRequest, ResumeTokenExpired
from tether_server.core.eventlog import (
    EventLog,
    LogEntry,
    decode_page_token,
    decode_token,
    encode_page_token,
    encode_token,
)
from tether_server.core.messages import EventKind, Publish
from tether_server.core.model import Task

EPOCH = "3f2a9c"


def entry(revision: int, payload: object = None) -> LogEntry:
    task = Task(id=f"t{revision}", task="demo.sleep", args={}, revision=revision)
    return LogEntry(revision, EventKind.STATE_CHANGED, task, float(revision), "", payload)


def filled(max_events: int, revisions: range) -> EventLog:
    log = EventLog(EPOCH, max_events)
    for revision in revisions:
        log.append(entry(revision))
    return log


def revisions(entries: list[LogEntry]) -> list[int]:
    return [e.revision for e in entries]


# --------------------------------------------------------------------------- the log
def test_since_returns_the_events_after_a_revision_oldest_first() -> None:
    log = filled(10, range(1, 6))
    assert revisions(log.since(2)) == [3, 4, 5]
    assert revisions(log.since(0)) == [1, 2, 3, 4, 5]


def test_since_the_latest_revision_is_empty() -> None:
    log = filled(10, range(1, 4))
    assert log.latest_revision == 3
    assert log.since(3) == []


def test_empty_log_stands_at_its_evicted_floor() -> None:
    log = EventLog(EPOCH, 10, evicted_through=41)
    assert (log.latest_revision, log.oldest_revision, len(log)) == (41, 42, 0)
    assert log.since(41) == []


def test_revisions_may_skip_numbers_but_never_go_back() -> None:
    log = filled(10, range(1, 3))
    log.append(entry(7))
    with pytest.raises(ValueError):
        log.append(entry(7))
    with pytest.raises(ValueError):
        log.append(entry(5))
    assert revisions(log.since(2)) == [7]


def test_the_oldest_events_are_evicted_beyond_max_events() -> None:
    log = filled(3, range(1, 6))
    assert len(log) == 3
    assert (log.oldest_revision, log.evicted_through) == (3, 2)


def test_resuming_exactly_at_the_eviction_boundary_has_no_gap() -> None:
    log = filled(3, range(1, 6))
    assert revisions(log.since(2)) == [3, 4, 5]


def test_resuming_before_the_evicted_events_raises_expired() -> None:
    log = filled(3, range(1, 6))
    with pytest.raises(ResumeTokenExpired) as raised:
        log.since(1)
    assert raised.value.metadata == {"cause": "expired", "oldestRevision": "3"}


def test_a_restarted_log_refuses_revisions_below_what_it_reloaded() -> None:
    log = EventLog(EPOCH, 10, evicted_through=99)
    log.append(entry(100))
    assert revisions(log.since(99)) == [100]
    with pytest.raises(ResumeTokenExpired):
        log.since(98)


def test_resuming_beyond_the_newest_event_raises_expired_ahead_of_log() -> None:
    log = filled(10, range(1, 4))
    with pytest.raises(ResumeTokenExpired) as raised:
        log.since(9)
    assert raised.value.metadata["cause"] == "ahead_of_log"


def test_the_payload_slot_is_kept_and_shared() -> None:
    payload = b"serialized once"
    log = EventLog(EPOCH, 10)
    log.append(entry(1, payload))
    assert log.since(0)[0].payload is payload


def test_entry_from_publish_copies_every_field() -> None:
    task = Task(id="t", task="demo.sleep", args={})
    publish = Publish(4, EventKind.OUTPUT, task, 2.5, "tok")
    assert LogEntry.from_publish(publish, "p") == LogEntry(
        4, EventKind.OUTPUT, task, 2.5, "tok", "p"
    )


def test_log_needs_room_for_one_event() -> None:
    with pytest.raises(ValueError):
        EventLog(EPOCH, 0)


# --------------------------------------------------------------------------- resume tokens
@given(
    epoch=st.text(min_size=1, max_size=40).filter(lambda s: "|" not in s),
    revision=st.integers(0, 2**62),
)
def test_resume_token_round_trips(epoch: str, revision: int) -> None:
    assert decode_token(encode_token(epoch, revision), epoch=epoch) == revision


def test_resume_token_is_url_safe_base64_without_padding() -> None:
    token = encode_token(EPOCH, 12345)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)) == f"t1|{EPOCH}|12345".encode()


def test_resume_token_of_another_epoch_is_told_apart() -> None:
    token = encode_token("old-epoch", 5)
    with pytest.raises(ResumeTokenExpired) as raised:
        decode_token(token, epoch=EPOCH)
    assert raised.value.metadata == {"cause": "foreign_epoch"}


def _raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "token",
    [
        "not base64!",
        "a",  # impossible base64 length
        "x" * 600,  # too long
        _raw(f"t2|{EPOCH}|5"),  # unknown version
        _raw(f"t1|{EPOCH}"),  # missing part
        _raw(f"t1|{EPOCH}|5|6"),  # extra part
        _raw(f"t1|{EPOCH}|-5"),
        _raw(f"t1|{EPOCH}| 5"),
        _raw(f"t1|{EPOCH}|05"),
        _raw(f"t1|{EPOCH}|\u0665"),  # a non-ASCII digit
        _raw(f"p1|{EPOCH}|5"),  # a page token
        encode_token(EPOCH, 5) + "=",  # padding is not ours
    ],
)
def test_malformed_resume_token_is_an_invalid_request_on_its_field(token: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        decode_token(token, epoch=EPOCH)
    assert raised.value.reason == "INVALID_RESUME_TOKEN"
    assert [v.field for v in raised.value.violations] == ["resume_token"]


def test_non_canonical_base64_of_a_valid_token_is_refused() -> None:
    token = _raw(f"t1|{EPOCH}|7")  # length % 4 == 2: the last char carries 4 unused bits
    tampered = token[:-1] + chr(ord(token[-1]) + 1)
    assert base64.urlsafe_b64decode(tampered + "==") == base64.urlsafe_b64decode(token + "==")
    with pytest.raises(InvalidRequest):
        decode_token(tampered, epoch=EPOCH)


def test_epoch_with_the_separator_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        encode_token("a|b", 1)


# --------------------------------------------------------------------------- page tokens
@given(after_seq=st.integers(0, 2**62), fingerprint=st.from_regex(r"[0-9a-f]{20}", fullmatch=True))
def test_page_token_round_trips(after_seq: int, fingerprint: str) -> None:
    assert decode_page_token(encode_page_token(after_seq, fingerprint), fingerprint) == after_seq


def test_page_token_for_another_filter_is_refused() -> None:
    token = encode_page_token(10, "aaaa")
    with pytest.raises(InvalidRequest) as raised:
        decode_page_token(token, "bbbb")
    assert raised.value.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in raised.value.violations] == ["page_token"]
    assert "filter changed" in raised.value.violations[0].description


@pytest.mark.parametrize("token", ["%%%", encode_token(EPOCH, 3), _raw("p1|aaaa|x")])
def test_malformed_page_token_is_an_invalid_request_on_its_field(token: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        decode_page_token(token, "aaaa")
    assert raised.value.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in raised.value.violations] == ["page_token"]
