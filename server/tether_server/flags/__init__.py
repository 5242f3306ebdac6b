"""The tether-server command line: every flag, one module per concern.

:func:`parse_args` builds the parser, parses, checks what argparse cannot (flags that
go together or exclude each other) and returns the :class:`~tether_server.config.ServerConfig`
and the log level; ``app.main`` runs the server with them. ``--help`` lists the groups in
this order:

- :mod:`.serving`: gRPC and HTTP addresses, TLS, bearer tokens
- :mod:`.cluster`: engines on this host and on engine hosts, attached mode, GPU
  placement, heartbeat and liveness probes
- :mod:`.execution`: task modules, pipelined dispatch, interrupt graces, timeouts, limits
- :mod:`.llm`: the checkpoints ``llm.generate`` serves, its timeout policy
- :mod:`.retry`: the default retry policy and preemption
- :mod:`.store`: the data directory, event log retention, task cache, stream limits

:mod:`.values` holds the argument types (durations, sizes, ``NAME=...`` pairs) they share.
"""

from .parse import build_parser, parse_args
from .store import default_data_dir

__all__ = ["build_parser", "default_data_dir", "parse_args"]
