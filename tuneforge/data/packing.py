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
import itertools
import multiprocessing
import os
import signal
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from tuneforge.conf.schema import DataConfig
from tuneforge.data.records import DataError
from tuneforge.data.tokenize import IGNORE_INDEX, Encoder, Example

ENCODE_CHUNK = 1024  # rows tokenised per call (the tokenizers library batches them in Rust)
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
    if split_long:
        layout = _concatenate(examples, seq_len)
    else:
        layout = _best_fit_decreasing([len(ids) for ids, _ in examples], seq_len)
    return _materialise(examples, layout, seq_len, pad_id)


def pad(examples: Sequence[Example], seq_len: int, pad_id: int, split_long: bool) -> Rows:
    """One example per row (documents longer than seq_len split into several), padded to seq_len."""
    layout = []
    for i, (ids, _) in enumerate(examples):
        for start in range(0, len(ids), seq_len) if split_long else [0]:
            layout.append([(i, start, min(len(ids), start + seq_len))])
    return _materialise(examples, layout, seq_len, pad_id)


#: a row's layout: (example index, first token, end token) pieces, in order
Layout = List[List[tuple]]


def _concatenate(examples: Sequence[Example], seq_len: int) -> Layout:
    layout: Layout = [[]]
    free = seq_len
    for i, (ids, _) in enumerate(examples):
        start = 0
        while start < len(ids):
            if free == 0:
                layout.append([])
                free = seq_len
            end = min(len(ids), start + free)
            layout[-1].append((i, start, end))
            free -= end - start
            start = end
    return [row for row in layout if row]


def _best_fit_decreasing(lengths: Sequence[int], seq_len: int) -> Layout:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # deterministic: ties by index
    layout: Layout = []
    free: List[tuple] = []  # sorted (free tokens, row index) of rows with room left
    for i in order:
        n = lengths[i]
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


def _materialise(examples: Sequence[Example], layout: Layout, seq_len: int, pad_id: int) -> Rows:
    n = len(layout)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32)
    position_ids = np.zeros((n, seq_len), dtype=np.int32)
    lengths = np.zeros(n, dtype=np.int32)
    for r, pieces in enumerate(layout):
        at = 0
        for i, start, end in pieces:
            ids, labs = examples[i]
            k = end - start
            input_ids[r, at : at + k] = ids[start:end]
            labels[r, at : at + k] = labs[start:end]
            labels[r, at] = IGNORE_INDEX  # not predictable from the previous example
            position_ids[r, at : at + k] = np.arange(k)
            at += k
        position_ids[r, at:] = np.arange(seq_len - at)  # the padding: a segment of its own
        lengths[r] = at
    return Rows(input_ids, labels, position_ids, lengths)


def rows_from_records(recs: List[dict], encoder: Encoder, data_cfg: DataConfig, pad_id: int, workers: int = 1) -> Rows:
    """Tokenise well-formed rows and arrange them into rows of seq_len (packed, or one per row); with
    `workers` > 1 the tokenising is shared by that many processes (the same rows as one process)."""
    examples = encode_all(recs, encoder, workers)
    if not examples:
        raise DataError("data: no example has a token to learn from (all prompts, or truncated before the response)")
    arrange = pack if data_cfg.packing else pad
    return arrange(examples, encoder.seq_len, pad_id, split_long=data_cfg.format == "text")


def encode_all(recs: List[dict], encoder: Encoder, workers: int = 1) -> List[Example]:
    """encoder.encode over `recs` in chunks of ENCODE_CHUNK, each chunk's examples as int32 views of
    one array (4 bytes a token, where a list holds an 8-byte pointer to a 28-byte int; and cheap to
    send between processes).

    With workers > 1 and more than one chunk, forked processes encode the chunks: the tokenizer's Rust
    threads use the cores anyway, but half of the time goes to Python (converting the encodings,
    labels), which one process runs on one core (benchmarks/data_prep.py)."""
    chunks = range(0, len(recs), ENCODE_CHUNK)
    forked = workers > 1 and len(chunks) > 1 and "fork" in multiprocessing.get_all_start_methods()
    if forked:
        encoded = _encode_forked(recs, encoder, chunks, workers)
    else:
        encoded = (_encode_chunk(encoder, recs[start : start + ENCODE_CHUNK]) for start in chunks)
    examples: List[Example] = []
    for ids, labels, lengths, truncated, dropped in encoded:
        ends = np.cumsum(lengths)
        examples += [(ids[e - n : e], labels[e - n : e]) for n, e in zip(lengths.tolist(), ends.tolist())]
        if forked:  # counted by the workers' copies of the encoder
            encoder.truncated += truncated
            encoder.dropped += dropped
    return examples


def _encode_chunk(encoder: Encoder, recs: Sequence[dict]) -> tuple:
    truncated, dropped = encoder.truncated, encoder.dropped
    pairs = encoder.encode(recs)
    lengths = np.fromiter((len(ids) for ids, _ in pairs), np.int64, len(pairs))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in pairs), np.int32, total)
    labels = np.fromiter(itertools.chain.from_iterable(labels for _, labels in pairs), np.int32, total)
    return ids, labels, lengths, encoder.truncated - truncated, encoder.dropped - dropped


_FORKED: tuple = ()  # (records, encoder) the forked workers read: inherited, never pickled


def _encode_forked(recs: List[dict], encoder: Encoder, chunks: range, workers: int):
    global _FORKED
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    # each worker tokenises on one thread (the tokenizers library would disable its threads in a forked
    # process anyway, with a warning); set before the fork, so that the workers see it
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _FORKED = (recs, encoder)
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(chunks)), initializer=_worker_signals) as pool:
            yield from pool.imap(_encode_forked_chunk, chunks)
    finally:
        _FORKED = ()
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def _encode_forked_chunk(start: int) -> tuple:
    recs, encoder = _FORKED
    return _encode_chunk(encoder, recs[start : start + ENCODE_CHUNK])


def _worker_signals() -> None:
    """A worker leaves signals to the rank that forked it: the rank's handlers (requeue on SIGUSR1/SIGTERM,
    Ctrl-C) would make a worker ignore the pool's SIGTERM, and the pool would never close."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
