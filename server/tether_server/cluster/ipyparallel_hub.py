"""The ipyparallel controller process that tether starts: ipyparallel's own, bounded.

``python -m tether_server.cluster.ipyparallel_hub`` runs ``ipyparallel.controller``
unchanged except for two things: the Hub's per-task bookkeeping no longer grows
with every task ever run, and without a database it reads only the ids of the
messages it monitors (``hub_monitor``). ipyparallel 9.2 keeps the id of every finished request
in ``Hub.all_completed`` and per engine in ``Hub.completed`` (no purge request
clears them); over months of small tasks that is the hub's memory leak. A
periodic callback keeps the newest ``KEEP`` per engine. Task records are not
kept at all (``--IPController.db_class=NoDB``, set by the adapter): tether keeps
its own.

``all_completed`` only lets the hub tell a late reply of a finished request
from an unknown one (for a log line), and ``completed`` feeds ``queue_status``
counts; neither matters to tether.
"""

from __future__ import annotations

import sys
from typing import Any

KEEP = 1_000
"""Finished request ids kept per engine (and ``4 * KEEP`` in all)."""
TRIM_EVERY_MS = 5_000


def trim(hub: Any) -> None:
    """Drop all but the newest finished request ids the hub remembers."""
    for done in hub.completed.values():
        if len(done) > KEEP:
            del done[:-KEEP]
    if len(hub.all_completed) > 4 * KEEP:
        recent = {msg_id for done in hub.completed.values() for msg_id in done}
        hub.all_completed = recent


def main() -> None:
    from ipyparallel.controller import app, hub
    from ipyparallel.controller.dictdb import NoDB
    from tornado.ioloop import PeriodicCallback

    from .hub_monitor import install

    install(hub.Hub, NoDB)

    original = app.IPController.init_hub

    def init_hub(self: Any) -> None:
        original(self)
        self._tether_trim = PeriodicCallback(lambda: trim(self.hub), TRIM_EVERY_MS)
        self._tether_trim.start()

    app.IPController.init_hub = init_hub
    sys.exit(app.main())


if __name__ == "__main__":
    main()
