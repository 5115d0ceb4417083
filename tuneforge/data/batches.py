"""Batches of rows: what the training loop asks for, deterministic and resumable.

Global batch `step` is a fixed slice of a seeded permutation of the rows, so it depends on (seed, step)
only: resuming costs nothing, and each rank reads only its own disjoint part of the batch. A micro
batch is a dict of tensors passed to the model as keyword arguments, `labels` popped for the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from tuneforge.data.packing import Rows
from tuneforge.data.records import DataError
from tuneforge.data.tokenize import IGNORE_INDEX


@dataclass(frozen=True)
class Collate:
    """Rows -> the keyword arguments of the model's forward (plus labels)."""

    packed: bool
    flatten: bool = False

    def __call__(self, rows: Rows) -> Dict[str, torch.Tensor]:
        as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a)).long()  # noqa: E731
        if self.packed:
            batch = {
                "input_ids": as_long(rows.input_ids),
                "labels": as_long(rows.labels),
                "position_ids": as_long(rows.position_ids),
            }
            return {k: v.reshape(1, -1) for k, v in batch.items()} if self.flatten else batch
        longest = max(2, int(rows.lengths.max()))
        lengths = torch.from_numpy(np.asarray(rows.lengths)).long()
        return {
            "input_ids": as_long(rows.input_ids[:, :longest]),
            "labels": as_long(rows.labels[:, :longest]),
            "attention_mask": (torch.arange(longest)[None, :] < lengths[:, None]).long(),
        }


class GlobalBatches:
    """Global batch `step` = a fixed slice of the epoch's seeded permutation; ranks take equal parts."""

    def __init__(
        self,
        rows: Rows,
        global_batch: int,
        micro_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        collate: Collate,
        key: str = "",
    ):
        if len(rows) < global_batch:
            raise DataError(f"data: {len(rows)} rows, fewer than one global batch ({global_batch})")
        self.rows, self.global_batch, self.micro_batch = rows, global_batch, micro_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.collate, self.key = collate, key
        self.steps_per_epoch = len(rows) // global_batch
        self._epoch, self._perm = -1, None  # the permutation of the epoch last asked for

    def indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[position * self.global_batch : (position + 1) * self.global_batch]

    def _permutation(self, epoch: int) -> torch.Tensor:
        # Made once per epoch, not once per step: a permutation of millions of rows costs milliseconds.
        if self._epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._epoch = torch.randperm(len(self.rows), generator=generator), epoch
        return self._perm

    def rank_indices(self, step: int) -> torch.Tensor:
        """The rows this rank reads at `step`: its own slice of the global batch."""
        per_rank = self.global_batch // self.world_size
        return self.indices(step)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def micro_batches(self, step: int) -> Iterator[Dict[str, torch.Tensor]]:
        """This rank's micro batches for optimizer step `step`."""
        mine = self.rank_indices(step).numpy()
        for start in range(0, len(mine), self.micro_batch):
            yield self.collate(self.rows.take(mine[start : start + self.micro_batch]))

    @property
    def accumulation(self) -> int:
        return self.global_batch // self.world_size // self.micro_batch

    def state_dict(self, step: int) -> dict:
        """The sampler's position: (seed, step) decide every batch; the key names the rows."""
        return {"kind": "global", "seed": self.seed, "position": step, "rows": len(self.rows), "key": self.key}

    def load_state_dict(self, state: dict, step: int) -> None:
        if state.get("kind") != "global":
            raise DataError(
                f"the checkpoint's data position is of kind {state.get('kind')!r}, this run reads "
                "'global' batches: resume with the same data.streaming setting, or use a new run.dir"
            )
        if (state["seed"], state["rows"], state["key"]) != (self.seed, len(self.rows), self.key):
            raise DataError(
                f"the data changed since the checkpoint (seed {state['seed']}, {state['rows']} rows, cache key "
                f"{state['key']}; now seed {self.seed}, {len(self.rows)} rows, key {self.key}): resuming would not "
                "continue the same epoch; restore the data and train.seed, or start a new run.dir"
            )
        if state["position"] != step:
            raise DataError(f"the checkpoint's data position {state['position']} is not its step {step}")


class EvalBatches:
    """The first `max_rows` validation rows, dealt to the ranks in turn; every rank runs the same
    number of micro batches (a rank short of rows gets rows without targets), since a forward
    pass may be collective (FSDP, ZeRO-3)."""

    names: tuple = ()  # one dataset: no per-source losses (a mixture's are data/mixture.py MixtureEval)

    def __init__(
        self, rows: Rows, max_rows: int, micro_batch: int, rank: int, world_size: int, collate: Collate, pad_id: int
    ):
        n = min(len(rows), max_rows)
        per_rank = -(-n // world_size)
        self.indices = list(range(rank, n, world_size))
        self.rows, self.micro_batch, self.collate = rows, micro_batch, collate
        self.blanks = per_rank - len(self.indices)
        seq_len = rows.input_ids.shape[1]
        self.blank = Rows(
            np.full((1, seq_len), pad_id, np.int32),
            np.full((1, seq_len), IGNORE_INDEX, np.int32),
            np.arange(seq_len, dtype=np.int32)[None],
            np.ones(1, np.int32),
        )
        self.num_rows = n

    def by_source(self) -> Iterator[Tuple[Optional[int], Dict[str, torch.Tensor]]]:
        """(source index, micro batch): None, one dataset."""
        for batch in self.micro_batches():
            yield None, batch

    def micro_batches(self) -> Iterator[Dict[str, torch.Tensor]]:
        picked = [self.rows.take(np.array([i])) for i in self.indices] + [self.blank] * self.blanks
        for start in range(0, len(picked), self.micro_batch):
            group = picked[start : start + self.micro_batch]
            yield self.collate(
                Rows(
                    *(
                        np.concatenate([getattr(r, f) for r in group])
                        for f in ("input_ids", "labels", "position_ids", "lengths")
                    )
                )
            )
