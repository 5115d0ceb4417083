"""Streaming batches: for corpora larger than memory (or than a token cache), read while training.

Each rank reads its own shard of the stream (datasets.distributed.split_dataset_by_node: whole
files when their number divides the world size, else every world_size-th row), one *window* of
`data.stream_window` rows at a time. A window is checked, tokenised and packed like the cached path
does, and its rows are permuted with (seed, epoch, window); the rank's share of each global batch is
the next `global_batch / world_size` rows of that order. When the shard ends, the next epoch starts
from its beginning (the windows are then permuted differently).

Resume: the sampler position is {epoch, window, where that window starts in the stream (the
IterableDataset's state_dict), rows of the window already used}, saved per rank in every
checkpoint. A resumed job seeks the stream to the window's start, re-reads that one window and
skips the used rows, so it sees exactly the batches the uninterrupted run would have seen, at the
cost of one window (not of the epoch so far). No shuffle buffer is used: datasets' buffered shuffle
loses its buffer on resume, which would break that. The world size must not change on resume.

Rows are checked as they are read: a bad row stops the job with its row number within the rank's
shard. There is no token cache in this mode (validation data, read from data.validation_path, is
cached as in the default mode).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

from tuneforge.data import records, sources
from tuneforge.data.packing import Rows, concatenate, row_targets
from tuneforge.data.prepare import rows_from_records
from tuneforge.data.records import DataError


class StreamingBatches:
    def __init__(self, source, encoder, data_cfg, train_cfg, pad_id: int, dist_env, collate):
        self.source, self.encoder, self.cfg, self.pad_id, self.collate = source, encoder, data_cfg, pad_id, collate
        self.spec = records.row_spec(data_cfg)
        self.rank, self.world_size = dist_env.rank, dist_env.world_size
        self.seed, self.micro_batch = train_cfg.seed, train_cfg.micro_batch
        self.per_rank = train_cfg.global_batch // dist_env.world_size
        self.global_batch = train_cfg.global_batch
        self.state: Dict[str, Any] = {
            "kind": "stream",
            "seed": self.seed,
            "world_size": self.world_size,
            "epoch": 0,
            "window": 0,
            "start": None,
            "used": 0,
            "position": 0,
        }
        self._rows: Optional[Rows] = None  # the current window's rows, in their permuted order
        self._targets = np.zeros(0, np.int64)  # target tokens of each of them
        self._stream = self._iterator = None
        self._next_start: Optional[dict] = None  # stream state after the current window
        self._ended = False  # the current window reached the end of the shard
        self._row_no = 0  # rows read from the shard this epoch, for messages

    @property
    def accumulation(self) -> int:
        return self.per_rank // self.micro_batch

    def micro_batches(self, step: int) -> Iterator[Dict[str, torch.Tensor]]:
        if step != self.state["position"]:
            raise RuntimeError(
                f"streaming batches are read in order: asked for step {step}, at step {self.state['position']}"
            )
        mine = self.next_rows(self.per_rank)
        self.state["position"] += 1
        for start in range(0, self.per_rank, self.micro_batch):
            yield self.collate(mine.take(slice(start, start + self.micro_batch)))

    def next_rows(self, n: int) -> Rows:
        """The next `n` rows of this rank's stream (windows read as needed)."""
        picked: List[Rows] = []
        while n:
            rows = self._window()
            take = min(n, len(rows) - self.state["used"])
            picked.append(rows.take(slice(self.state["used"], self.state["used"] + take)))
            self.state["used"] += take
            n -= take
        return picked[0] if len(picked) == 1 else concatenate(picked)

    def peek_targets(self) -> int:
        """Target tokens of the next row (a mixture's choice of source reads it before taking the row)."""
        self._window()
        return int(self._targets[self.state["used"]])

    def state_dict(self, step: int) -> dict:
        return {**self.state, "position": step}

    def load_state_dict(self, state: dict, step: int) -> None:
        if state.get("kind") != "stream":
            raise DataError("the checkpoint was written without data.streaming: resume with the same setting")
        if state["world_size"] != self.world_size:
            raise DataError(
                f"a streaming run resumes on the same number of ranks: the checkpoint has "
                f"{state['world_size']}, this job {self.world_size}"
            )
        if state["seed"] != self.seed or state["position"] != step:
            raise DataError(
                f"the checkpoint's data position (seed {state['seed']}, step {state['position']}) "
                f"does not match this run (seed {self.seed}, step {step})"
            )
        self.state = dict(state)
        self._rows = None

    # ------------------------------------------------------------------------------ windows
    def _window(self) -> Rows:
        """The current window's rows; moves to the next window (or epoch) when they are used up."""
        if self._rows is None:  # first call, or just resumed: seek to the window's start
            self._open(self.state["start"])
            self._load()
        while self.state["used"] >= len(self._rows):
            if self._ended:
                self.state.update(epoch=self.state["epoch"] + 1, window=0, start=None, used=0)
                self._open(None)
            else:
                self.state.update(window=self.state["window"] + 1, start=self._next_start, used=0)
            self._load()
        return self._rows

    def _open(self, start: Optional[dict]) -> None:
        from datasets.distributed import split_dataset_by_node

        stream = sources.dataset(self.source, self.cfg, streaming=True)
        stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        if start is not None:
            stream.load_state_dict(start)
        self._stream, self._iterator, self._ended, self._row_no = stream, iter(stream), False, 0

    def _load(self) -> None:
        """Read, check, tokenise and pack one window; permute its rows with (seed, epoch, window)."""
        recs = []
        while len(recs) < self.cfg.stream_window:
            try:
                row = next(self._iterator)
            except StopIteration:
                self._ended = True
                break
            self._row_no += 1
            row = sources.clean(row, self.spec)
            if row is None:
                continue
            bad = records.check_record(row, self.spec)
            if bad:
                raise DataError(
                    f"{self.source.label} (rank {self.rank}'s shard, row {self._row_no} of epoch "
                    f"{self.state['epoch']}): field '{bad[0]}': {bad[1]}"
                )
            recs.append(row)
        self._next_start = self._stream.state_dict()
        if not recs:
            if self.state["window"] == 0:
                raise DataError(f"{self.source.label}: rank {self.rank}'s shard of the stream is empty")
            self._rows = Rows(*(np.zeros((0,) + s, np.int32) for s in ((self.encoder.seq_len,),) * 3 + ((),)))
            self._targets = np.zeros(0, np.int64)
            return
        rows = rows_from_records(recs, self.encoder, self.cfg, self.pad_id)
        order = np.random.default_rng([self.seed, self.state["epoch"], self.state["window"]]).permutation(len(rows))
        self._rows = rows.take(order)
        self._targets = row_targets(self._rows)
