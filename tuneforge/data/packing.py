"""Examples -> fixed-length rows: packed (several examples per row) or padded (one per row).

A row is three int arrays of length seq_len (input_ids, labels, position_ids) plus its count of
real tokens. In a packed row the position ids restart at 0 for every example: transformers'
attention mask code (masking_utils.find_packed_sequence_indices) reads the restarts and lets each
token attend only within its own example (a block-diagonal causal mask for sdpa/eager; the
varlen kernels for flash attention, which need the micro batch flattened to one row). The first
token of every example gets IGNORE_INDEX as label, so no loss is taken on predicting an example
from the end of the previous one; a packed row therefore gives the loss of its examples run alone.

- Text documents (`split_long=True`) are laid end to end and cut at row boundaries: rows are full.
- Instruction examples (`split_long=False`, each at most seq_len) are never split: best-fit
  decreasing puts each, longest first, into the fullest row it still fits in.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Sequence, Tuple

import numpy as np

from tuneforge.data.tokenize import IGNORE_INDEX, Example

ROW_FIELDS = ("input_ids", "labels", "position_ids", "lengths")


@dataclass
class Rows:
    input_ids: np.ndarray  # [rows, seq_len] int32, pad_id after the real tokens
    labels: np.ndarray  # [rows, seq_len] int32, IGNORE_INDEX on prompts, example starts and padding
    position_ids: np.ndarray  # [rows, seq_len] int32, restarting at 0 for every example (and the padding)
    lengths: np.ndarray  # [rows] int32, real tokens in each row

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def fill(self) -> float:
        """Real tokens / row tokens."""
        return float(self.lengths.sum()) / max(1, self.input_ids.size)

    def take(self, index) -> "Rows":
        return Rows(self.input_ids[index], self.labels[index], self.position_ids[index], self.lengths[index])


def concatenate(parts: Sequence[Rows]) -> Rows:
    """Rows of several arrays, one after the other."""
    return Rows(*(np.concatenate([getattr(r, f) for r in parts]) for f in ROW_FIELDS))


def row_targets(rows: Rows, chunk: int = 4096) -> np.ndarray:
    """Target tokens (labels that count in the loss) of each row, read in chunks (rows may be memory-mapped)."""
    out = np.empty(len(rows), np.int64)
    for start in range(0, len(rows), chunk):
        out[start : start + chunk] = (np.asarray(rows.labels[start : start + chunk]) != IGNORE_INDEX).sum(1)
    return out


def pack(examples: Sequence[Example], seq_len: int, pad_id: int, split_long: bool) -> Rows:
    """Pack examples into rows of seq_len tokens."""
    lengths = [len(ids) for ids, _ in examples]
    layout = concatenated(lengths, seq_len) if split_long else best_fit_decreasing(lengths, seq_len)
    return materialise(_in_memory(examples), list(layout), seq_len, pad_id)


def pad(examples: Sequence[Example], seq_len: int, pad_id: int, split_long: bool) -> Rows:
    """One example per row (documents longer than seq_len split into several), padded to seq_len."""
    layout = padded([len(ids) for ids, _ in examples], seq_len, split_long)
    return materialise(_in_memory(examples), list(layout), seq_len, pad_id)


#: a row's layout: (example index, first token, end token) pieces, in order
Layout = List[List[tuple]]
#: (example index, first token, end token) -> that piece's (input_ids, labels)
PieceReader = Callable[[int, int, int], Tuple[Sequence[int], Sequence[int]]]


def layout_rows(lengths: Sequence[int], seq_len: int, packed: bool, split_long: bool) -> Tuple[Iterable[list], int]:
    """(the rows' layouts, as an iterable, and how many there are) for examples of these lengths:
    what `pack` (packed) or `pad` would make, computed from the lengths alone."""
    if packed and split_long:  # full rows but the last
        return concatenated(lengths, seq_len), -(-int(np.sum(lengths, dtype=np.int64)) // seq_len)
    if packed:
        layout = best_fit_decreasing(lengths, seq_len)
        return layout, len(layout)
    n = int(np.sum(-(-np.asarray(lengths, np.int64) // seq_len))) if split_long else len(lengths)
    return padded(lengths, seq_len, split_long), n


def concatenated(lengths: Sequence[int], seq_len: int) -> Iterator[list]:
    """Examples end to end, cut at row boundaries (a generator: rows are made as they are written)."""
    row: list = []
    free = seq_len
    for i, n in enumerate(lengths):
        start = 0
        while start < n:
            if free == 0:
                yield row
                row, free = [], seq_len
            end = min(n, start + free)
            row.append((i, start, end))
            free -= end - start
            start = end
    if row:
        yield row


def padded(lengths: Sequence[int], seq_len: int, split_long: bool) -> Iterator[list]:
    for i, n in enumerate(lengths):
        for start in range(0, n, seq_len) if split_long else [0]:
            yield [(i, start, min(n, start + seq_len))]


def best_fit_decreasing(lengths: Sequence[int], seq_len: int) -> Layout:
    """Each example, longest first, into the fullest row it still fits in (needs every length first)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # deterministic: ties by index
    layout: Layout = []
    free: List[tuple] = []  # sorted (free tokens, row index) of rows with room left
    for i in order:
        n = int(lengths[i])
        at = bisect.bisect_left(free, (n, -1))  # the row with the least room that still fits n
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = seq_len, len(layout)
            layout.append([])
        layout[row].append((i, 0, n))
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return layout


def _in_memory(examples: Sequence[Example]) -> PieceReader:
    return lambda i, start, end: (examples[i][0][start:end], examples[i][1][start:end])


def materialise(piece: PieceReader, layout: Layout, seq_len: int, pad_id: int) -> Rows:
    """The rows of `layout`, their tokens read with `piece`."""
    n = len(layout)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32)
    position_ids = np.zeros((n, seq_len), dtype=np.int32)
    lengths = np.zeros(n, dtype=np.int32)
    for r, pieces in enumerate(layout):
        at = 0
        for i, start, end in pieces:
            ids, labs = piece(i, start, end)
            k = end - start
            input_ids[r, at : at + k] = ids
            labels[r, at : at + k] = labs
            labels[r, at] = IGNORE_INDEX  # not predictable from the previous example
            position_ids[r, at : at + k] = np.arange(k)
            at += k
        position_ids[r, at:] = np.arange(seq_len - at)  # the padding: a segment of its own
        lengths[r] = at
    return Rows(input_ids, labels, position_ids, lengths)
