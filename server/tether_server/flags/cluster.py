"""Flags of the cluster: engines on this host and on engine hosts, attached mode, GPU
placement, and how the engines and the ipyparallel controller are watched."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ..cluster.hosts import EngineHost, SshSettings, parse_engine_hosts, read_hosts_file
from .values import duration, name_and_value

__all__ = ["add_flags", "engine_hosts", "ssh_settings"]


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "cluster and engine hosts",
        "the engines tether starts (or the cluster it attaches to) and how it watches them",
    )
    group.add_argument(
        "--engines",
        type=int,
        default=None,
        help="engines to start on this host (default: cores, at least 2; 0 with --engine-hosts)",
    )
    group.add_argument(
        "--spare-engines",
        type=int,
        default=0,
        help="warm spare engines beyond --engines: set up and ready, they take no task until an "
        "engine is lost, then one takes its place at once (no engine start, torch import or "
        "CUDA context on the critical path) and a new spare starts in the background. On GPU "
        "hosts a spare costs its CUDA context (default %(default)s)",
    )
    group.add_argument(
        "--engine-tag",
        action="append",
        default=[],
        dest="engine_tags",
        help="tag every engine with this (repeatable); 'gpu' is detected",
    )
    group.add_argument(
        "--attach",
        default="",
        help="attach to an existing ipyparallel cluster (cluster file or client connection file) instead of starting one",
    )
    group.add_argument(
        "--engine-hosts",
        default="",
        metavar="DEST=N,...",
        help="also run N engines on each of these hosts ([user@]host[:port]), placed by "
        "ipyparallel's SSH launcher; N omitted or 'auto': one per GPU (1 without GPUs). "
        "With engine hosts, --engines (this host's engines) defaults to 0",
    )
    group.add_argument(
        "--hosts-file",
        type=Path,
        default=None,
        help="TOML file with [hosts.NAME] tables (ssh, engines, tags, gpus), as --engine-hosts",
    )
    group.add_argument(
        "--cluster-ip",
        default="",
        metavar="ADDR",
        help="address the ipyparallel controller listens on and engines dial (default "
        "127.0.0.1; engine hosts need an address they can reach)",
    )
    group.add_argument(
        "--ssh-key", type=Path, default=None, help="identity file of the ssh calls to engine hosts"
    )
    group.add_argument(
        "--ssh-option",
        action="append",
        default=[],
        dest="ssh_options",
        metavar="OPT",
        help="ssh -o option for engine hosts, e.g. StrictHostKeyChecking=accept-new (repeatable)",
    )
    group.add_argument(
        "--remote-python",
        default=sys.executable,
        help="the Python with tether installed on the engine hosts (default: this one's path)",
    )
    group.add_argument(
        "--remote-env",
        action="append",
        default=[],
        dest="remote_env",
        metavar="NAME=VALUE",
        type=name_and_value,
        help="set this variable for engines on engine hosts, e.g. PYTHONPATH for --task-module "
        "modules (repeatable)",
    )
    group.add_argument(
        "--no-gpu-tags",
        action="store_true",
        help="do not tag engines pinned to a GPU with 'gpu' and 'gpu:<index>'",
    )
    group.add_argument(
        "--gpu-placement",
        choices=("per-engine", "none"),
        default="per-engine",
        help="per-engine: on an engine host with GPUs, pin one engine per GPU "
        "(CUDA_VISIBLE_DEVICES); none: engines see every GPU (default %(default)s)",
    )
    group.add_argument(
        "--no-warm-up",
        action="store_true",
        help="do not import torch and create the CUDA context on engines at start (faster engine start; an LLM engine's first task then counts that memory)",
    )
    group.add_argument(
        "--load-interval",
        type=duration,
        default=2.0,
        help="how often each engine reports its RSS, CPU and GPU memory (GetCluster; default 2s)",
    )
    group.add_argument(
        "--heartbeat",
        type=duration,
        default=0.5,
        help="ipyparallel heartbeat period: engine registration and host-loss detection scale with it (default 500ms)",
    )
    group.add_argument(
        "--hub-probe-interval",
        type=duration,
        default=1.0,
        help="how often the ipyparallel controller's liveness is probed (default 1s)",
    )
    group.add_argument(
        "--hub-probe-timeout",
        type=duration,
        default=2.0,
        help="a liveness probe not answered within this fails (default 2s)",
    )
    group.add_argument(
        "--hub-probe-failures",
        type=int,
        default=3,
        help="failed probes in a row after which the controller counts as frozen and the cluster is restarted (default %(default)s)",
    )


def engine_hosts(parser: argparse.ArgumentParser, a: argparse.Namespace) -> list[EngineHost]:
    """The engine hosts of --engine-hosts and --hosts-file; fills in --engines' default
    (0 with engine hosts) and checks the engine counts against them and --attach."""
    try:
        hosts = parse_engine_hosts(a.engine_hosts)
        if a.hosts_file is not None:
            hosts += read_hosts_file(a.hosts_file)
        if len({h.name for h in hosts}) != len(hosts):
            raise ValueError("a host is named twice")
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if a.gpu_placement == "none":
        hosts = [dataclasses.replace(h, gpus="none") for h in hosts]
    if a.engines is None:
        a.engines = 0 if hosts else max(2, os.cpu_count() or 2)
    if hosts and a.attach:
        parser.error("--engine-hosts starts engines; --attach uses a cluster started elsewhere")
    if a.hub_probe_failures < 1:
        parser.error("--hub-probe-failures must be at least 1")
    if a.engines < 0 or (a.engines < 1 and not hosts):
        parser.error("--engines must be at least 1 (0 only with --engine-hosts)")
    if a.spare_engines < 0:
        parser.error("--spare-engines must not be negative")
    return hosts


def ssh_settings(a: argparse.Namespace) -> SshSettings:
    """How the engine hosts are reached and what their engines get."""
    return SshSettings(
        identity_file=a.ssh_key,
        options=tuple(a.ssh_options),
        remote_python=a.remote_python,
        gpu_tags=not a.no_gpu_tags,
        environment=tuple(a.remote_env),
    )
