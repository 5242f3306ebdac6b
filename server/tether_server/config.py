"""Server configuration: plain dataclasses filled from the command line (flags/)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .cluster.hosts import EngineHost, SshSettings
from .core.model import GracePeriods, RetryPolicy


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits enforced on requests; every refusal is INVALID_ARGUMENT with a field violation."""

    max_args_bytes: int = 64 * 1024
    max_output_chars: int = 1_000_000
    max_grace_seconds: float = 300.0
    max_timeout_seconds: float = 7 * 86400.0
    max_page_size: int = 1000
    default_page_size: int = 100
    max_labels: int = 64
    max_label_key_chars: int = 63
    max_label_value_chars: int = 256
    max_request_id_chars: int = 128
    max_reason_chars: int = 1024
    max_subscribers: int = 10_000
    max_subscribers_per_principal: int = 2_000
    subscriber_queue: int = 1024
    """Events a subscriber may have waiting before it is cut off as lagging."""


@dataclass(frozen=True, slots=True)
class LlmTimeoutPolicy:
    """Timeout of an ``llm.generate`` task when the request gives none."""

    base_seconds: float = 30.0
    per_token_seconds: float = 0.5
    per_prompt_char_seconds: float = 0.01


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    engines: int = max(2, os.cpu_count() or 2)
    spare_engines: int = 0
    """Warm spares beyond ``engines``: ready, given no task until one takes a lost engine's place."""
    pipeline_depth: int = 8
    """Tasks an engine holds at most: one queued behind the running one (no idle round
    trip), and up to ``pipeline_depth`` - 1 when they are short, sent several to a
    request (``core/pipeline.py``, ``runtime/batch.py``)."""
    data_dir: Path = Path(".tether-data")
    task_modules: tuple[str, ...] = ()
    engine_tags: tuple[str, ...] = ()
    attach: str = ""
    """Attached mode: an ipyparallel cluster file or client connection file."""
    engine_hosts: tuple[EngineHost, ...] = ()
    """Other machines whose engines ipyparallel's SSH launcher places (--engine-hosts)."""
    ssh: SshSettings = field(default_factory=SshSettings)
    cluster_ip: str = ""
    """Address the ipyparallel controller listens on and engines dial ("": 127.0.0.1)."""
    load_interval_seconds: float = 2.0
    """How often each engine reports its load (RSS, CPU, GPU memory) for GetCluster."""
    grace: GracePeriods = field(default_factory=GracePeriods)
    default_timeout_seconds: float | None = None
    default_queue_timeout_seconds: float | None = None
    """Queue timeout of tasks that give none (--default-queue-timeout; None: wait)."""
    unschedulable_queue_timeout_seconds: float | None = 600.0
    """Queue timeout of a task that gives none while no engine carries its tags (attached
    mode, where such engines may still join; --unschedulable-queue-timeout)."""
    llm_timeout: LlmTimeoutPolicy = field(default_factory=LlmTimeoutPolicy)
    memory_limit_bytes: int = 0
    """Resource policy: interrupt a task whose engine's RSS exceeds this (0: off)."""
    rss_tolerance_bytes: int = 64 * 1024 * 1024
    gpu_tolerance_bytes: int = 64 * 1024 * 1024
    checkpoint_interval_seconds: float = 5.0
    retain_events: int = 200_000
    """Events kept in the store's log (resume tokens older than that expire)."""
    retain_seconds: float = 7 * 86400.0
    memory_events: int = 5_000
    """Newest events held in memory for live streams; older replays read the store."""
    task_cache: int = 2_000
    """Terminal tasks kept in memory beside the live ones (the rest is read from the store)."""
    hub_probe_interval: float = 1.0
    """Seconds between two liveness probes of the ipyparallel controller."""
    hub_probe_timeout: float = 2.0
    """A probe not answered within this counts as failed."""
    hub_probe_failures: int = 3
    """Consecutive failed probes after which the hub counts as frozen (lost)."""
    heartbeat_ms: int = 500
    warm_up: bool = True
    """LLM engines import torch and create their CUDA context at start."""
    models: tuple[tuple[str, str], ...] = ()
    """Hugging Face checkpoints behind llm.generate: (name, directory), from --model."""
    model_path_roots: tuple[str, ...] = ()
    """Directories a client's ``model_path`` may point into (--allow-model-path); none: off."""
    limits: Limits = field(default_factory=Limits)
    auth_tokens_file: Path | None = None
    """Bearer tokens (``TOKEN PRINCIPAL [admin]`` per line); None: auth off."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """With TLS: require client certificates signed by this CA (mutual TLS)."""
    http_listen: str = ""
    """The HTTP side (dashboard, gateway, /metrics, probes); "" turns it off."""
    http_required: bool = False
    """Fail to start when ``http_listen`` cannot be bound (the flag was given explicitly);
    otherwise the default address that is taken only costs a warning."""
    metrics_listen: str = ""
    """Serve /metrics (and the probes) on this address instead, without a token."""
    http_allowed_hosts: tuple[str, ...] = ()
    """With auth off, names the HTTP side answers besides addresses, localhost and this
    machine's host name (``web/hosts.py``)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retry policy of tasks whose request gives none (--retry-*); the default retries nothing."""
    preemptible_tasks: tuple[str, ...] = ()
    """Task names submitted as preemptible unless the request says otherwise."""
    preempt_min_runtime: float = 10.0
    """Seconds a preempted task runs in its next attempt before it can be preempted again."""
    log_format: str = "text"
    """``text`` or ``json`` (one object a line)."""
