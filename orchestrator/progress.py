"""Live progress of a running sweep, and the summary printed at its end.

On a terminal: one tqdm line (done/total, ETA) with running/failed counts and the best and worst PSNR
so far. Elsewhere (CI logs, `ray job logs`, a pipe): one plain line per finished trial, because
carriage-return redraws turn into thousands of lines there.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def process_age_s() -> float | None:
    """Seconds since this process started (the command the user typed), from /proc; None where there is none."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces: fields after it
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class SweepStats:
    """Counts of this run's trials, kept by the driver as results arrive."""

    total: int  # trials this run will try (pending cells)
    complete: int = 0
    failed: int = 0
    timeout: int = 0
    running: set[str] = field(default_factory=set)
    psnrs: list[float] = field(default_factory=list)
    trial_wall_s: float = 0.0
    first_trial_s: float | None = None  # seconds from the command's start to its first trial's start

    @property
    def done(self) -> int:
        return self.complete + self.failed + self.timeout

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done - len(self.running))

    def record(self, status: str, psnr: Any, wall_s: Any) -> None:
        if status == "COMPLETE":
            self.complete += 1
            if isinstance(psnr, int | float) and math.isfinite(psnr):
                self.psnrs.append(float(psnr))
        elif status == "TIMEOUT":
            self.timeout += 1
        else:
            self.failed += 1
        if isinstance(wall_s, int | float) and math.isfinite(wall_s):
            self.trial_wall_s += float(wall_s)

    def psnr_text(self) -> str:
        if not self.psnrs:
            return "PSNR -"
        return f"PSNR best {max(self.psnrs):.2f} worst {min(self.psnrs):.2f}"


class Progress:
    """Shows SweepStats as they change. `live=None` picks tqdm on a terminal, lines elsewhere."""

    def __init__(self, stats: SweepStats, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stats = stats
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.start = time.monotonic()
        self._bar: Any = None
        if self.live:
            from tqdm import tqdm

            self._bar = tqdm(total=stats.total, file=self.stream, unit="trial", dynamic_ncols=True,
                             smoothing=0.0)
            self._refresh()

    def _counts(self) -> str:
        s = self.stats
        return (f"running {len(s.running)}, failed {s.failed + s.timeout}, pending {s.pending}, "
                f"{s.psnr_text()}")

    def eta_s(self) -> float | None:
        """Time left at this run's pace so far (finished trials per second), None before the first."""
        s = self.stats
        if not s.done:
            return None
        return (time.monotonic() - self.start) / s.done * (s.total - s.done)

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._counts(), refresh=True)

    def started(self, key: str) -> None:
        if self.stats.first_trial_s is None:
            self.stats.first_trial_s = process_age_s()
        self.stats.running.add(key)
        self._refresh()

    def finished(self, key: str, status: str, psnr: Any, wall_s: Any, label: str = "") -> None:
        self.stats.running.discard(key)
        self.stats.record(status, psnr, wall_s)
        if self._bar is not None:
            self._bar.set_postfix_str(self._counts(), refresh=False)
            self._bar.update(1)
            return
        eta = self.eta_s()
        score = f" psnr {psnr:.2f}" if isinstance(psnr, int | float) and math.isfinite(psnr) else ""
        wall = f" ({wall_s:.1f} s)" if isinstance(wall_s, int | float) else ""
        print(
            f"[{self.stats.done}/{self.stats.total}] {status} {key} {label}{score}{wall} | "
            f"{self._counts()} | ETA {_duration(eta) if eta is not None else '-'}",
            file=self.stream, flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@dataclass
class SweepSummary:
    """What the sweep prints at its end (and what tests read)."""

    name: str
    cells: int
    ran: int
    complete: int
    failed: int
    timeout: int
    wall_s: float
    trial_wall_s: float
    slots: int
    results_path: str = ""
    first_trial_s: float | None = None  # from the command's start to its first trial's start (see SweepStats)

    @property
    def efficiency(self) -> float | None:
        """sum(trial wall_s) / (sweep wall time x concurrent slots): 1.0 means no slot ever idled."""
        if self.ran == 0 or self.wall_s <= 0 or self.slots <= 0:
            return None
        return self.trial_wall_s / (self.wall_s * self.slots)

    def format(self) -> str:
        lines = [
            f"sweep '{self.name}': {self.ran} trials run in {_duration(self.wall_s)} "
            f"({self.complete} complete, {self.failed} failed, {self.timeout} timeout); "
            f"{self.cells} cells in the spec"
        ]
        if self.first_trial_s is not None:
            lines.append(f"first trial running {self.first_trial_s:.1f} s after the command started")
        eff = self.efficiency
        if eff is not None:
            lines.append(
                f"sweep efficiency {eff:.2f} = sum of trial wall times {self.trial_wall_s:.1f} s / "
                f"({self.wall_s:.1f} s sweep wall time x {self.slots} concurrent slots)"
            )
        if self.results_path:
            lines.append(f"results: {self.results_path}")
        return "\n".join(lines)
