"""Data: documents -> token rows of seq_len -> deterministic, resumable global batches.

Every rank computes the same global batch for a step from (seed, step) alone and takes its own
slice, so resuming at step N costs nothing and the global batch does not depend on the world size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, List, Tuple

import torch

from tuneforge import data as bundled_data


def read_documents(data_cfg) -> List[str]:
    """The corpus as a list of documents: blank-line separated paragraphs of a text file, or the
    `text_field` of each JSONL row. A directory contributes each of its files in name order."""
    path = bundled_data.resolve(data_cfg.path, data_cfg.name)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    docs: List[str] = []
    for file in files:
        if file.suffix == ".jsonl":
            for row, line in enumerate(file.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line)[data_cfg.text_field])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{file}:{row}: field '{data_cfg.text_field}': {e}") from None
        else:
            docs.extend(p.strip() for p in file.read_text().split("\n\n") if p.strip())
    if not docs:
        raise ValueError(f"data.path: no documents in {path}")
    return docs


def pack_documents(docs: List[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate the tokenised documents, each closed by EOS, and cut rows of seq_len tokens."""
    ids: List[int] = []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


class GlobalBatches:
    """Global batch `step` = a fixed slice of the epoch's seeded permutation; ranks take equal parts."""

    def __init__(self, rows: torch.Tensor, global_batch: int, micro_batch: int, seed: int, rank: int, world_size: int):
        if len(rows) < global_batch:
            raise ValueError(f"data: {len(rows)} rows of seq_len tokens, fewer than one global batch ({global_batch})")
        self.rows, self.global_batch, self.micro_batch = rows, global_batch, micro_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
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

    def micro_batches(self, step: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, labels) micro batches of this rank for optimizer step `step`."""
        per_rank = self.global_batch // self.world_size
        mine = self.indices(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        for start in range(0, per_rank, self.micro_batch):
            input_ids = self.rows[mine[start : start + self.micro_batch]]
            yield input_ids, input_ids  # causal LM: labels are the inputs, shifted in the loss

    @property
    def accumulation(self) -> int:
        return self.global_batch // self.world_size // self.micro_batch
