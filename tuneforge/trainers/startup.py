"""Time to first step: the run's start-up, phase by phase, timed from the start of the process.

task.run announces every start-up step as it begins, `phase(name, detail)` (the `phase` events of
events.jsonl that the launcher shows as they happen). `StartUp` is that callback with a clock: it
passes each announcement on and remembers when it came. A phase lasts until the next one begins; the
first, `imports`, from the process's start (the interpreter, submitit's unpickling, torch and
transformers) to the first announcement, and the last, `first step`, until the end of the first
optimizer step this process takes (on a resume: after the checkpoint is loaded). So the phases
cover the time to the first step end to end, and their durations add up to it.

When the first step ends, rank 0 prints one line and the run's summary.json gets

    startup_phases         [{"phase", "start_s", "seconds", "detail"}, ...] in order, from the process start
    time_to_first_step_s   process start -> end of the first step
    first_step_start_s     process start -> start of the first step
    process_started_at     the process start (seconds since the epoch: what the launcher took before it)

Torch.compile compiles lazily: the `compile` phase only wraps the blocks, and the graphs are built
(or read from inductor's cache) inside the first step, which is why that step is longer than the rest.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

Announce = Callable[..., None]  # phase(name, detail="")


def process_start_time() -> float:
    """When this process started, in seconds since the epoch, to the kernel's clock tick (10 ms).

    On Linux from the process's age (/proc/self/stat's start tick against /proc/uptime): psutil's
    create_time adds that tick to the boot time, which the kernel gives in whole seconds (up to 1 s
    off). Elsewhere psutil's."""
    import os

    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        now = time.time()
        return now - max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().create_time()


class StartUp:
    def __init__(self, announce: Optional[Announce] = None, started: Optional[float] = None):
        self.announce = announce or (lambda name, detail="": None)
        self.started = process_start_time() if started is None else started
        self.marks: List[Tuple[str, float, str]] = [("imports", self.started, "")]  # (phase, began, detail)
        self.finished: Optional[float] = None

    def __call__(self, name: str, detail: str = "") -> None:
        self.marks.append((name, time.time(), detail))
        self.announce(name, detail)

    def note(self, detail: str) -> None:
        """Add to the current phase's detail (what was learnt during it: a data cache hit or miss)."""
        name, began, old = self.marks[-1]
        self.marks[-1] = (name, began, f"{old}; {detail}" if old else detail)

    def first_step_done(self) -> Dict[str, object]:
        """Close the last phase; returns the summary.json values (once: later calls return {})."""
        if self.finished is not None:
            return {}
        self.finished = time.time()
        # offsets rounded once, durations their differences: the durations add up to the total
        offsets = [round(max(0.0, began - self.started), 3) for _, began, _ in self.marks]
        end = round(max(offsets[-1], self.finished - self.started), 3)
        phases = [
            {"phase": name, "start_s": start, "seconds": round(stop - start, 3), "detail": detail}
            for (name, _, detail), start, stop in zip(self.marks, offsets, offsets[1:] + [end])
        ]
        return {
            "startup_phases": phases,
            "time_to_first_step_s": end,
            "first_step_start_s": offsets[-1],
            "process_started_at": round(self.started, 3),
        }


def describe(values: Dict[str, object]) -> str:
    """The line rank 0 prints after its first step."""
    parts = []
    for p in values["startup_phases"]:
        detail = f" ({p['detail']})" if p["detail"] else ""
        parts.append(f"{p['phase']} {p['seconds']:.2f} s{detail}")
    return (
        f"start-up: first step done {values['time_to_first_step_s']:.2f} s after the process started "
        f"(began at {values['first_step_start_s']:.2f} s): " + ", ".join(parts)
    )
