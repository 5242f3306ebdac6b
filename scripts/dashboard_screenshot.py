"""Take docs/dashboard.png (and docs/dashboard-task.png): the dashboard during a run.

    .venv/bin/python scripts/dashboard_screenshot.py

Starts a server with two engines on free ports, submits a mix of tasks (running,
finished, failed, interrupted), opens the dashboard in headless Chromium and saves the
screenshots; every process it starts is stopped by PID.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.browser import chromium, connection, page_state, wait_until  # noqa: E402
from tests.integration.http_helpers import call, http_server  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = http_server(Path(tmp) / "data", engines=2)
        try:

            def submit(task: str, args: dict[str, object], **labels: str) -> str:
                body = {"task": task, "args": args, "labels": labels}
                name: str = call(base, "TaskService/SubmitTask", body)[1]["task"]["name"]
                return name

            for i in range(4):
                submit("demo.echo", {"value": i}, team="infra")
            submit("demo.fail", {}, team="infra")
            stopped = submit("demo.sleep", {"seconds": 60}, team="ml")
            time.sleep(1.0)
            call(base, "TaskService/InterruptTask", {"name": stopped, "reason": "wrong prompt"})
            time.sleep(1.5)
            watched = submit("demo.count", {"n": 60, "interval": 0.25}, team="ml", run="7")
            submit("demo.count", {"n": 80, "interval": 0.2}, team="ml", run="8")
            submit("demo.sleep", {"seconds": 30}, team="research")
            with chromium(1400, 960) as driver:
                driver.get(base + "/")
                wait_until(driver, lambda: connection(driver) == "live")
                time.sleep(4)
                driver.save_screenshot(str(REPO / "docs" / "dashboard.png"))
                driver.get(f"{base}/#/{watched}")
                wait_until(driver, lambda: "step 10" in (page_state(driver)["output"] or ""))
                driver.save_screenshot(str(REPO / "docs" / "dashboard-task.png"))
        finally:
            proc.stop()
            proc.kill_leftovers()


if __name__ == "__main__":
    main()
