"""What the launcher shows while it follows a job: start-up phases as they happen, then the steps.

Everything comes from the run dir, as `tuneforge status` reads it: the tasks' `task` and `phase` events
(events.jsonl: ranks started, process group, tokenizer, data, model, ..., first step) and the last
line of metrics.jsonl (step, loss). On a terminal the steps are a tqdm bar (rate, elapsed, ETA, loss);
otherwise (a pipe, a file, CI) a plain line every `every` steps, and at least every
`PLAIN_INTERVAL_S` while steps advance, each on its own line. Both go to stderr; stdout keeps the
job id, run dir and outcome.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, List, Optional, Tuple

from tuneforge import units
from tuneforge.slurm import events

#: a plain progress line at least this often while steps advance
PLAIN_INTERVAL_S = 30.0
#: plain lines per run, about (every = max_steps // PLAIN_LINES)
PLAIN_LINES = 20


class Progress:
    def __init__(self, run_dir: Path, max_steps: int, job_id: str, stream: Optional[IO[str]] = None):
        self.run_dir, self.max_steps, self.job_id = Path(run_dir), max_steps, str(job_id)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, max_steps // PLAIN_LINES)
        self.started = time.time()
        self.events = _Appended(self.run_dir / events.FILE, "event")
        # what metrics.jsonl holds already is an earlier job's (a resumed run): only new records count
        self.metrics = _Appended(self.run_dir / "metrics.jsonl", "step", from_end=True)
        self.bar = None
        self.first: Optional[Tuple[int, float]] = None  # (step, time) when steps were first seen
        self.shown_step = -1
        self.last_line = 0.0
        self.ranks: List[int] = []

    def say(self, text: str) -> None:
        """One line above the bar (or in the flow of plain lines)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def poll(self) -> None:
        for event in self.events.new():
            if event.get("job_id") not in (None, self.job_id):
                continue
            if event["event"] == "task":
                self.ranks.append(event.get("pid"))
                if event.get("rank") == 0:
                    self.say(f"[{self._clock()}] started (allocation {event.get('attempt', 0)})")
            elif event["event"] == "phase":
                detail = f": {event['detail']}" if event.get("detail") else ""
                self.say(f"[{self._clock()}] {event['phase']}{detail}")
            elif event["event"] == "signal" and event.get("rank") == 0:
                self.say(f"[{self._clock()}] rank 0 got {event.get('signal')}")
        for record in self.metrics.new():
            if "loss" not in record:  # step 0's evaluation (train.eval_on_start): no training step yet
                continue
            if record["step"] > self.shown_step:
                self._step(int(record["step"]), record.get("loss"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _step(self, step: int, loss: Optional[float]) -> None:
        now = time.time()
        if self.first is None:
            self.first = (step, now)
        crossed = step // self.every > max(self.shown_step, 0) // self.every
        if self.tty:
            self._bar(step, loss)
        elif crossed or step == self.max_steps or now - self.last_line >= PLAIN_INTERVAL_S:
            self.last_line = now
            print(self._plain(step, loss, now), file=self.stream, flush=True)
        self.shown_step = step

    def _bar(self, step: int, loss: Optional[float]) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.max_steps, initial=step, unit="step", file=self.stream, dynamic_ncols=True, desc="train"
            )
        else:
            self.bar.update(step - self.bar.n)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=True)

    def _plain(self, step: int, loss: Optional[float], now: float) -> str:
        first_step, first_time = self.first
        # wall-clock steps per second since steps were first seen (checkpoints and evals included), once
        # that is long enough to mean something: records arrive in batches, one per poll
        rate = (step - first_step) / (now - first_time) if step > first_step and now - first_time >= 2 else None
        eta = (self.max_steps - step) / rate if rate else None
        parts = [f"step {step}/{self.max_steps}"]
        parts += [f"loss {loss:.4f}"] if loss is not None else []
        parts += [f"{rate:.2f} step/s"] if rate else []
        parts += [f"elapsed {self._clock(now)}"]
        parts += [f"eta {units.duration(eta, clock=True)}"] if eta is not None else []
        return "  ".join(parts)

    def _clock(self, now: Optional[float] = None) -> str:
        return units.duration((now or time.time()) - self.started, clock=True)


def last_step(metrics: Path) -> Tuple[int, Optional[float]]:
    """(step, loss) of the last record of metrics.jsonl; (-1, None) before the first."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return -1, None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            return int(record["step"]), record.get("loss")
    return -1, None


class _Appended:
    """The JSON records (dicts with `key`) appended to a file since the last call; a torn last line
    waits for its end. A file that shrank (rewritten) is read on from its new end."""

    def __init__(self, path: Path, key: str, from_end: bool = False):
        self.path, self.key, self.offset = path, key, 0
        if from_end:
            self.offset = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def new(self) -> List[dict]:
        if self._size() < self.offset:
            self.offset = self._size()
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in chunk[:end].decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and self.key in record:
                out.append(record)
        return out
