"""A process's resident memory sampled in the background (psutil, every 0.1 s), with named marks.

`RssSampler().start()` as early as possible; `mark("loaded")` at each phase boundary; `peak(since, until)`
is the highest RSS sampled between two marks (the mark itself included: a sample is also taken there).
RSS counts anonymous memory and mapped file pages; `anon` is sampled too (/proc/self/status RssAnon), as
a safetensors file mapped by one process (transformers' `from_pretrained`) counts in its RSS while shared
page cache is not the process's own memory.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Tuple

import psutil


def _anon_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    def __init__(self, interval: float = 0.1, cap_bytes: Optional[int] = None, on_cap=None):
        """cap_bytes/on_cap: on_cap(rss) is called from the sampling thread once RSS exceeds cap_bytes (a
        benchmark stops its rank there instead of letting the machine run out of memory)."""
        self.interval = interval
        self.cap_bytes, self.on_cap = cap_bytes, on_cap
        self.process = psutil.Process()
        self.samples: List[Tuple[float, int, int]] = []  # (time, rss, anon)
        self.marks: Dict[str, int] = {}  # name -> index of the sample taken at the mark
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self.started = time.perf_counter()

    def _sample(self) -> int:
        rss = self.process.memory_info().rss
        with self._lock:
            self.samples.append((time.perf_counter() - self.started, rss, _anon_bytes()))
            return len(self.samples) - 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            index = self._sample()
            if self.cap_bytes is not None and self.samples[index][1] > self.cap_bytes and self.on_cap is not None:
                self.on_cap(self.samples[index][1])

    def start(self) -> "RssSampler":
        self.mark("start")
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.mark("stop")

    def mark(self, name: str) -> float:
        """Record a sample now under `name`; returns the seconds since the sampler was made."""
        self.marks[name] = self._sample()
        return self.samples[self.marks[name]][0]

    def at(self, name: str) -> int:
        return self.samples[self.marks[name]][1]

    def time_of(self, name: str) -> float:
        return self.samples[self.marks[name]][0]

    def peak(self, since: str = "start", until: Optional[str] = None, anon: bool = False) -> int:
        with self._lock:
            lo = self.marks[since]
            hi = self.marks[until] if until else len(self.samples) - 1
            column = 2 if anon else 1
            return max(s[column] for s in self.samples[lo : hi + 1])
