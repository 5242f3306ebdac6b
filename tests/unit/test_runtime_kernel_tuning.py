"""The engine kernel adjustments (runtime/kernel_tuning.py), on stand-in kernels."""

from __future__ import annotations

import logging
from typing import Any

from tether_server.cluster import hub_records
from tether_server.runtime import kernel_tuning


class FakeKernel:
    def __init__(self, parent: dict[str, Any] | None = None) -> None:
        self.published: list[tuple[str, str]] = []
        self.parent = parent or {}
        self.log = logging.getLogger(f"test-kernel-{id(self)}")
        self.log.propagate = False
        self.session = type("S", (), {"digest_history_size": 65536})()

    def _publish_status(self, status: str, channel: str, parent: Any = None) -> None:
        self.published.append((status, channel))

    def get_parent(self, channel: str | None = None) -> dict[str, Any]:
        return self.parent


def request(label: str | None) -> dict[str, Any]:
    return {"header": {"msg_type": "apply_request"}, "metadata": {"label": label} if label else {}}


def test_tether_task_requests_publish_no_shell_status_and_others_still_do() -> None:
    kernel = FakeKernel()
    kernel_tuning.quiet_tether_requests(kernel)
    kernel_tuning.quiet_tether_requests(kernel)  # idempotent: wrapped once
    tether = request(hub_records.label("epoch1", "task-a", 1))
    kernel._publish_status("busy", "shell", tether)
    kernel._publish_status("idle", "shell", tether)
    kernel._publish_status("busy", "control", tether)  # control requests are not tasks
    kernel._publish_status("busy", "shell", request("someone-else"))
    kernel._publish_status("idle", "shell", request(None))
    kernel.parent = tether  # no parent given: the kernel's current one decides
    kernel._publish_status("idle", "shell")
    assert kernel.published == [("busy", "control"), ("busy", "shell"), ("idle", "shell")]


def test_the_label_of_every_attempt_is_recognised() -> None:
    assert kernel_tuning.is_tether_request(request(hub_records.label("e", "x:y", 7)))
    assert not kernel_tuning.is_tether_request(request("tetherish"))
    assert not kernel_tuning.is_tether_request({"metadata": None})
    assert not kernel_tuning.is_tether_request(None)


def test_records_no_handler_shows_are_skipped_and_shown_ones_kept() -> None:
    kernel = FakeKernel()
    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO)
    kernel.log.addHandler(handler)
    kernel.log.setLevel(logging.DEBUG)
    kernel_tuning.skip_dropped_log_records(kernel.log)
    assert kernel.log.level == logging.INFO
    everything = logging.StreamHandler()  # NOTSET: shows every record
    kernel.log.addHandler(everything)
    kernel.log.setLevel(logging.DEBUG)
    kernel_tuning.skip_dropped_log_records(kernel.log)
    assert kernel.log.level == logging.DEBUG


def test_tune_applies_the_level_asked_for_and_bounds_the_signatures() -> None:
    kernel = FakeKernel()
    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO)
    kernel.log.addHandler(handler)
    kernel_tuning.tune(kernel, signatures=4096, log_level=logging.ERROR)
    assert kernel.log.level == logging.ERROR
    assert kernel.session.digest_history_size == 4096
    kernel_tuning.tune(kernel, signatures=0, log_level=None)  # an operator's engine
    assert kernel.log.level == logging.ERROR  # what is set stays; nothing lowers it
    kernel_tuning.tune(None, signatures=1, log_level=logging.ERROR)  # not in an engine


class FakeOutStream:
    """The parts of ipykernel's OutStream that ``skip_idle_flushes`` reads."""

    def __init__(self, echo: Any = None) -> None:
        self._flush_pending = False
        self._subprocess_flush_pending = False
        self.echo = echo
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        self._flush_pending = self._subprocess_flush_pending = False

    def write(self, text: str) -> None:
        self._flush_pending = True


def test_a_flush_with_nothing_pending_returns_at_once_and_a_pending_one_flushes() -> None:
    stream = FakeOutStream()
    kernel_tuning.skip_idle_flushes(stream)
    kernel_tuning.skip_idle_flushes(stream)  # idempotent
    stream.flush()
    assert stream.flushes == 0
    stream.write("x")
    stream.flush()
    assert stream.flushes == 1
    stream._subprocess_flush_pending = True
    stream.flush()
    assert stream.flushes == 2


def test_streams_with_an_echo_or_that_are_not_outstreams_keep_their_flush() -> None:
    echoing = FakeOutStream(echo=object())
    kernel_tuning.skip_idle_flushes(echoing)
    echoing.flush()
    assert echoing.flushes == 1

    class Plain:
        def flush(self) -> None:
            pass

    plain = Plain()
    kernel_tuning.skip_idle_flushes(plain)
    assert "flush" not in vars(plain)
