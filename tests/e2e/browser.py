"""A real headless Chromium for the dashboard's tests: Debian's ``chromium`` and
``chromium-driver`` (``scripts/ensure_chromium.sh`` installs them; ``make test`` runs it),
driven by Selenium. Selenium is given both paths, so it never downloads a browser."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

T = TypeVar("T")


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 900) -> Iterator[webdriver.Chrome]:
    """A headless Chromium; quit (and its chromedriver stopped by PID) on exit."""
    binary = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        raise RuntimeError("chromium/chromium-driver missing: run scripts/ensure_chromium.sh")
    options = Options()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    service = Service(driver_path)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            process = service.process
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)


def wait_until(
    driver: webdriver.Chrome, condition: Callable[[], T | None], timeout: float = 30
) -> T:
    """Poll ``condition`` until it returns something truthy; return that."""
    result: Any = WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda _: condition())
    return result  # type: ignore[no-any-return]


def page_state(driver: webdriver.Chrome) -> dict[str, Any]:
    """The task page's state badge, output, progress and stage, read in one go."""
    script = """
        const text = (id) => document.getElementById(id)?.textContent ?? null;
        return {
          state: text('task-state'),
          output: text('task-output'),
          progress: document.getElementById('task-progress')?.value ?? null,
          stage: text('task-stage'),
          connection: text('conn'),
        };
    """
    state: dict[str, Any] = driver.execute_script(script)
    return state


def connection(driver: webdriver.Chrome) -> str:
    text: str = driver.execute_script("return document.getElementById('conn').dataset.state")
    return text


def seen_revisions(driver: webdriver.Chrome) -> list[int]:
    """Every event revision the dashboard applied, in order (window.tetherDashboard)."""
    revisions: list[int] = driver.execute_script(
        "return window.tetherDashboard.table.revisions.slice()"
    )
    return revisions
