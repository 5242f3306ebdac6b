"""``python -m bench``: run the benchmarks, print the table, write the JSON file.

    python -m bench                    # B1..B11, about 10 minutes on a 2-core box
    python -m bench --quick            # every bench, small samples, about a minute
    python -m bench --only B1,B3       # a subset
    python -m bench --out /tmp/r.json  # somewhere else than bench/results.json

The exit status is 0 when every bench ran, whether or not it met its target (a miss is
a result, printed as MISSED); 1 when a bench failed to run; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

import psutil

from . import (
    b1_interrupt,
    b2_stuck,
    b3_dispatch,
    b4_throughput,
    b4c_client,
    b5_fanout,
    b6_progress,
    b7_storm,
    b8_sustained,
    b9_history,
    b10_preemption,
    b11_llm,
)
from .harness import (
    BenchResult,
    Session,
    environment,
    format_environment,
    format_table,
    leftover_processes,
    mark_run,
    write_json,
)

BENCHES: dict[str, ModuleType] = {
    m.ID: m
    for m in (
        b1_interrupt,
        b2_stuck,
        b3_dispatch,
        b4_throughput,
        b4c_client,
        b5_fanout,
        b6_progress,
        b7_storm,
        b8_sustained,
        b9_history,
        b10_preemption,
        b11_llm,
    )
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small samples (about a minute in all)")
    p.add_argument("--only", default="", help="comma-separated ids, e.g. B1,B3")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file (default %(default)s)")
    p.add_argument("--list", action="store_true", help="list the benches and exit")
    p.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="DIR",
        help="sample the tether server with py-spy into DIR and print where it spends its time",
    )
    args = p.parse_args(argv)
    by_upper = {bench_id.upper(): bench_id for bench_id in BENCHES}  # --only b4c finds B4c
    wanted = [by_upper.get(s.strip().upper(), s.strip()) for s in args.only.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in BENCHES]
    if unknown:
        p.error(f"unknown bench id(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    args.ids = wanted or list(BENCHES)
    return args


async def run_all(
    ids: list[str], workdir: Path, quick: bool, profile_dir: Path | None
) -> list[BenchResult]:
    session = Session(workdir, quick=quick, profile_dir=profile_dir)
    results: list[BenchResult] = []
    try:
        for bench_id in ids:
            module = BENCHES[bench_id]
            print(f"\n== {bench_id}: {module.TITLE}", flush=True)
            started = time.perf_counter()
            try:
                result: BenchResult = await module.run(session)
            except Exception as exc:
                traceback.print_exc()
                result = BenchResult(bench_id, module.TITLE, error=f"{type(exc).__name__}: {exc}")
            result.seconds = round(time.perf_counter() - started, 1)
            for row in result.rows:
                print(
                    f"  -> {row.metric}: {row.verdict}"
                    + (f" ({row.why})" if row.met is False and row.why else ""),
                    flush=True,
                )
            print(f"  ({bench_id} took {result.seconds:.0f} s)", flush=True)
            results.append(result)
    finally:
        await session.close()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for bench_id, module in BENCHES.items():
            print(f"{bench_id}  {module.TITLE}")
        return 0
    started = time.perf_counter()
    env = environment()
    print(f"tether benchmarks{' (quick)' if args.quick else ''}: {', '.join(args.ids)}")
    print(f"environment: {format_environment(env)}", flush=True)
    nonce = mark_run()
    workdir = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    try:
        results = asyncio.run(run_all(args.ids, workdir, args.quick, args.py_spy))
    finally:
        leftovers = leftover_processes(nonce)
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                print(
                    f"warning: killing leftover process {proc.pid} {' '.join(proc.cmdline())[:80]}"
                )
                proc.kill()
    env["runtime_seconds"] = round(time.perf_counter() - started, 1)
    print("\n" + format_table(results))
    write_json(args.out, env, args.quick, results)
    print(f"\nwrote {args.out}; total runtime {env['runtime_seconds']:.0f} s")
    failed = any(r.error for r in results)
    if failed:
        print(f"some benches failed to run; server logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
