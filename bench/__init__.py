"""tether's benchmarks: every figure a ratio against raw ipyparallel (or raw grpc.aio)
measured in the same run, on the same box, alternating the two.

``make bench`` (``python -m bench``) runs B1..B7 and B11 and prints one table; ``--quick`` runs
small samples; ``--only B1,B3`` a subset; the results also go to ``bench/results.json``.
The spec is shared/BENCHMARKS.md; the latest figures are in docs/benchmarks.md.

Modules: :mod:`.harness` (timing, statistics, A/B, the shared raw cluster and tether
server, table, JSON), :mod:`.tether_client` (the gRPC side), :mod:`.engine_tasks` and
:mod:`.tether_tasks` (what runs on engines), :mod:`.rawstream` (B5's bare grpc.aio
baseline), and one module per bench, ``b1_interrupt`` ... ``b7_storm``.
"""
