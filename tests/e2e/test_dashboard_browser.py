"""The dashboard in a real headless Chromium against a real server and cluster.

What an operator does: submit from the form and watch progress and output arrive,
interrupt from a task's page and see how it ended, keep the page open across a server
restart without losing an event, and log in with a token.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from tests.integration.helpers import seconds, stream_token, submit, wait_state, wait_terminal
from tests.integration.http_helpers import call, http_server, serve_http
from tests.support import FAST_SERVER_ARGS, ServerProcess, free_port
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc

from .browser import chromium, connection, page_state, seen_revisions, wait_until


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    yield from serve_http(tmp_path_factory.mktemp("dashboard") / "data")


@pytest.fixture(scope="module")
def tasks(served: tuple[ServerProcess, str]) -> Iterator[task_service_pb2_grpc.TaskServiceStub]:
    with grpc.insecure_channel(served[0].address) as ch:
        yield task_service_pb2_grpc.TaskServiceStub(ch)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


def _open(driver: WebDriver, url: str) -> None:
    driver.get(url)
    wait_until(driver, lambda: connection(driver) == "live")


def test_a_task_submitted_from_the_form_shows_progress_and_output_live(
    served: tuple[ServerProcess, str], browser: WebDriver, tasks: Any
) -> None:
    _open(browser, served[1] + "/")
    wait_until(browser, lambda: "demo.count" in browser.find_element(By.ID, "submit-task").text)
    Select(browser.find_element(By.ID, "submit-task")).select_by_value("demo.count")
    args = browser.find_element(By.ID, "submit-args")
    args.clear()
    args.send_keys('{"n": 25, "interval": 0.2}')
    browser.find_element(By.ID, "submit-labels").send_keys("suite=browser")
    browser.find_element(By.ID, "submit-button").click()
    wait_until(
        browser, lambda: browser.execute_script("return location.hash").startswith("#/tasks/")
    )
    name = browser.execute_script("return location.hash").removeprefix("#/")

    # Live: output and progress while the task still runs, read in the same instant.
    live = wait_until(
        browser,
        lambda: (
            (s := page_state(browser))["state"] == "RUNNING"
            and "step 3\n" in (s["output"] or "")
            and s
        ),
    )
    assert 0 < live["progress"] < 1
    assert "step 25" not in live["output"]
    done = wait_until(browser, lambda: (s := page_state(browser))["state"] == "SUCCEEDED" and s)
    assert done["output"] == "".join(f"step {i}\n" for i in range(1, 26))
    assert done["progress"] == 1
    assert wait_terminal(tasks, name).labels["suite"] == "browser"


def test_the_form_checks_json_arguments_before_sending(
    served: tuple[ServerProcess, str], browser: WebDriver, tasks: Any
) -> None:
    _open(browser, served[1] + "/")
    before = len(tasks.ListTasks(spb.ListTasksRequest(page_size=1000), timeout=10).tasks)
    args = browser.find_element(By.ID, "submit-args")
    args.clear()
    args.send_keys('{"n": 3,')
    browser.find_element(By.ID, "submit-button").click()
    error = wait_until(browser, lambda: browser.find_element(By.ID, "submit-error").text)
    assert "not JSON" in error
    args.clear()
    args.send_keys("[1, 2]")
    browser.find_element(By.ID, "submit-button").click()
    wait_until(browser, lambda: "JSON object" in browser.find_element(By.ID, "submit-error").text)
    after = len(tasks.ListTasks(spb.ListTasksRequest(page_size=1000), timeout=10).tasks)
    assert after == before


def test_interrupt_from_the_task_page_shows_interrupted_and_its_stage(
    served: tuple[ServerProcess, str], browser: WebDriver, tasks: Any
) -> None:
    task = submit(tasks, "demo.sleep", args={"seconds": 60})
    wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
    _open(browser, f"{served[1]}/#/{task.name}")
    wait_until(browser, lambda: page_state(browser)["state"] == "RUNNING")
    browser.find_element(By.ID, "interrupt-reason").send_keys("stopped from the browser")
    browser.find_element(By.ID, "interrupt-button").click()
    done = wait_until(browser, lambda: (s := page_state(browser))["state"] == "INTERRUPTED" and s)
    wait_until(browser, lambda: page_state(browser)["stage"] == "SIGINT")
    assert "[on_interrupt] demo.sleep cleaned up" in (done["output"] or "")
    record = wait_terminal(tasks, task.name).interrupt
    assert record.reason == "stopped from the browser"
    assert record.final_stage == tpb.ESCALATION_STAGE_SIGINT


def test_the_task_page_lists_every_attempt_of_a_retried_task(
    served: tuple[ServerProcess, str], browser: WebDriver, tasks: Any
) -> None:
    policy = tpb.RetryPolicy(max_attempts=2, retry_on=["TASK_RAISED"], initial_backoff=seconds(0))
    task = submit(tasks, "demo.fail", args={}, retry=policy)
    wait_terminal(tasks, task.name)
    _open(browser, f"{served[1]}/#/{task.name}")
    wait_until(browser, lambda: page_state(browser)["state"] == "FAILED")
    rows = wait_until(
        browser,
        lambda: browser.execute_script(
            "return [...document.querySelectorAll('#task-attempts tr')]"
            ".slice(1).map((r) => [...r.cells].map((c) => c.textContent))"
        ),
    )
    assert [row[0] for row in rows] == ["1", "2"]
    assert [row[4] for row in rows] == ["RETRIED", "FINAL"]
    assert all(row[5].startswith("TASK_RAISED") for row in rows)


def test_the_table_filters_by_state_task_and_label_and_counts_states(
    served: tuple[ServerProcess, str], browser: WebDriver, tasks: Any
) -> None:
    marked = [
        submit(tasks, "demo.echo", args={"value": i}, labels={"batch": "b7"}) for i in range(3)
    ]
    for t in marked:
        wait_terminal(tasks, t.name)
    _open(browser, served[1] + "/")
    browser.find_element(By.ID, "filter-label").send_keys("batch=b7")

    def rows() -> list[str]:
        found: list[str] = browser.execute_script(
            "return [...document.querySelectorAll('#task-rows tr')].map(r => r.dataset.name)"
        )
        return found

    wait_until(browser, lambda: sorted(rows()) == sorted(t.name for t in marked))
    Select(browser.find_element(By.ID, "filter-state")).select_by_value("FAILED")
    wait_until(browser, lambda: rows() == [])
    succeeded = browser.find_element(By.CSS_SELECTOR, '#counts button[data-state="SUCCEEDED"]')
    assert int(succeeded.text.split()[-1]) >= 3


def _revision_of(token: str) -> int:
    text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    return int(text.rsplit("|", 1)[1])


def test_a_server_restart_under_the_open_page_loses_no_event(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port, http_port = free_port(), free_port()
    args = [*FAST_SERVER_ARGS, "--http", f"127.0.0.1:{http_port}"]
    url = f"http://127.0.0.1:{http_port}/"
    first = ServerProcess(data, port=port, engines=1, extra_args=args)
    second = ServerProcess(data, port=port, engines=1, extra_args=args)
    first.start()
    try:
        with grpc.insecure_channel(first.address) as ch, chromium() as driver:
            stub = task_service_pb2_grpc.TaskServiceStub(ch)
            token = stream_token(stub)  # the server is idle: the page starts from here too
            _open(driver, url)
            early = [submit(stub, "demo.echo", args={"value": i}) for i in range(3)]
            for t in early:
                wait_terminal(stub, t.name)
            blocker = submit(stub, "demo.sleep", args={"seconds": 60})
            wait_state(stub, blocker.name, {tpb.TASK_STATE_RUNNING})
            queued = submit(stub, "demo.echo", args={"value": "queued across the restart"})
            wait_until(driver, lambda: len(seen_revisions(driver)) >= 8)

            first.stop()  # the running task is interrupted, the queued one stays PENDING
            wait_until(driver, lambda: connection(driver) == "reconnecting")
            badge = driver.find_element(By.ID, "conn").text
            assert badge.startswith("reconnecting")
            second.start()
            late = submit(stub, "demo.echo", args={"value": "after"})
            wait_terminal(stub, queued.name)
            wait_terminal(stub, late.name)
            wait_until(driver, lambda: connection(driver) == "live")
            latest = _revision_of(stream_token(stub))
            wait_until(driver, lambda: (r := seen_revisions(driver)) and r[-1] == latest)
            shown = seen_revisions(driver)

            # The same events, in the same order, as a gRPC client resuming from the token.
            replay = []
            request = spb.StreamTaskStatusRequest(resume_token=token)
            for message in stub.StreamTaskStatus(request, timeout=30):
                if message.HasField("task_event"):
                    replay.append(message.task_event.revision)
                    if message.task_event.revision >= latest:
                        break
            assert shown == replay
            states = driver.execute_script(
                "return Object.fromEntries([...window.tetherDashboard.table.tasks.values()]"
                ".map(t => [t.name, t.state]))"
            )
            assert states[blocker.name] == "TASK_STATE_INTERRUPTED"
            assert states[queued.name] == states[late.name] == "TASK_STATE_SUCCEEDED"
    finally:
        for proc in (first, second):
            proc.stop()
            proc.kill_leftovers()


def test_with_auth_the_page_asks_for_a_token_and_refuses_a_wrong_one(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("admin-tok-91 alice admin\nuser-tok-52 bob\n")
    proc, base = http_server(tmp_path / "data", "--auth-tokens", str(tokens), engines=1)
    try:
        _, answer = call(
            base,
            "TaskService/SubmitTask",
            {"task": "demo.sleep", "args": {"seconds": 60}},
            "admin-tok-91",
        )
        name = answer["task"]["name"]
        with chromium() as driver:
            driver.get(base + "/")
            wait_until(driver, lambda: driver.find_element(By.ID, "auth-token").is_displayed())
            driver.find_element(By.ID, "auth-token").send_keys("not-a-token")
            driver.find_element(By.ID, "auth-save").click()
            refused = wait_until(driver, lambda: driver.find_element(By.ID, "auth-error").text)
            assert "refused" in refused
            assert connection(driver) == "needs-token"
            driver.find_element(By.ID, "auth-token").send_keys("user-tok-52")
            driver.find_element(By.ID, "auth-save").click()
            wait_until(driver, lambda: connection(driver) == "live")
            assert "tok" not in driver.current_url
            # Bob is not an admin and does not own Alice's task: the button is refused.
            driver.get(f"{base}/#/{name}")
            wait_until(driver, lambda: page_state(driver)["state"] == "RUNNING")
            driver.find_element(By.ID, "interrupt-button").click()
            message = wait_until(
                driver, lambda: driver.find_element(By.ID, "interrupt-message").text
            )
            assert message.startswith("permission_denied")
        call(base, "TaskService/InterruptTask", {"name": name}, "admin-tok-91")
        assert "user-tok-52" not in proc.log_text() and "not-a-token" not in proc.log_text()
    finally:
        proc.stop()
        proc.kill_leftovers()
