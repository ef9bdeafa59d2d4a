"""How a sweep's trials run (RunOptions, from the spec and the command line) and how many fit at once."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import ray

from grnn_engine.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.spec import Asha


@dataclasses.dataclass
class RunOptions:
    """How to run the pending cells (from the spec, possibly overridden on the command line)."""

    name: str
    cpu: float = 1.0
    gpu: float = 0.0
    max_concurrent: int | None = None
    trial_timeout_s: float | None = None
    max_failures: int = 0
    cache_dir: str | None = None  # the stage cache (see stages.stage_cache_dir); None: grnn_engine.fl's default
    utility_round: int | None = None  # the spec's utility round (None without utility)
    scheduler: Asha | None = None
    retry_failed: bool = False  # search: failed trials do not count against a study's budget
    pack: int = 1  # grid cells per Tune trial, run together by grnn_engine.batched (orchestrator.running.packing)


def concurrent_slots(options: RunOptions) -> int:
    """How many trials can run at once: min(max_concurrent, CPUs // cpu per trial, GPUs // gpu)."""
    resources = ray.cluster_resources()
    slots = math.floor(resources.get("CPU", 0) / options.cpu + 1e-9) if options.cpu > 0 else 10**9
    if options.gpu > 0:
        slots = min(slots, math.floor(resources.get("GPU", 0) / options.gpu + 1e-9))
    if options.max_concurrent:
        slots = min(slots, options.max_concurrent)
    return int(slots)


def slots_or_error(options: RunOptions, strict_resources: bool) -> int:
    """concurrent_slots, or a ConfigError when a trial cannot fit the cluster as it is now (with
    `strict_resources`; without it, e.g. on a cluster that may autoscale, at least 1)."""
    slots = concurrent_slots(options)
    if slots < 1 and not strict_resources:
        slots = 1
    if slots < 1:
        have = ray.cluster_resources()
        raise ConfigError(
            f"each trial asks for cpu={options.cpu:g}, gpu={options.gpu:g} but the Ray cluster has "
            f"CPU={have.get('CPU', 0):g}, GPU={have.get('GPU', 0):g}; lower resources in the spec"
        )
    return slots
