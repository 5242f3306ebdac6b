"""The engine's service threads and ipyparallel's canning maps (runtime/monitor.py)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from ipyparallel.serialize import canning
from tether_server.runtime.monitor import prime_canning
before = sum(isinstance(k, str) for k in [*canning.can_map, *canning.uncan_map])
prime_canning()
after = sum(isinstance(k, str) for k in [*canning.can_map, *canning.uncan_map])
print(before, after)
"""


def test_priming_leaves_no_map_key_to_import_on_another_thread() -> None:
    # A fresh interpreter: this one's maps may be resolved already.
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert before > 0  # what the first can() would import, racing the load thread's
    assert after == 0  # only reads from now on
