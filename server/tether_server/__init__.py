"""tether-server: the gRPC control plane that owns an ipyparallel cluster.

Layers (dependencies point down only): ``core`` (sans-IO state machine) ->
``store`` / ``cluster`` (ports) -> ``runtime`` (code that runs inside engines) ->
``controller`` + ``api`` (service) -> ``app`` (process). See docs/architecture.md.
"""

__version__ = "0.1.0"
