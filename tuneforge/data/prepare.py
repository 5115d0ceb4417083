"""A source -> the token cache's rows, in one reading and with memory flat in the corpus size.

    spool = spool_source(source, data_cfg, encoder, workers, directory)   # read, check, tokenise
    write_rows(spool, selected, packed, split_long, seq_len, pad_id, out)  # arrange, write

The rows are read and checked as they come (sources.rows: for local files the reader and the checks
of the check before submission, here on the same reading that feeds the tokenizer), in chunks of ENCODE_CHUNK that
`workers` forked processes tokenise, a few chunks in flight. The examples are spooled to two int32
files as they come back, with their lengths and the record each came from: what stays in memory is
three integers an example. A bad row stops the tokenising but not the reading, so that the error
names every bad row as the check before submission does. The rows are then laid out from the
lengths alone (packing.layout_rows) and written chunk by chunk into .npy files; only best-fit
packing holds a layout of all rows, since it places the longest example first.

`rows_from_records`: the same for rows already in memory (a streaming window), returned as Rows.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import shutil
import signal
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Set

import numpy as np

from tuneforge.data import sources
from tuneforge.data.packing import ROW_FIELDS, Rows, layout_rows, materialise, pack, pad
from tuneforge.data.records import DataError
from tuneforge.data.tokenize import IGNORE_INDEX, Encoder, Example

ENCODE_CHUNK = 1024  # rows tokenised per call (the tokenizers library batches them in Rust)
WRITE_CHUNK = 1024  # rows made and written at a time
IN_FLIGHT = 2  # chunks queued per worker: enough to keep it busy, few enough to hold
NO_TARGETS = "data: no example has a token to learn from (all prompts, or truncated before the response)"


# ------------------------------------------------------------------------------------ tokenising
def encoded_chunks(
    chunks: Iterable[List[dict]], encoder: Encoder, workers: int = 1, cpus: Optional[Set[int]] = None
) -> Iterator[tuple]:
    """(ids, labels, lengths, record indices, truncated, dropped, rows) of each chunk of rows, in order:
    the examples of a chunk end to end in two int32 arrays (4 bytes a token, where a list holds an
    8-byte pointer to a 28-byte int; and cheap to send between processes).

    With workers > 1 and more than one chunk, forked processes encode them: the tokenizer's Rust
    threads use the cores anyway, but half of the time goes to Python (the labels, reading the
    encodings), which one process runs on one core (benchmarks/data_prep.py). The encoder's counts
    are kept up to date either way. `cpus`: the CPUs the workers may run on (default: this process's)."""
    chunks = iter(chunks)
    first = list(itertools.islice(chunks, 2))
    if workers <= 1 or len(first) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield from (_encode_chunk(encoder, chunk) for chunk in itertools.chain(first, chunks))
        return
    for encoded in _encode_forked(itertools.chain(first, chunks), encoder, workers, cpus):
        encoder.truncated += encoded[4]  # counted by the workers' copies of the encoder
        encoder.dropped += encoded[5]
        yield encoded


def _encode_chunk(encoder: Encoder, recs: Sequence[dict]) -> tuple:
    truncated, dropped = encoder.truncated, encoder.dropped
    examples = encoder.encode_indexed(recs)
    lengths = np.fromiter((len(ids) for _, ids, _ in examples), np.int64, len(examples))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(ids for _, ids, _ in examples), np.int32, total)
    labels = np.fromiter(itertools.chain.from_iterable(labels for _, _, labels in examples), np.int32, total)
    index = np.fromiter((i for i, _, _ in examples), np.int64, len(examples))
    return ids, labels, lengths, index, encoder.truncated - truncated, encoder.dropped - dropped, len(recs)


_ENCODER: tuple = ()  # (the encoder, their CPUs) the forked workers use: inherited, never pickled


def _encode_forked(chunks: Iterator[List[dict]], encoder: Encoder, workers: int, cpus) -> Iterator[tuple]:
    global _ENCODER
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    # each worker tokenises on one thread (the tokenizers library would disable its threads in a forked
    # process anyway, with a warning); set before the fork, so that the workers see it
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ENCODER = (encoder, cpus)
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_start) as pool:
            pending: collections.deque = collections.deque()
            for chunk in chunks:  # (Pool.imap would read every chunk ahead into its queue)
                pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
                if len(pending) >= IN_FLIGHT * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _ENCODER = ()
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def _encode_in_worker(chunk: List[dict]) -> tuple:
    return _encode_chunk(_ENCODER[0], chunk)


def _worker_start() -> None:
    """A worker leaves signals to the rank that forked it: the rank's handlers (requeue on SIGUSR1/SIGTERM,
    Ctrl-C) would make a worker ignore the pool's SIGTERM, and the pool would never close. It runs on
    the CPUs it was given (those of the node's ranks that wait for the cache, where Slurm binds each
    rank to its own), if the machine lets it."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cpus = _ENCODER[1]
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:  # outside this job's cpuset: the rank's own CPUs
            pass


def encode_all(recs: Sequence[dict], encoder: Encoder, workers: int = 1) -> List[Example]:
    """The examples of rows in memory, as int32 views of one array per chunk."""
    chunks = (list(recs[start : start + ENCODE_CHUNK]) for start in range(0, len(recs), ENCODE_CHUNK))
    examples: List[Example] = []
    for ids, labels, lengths, *_ in encoded_chunks(chunks, encoder, workers):
        ends = np.cumsum(lengths)
        examples += [(ids[e - n : e], labels[e - n : e]) for n, e in zip(lengths.tolist(), ends.tolist())]
    return examples


def rows_from_records(recs: Sequence[dict], encoder: Encoder, data_cfg, pad_id: int, workers: int = 1) -> Rows:
    """Tokenise well-formed rows and arrange them into rows of seq_len (packed, or one per row)."""
    examples = encode_all(recs, encoder, workers)
    if not examples:
        raise DataError(NO_TARGETS)
    arrange = pack if data_cfg.packing else pad
    return arrange(examples, encoder.seq_len, pad_id, split_long=data_cfg.format == "text")


# ------------------------------------------------------------------------------------ the spool
class Spool:
    """Examples appended to two int32 files under `directory` (ids, labels); read back by piece."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True)
        self.paths = (directory / "input_ids.bin", directory / "labels.bin")
        self._writers = [open(p, "wb") for p in self.paths]
        self._lengths: List[np.ndarray] = []
        self._records: List[np.ndarray] = []
        self.records = 0  # rows read (every well-formed one, with or without a target)
        self.lengths = self.record = self.starts = np.zeros(0, np.int64)  # per example, once finished
        self._fds: List[int] = []

    def add(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, index: np.ndarray, rows: int) -> None:
        """A chunk of `rows` rows and the examples they gave (`index`: their rows within the chunk)."""
        self._writers[0].write(ids.tobytes())
        self._writers[1].write(labels.tobytes())
        self._lengths.append(lengths)
        self._records.append(index + self.records)
        self.records += rows

    def finish(self) -> "Spool":
        for f in self._writers:
            f.close()
        self.lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        self.record = np.concatenate(self._records) if self._records else np.zeros(0, np.int64)
        self.starts = np.cumsum(self.lengths) - self.lengths
        self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        return self

    def reader(self, selected: np.ndarray):
        """The piece reader of the examples `selected` (indices, in order): piece(j, start, end) is
        tokens [start, end) of example selected[j], read from the files (not mapped: the pages read
        do not stay in this process)."""
        starts = self.starts[selected]

        def piece(j: int, start: int, end: int):
            at, n = int(starts[j] + start) * 4, (end - start) * 4
            return tuple(np.frombuffer(os.pread(fd, n, at), np.int32) for fd in self._fds)

        return piece

    def stream(self, selected: np.ndarray, starts: np.ndarray, ends: np.ndarray, t0: int, t1: int):
        """(ids, labels): tokens [t0, t1) of the examples `selected` laid end to end (`starts`, `ends`:
        where each begins and ends in that stream), read in one piece per run of examples adjacent in
        the files."""
        first = int(np.searchsorted(ends, t0, side="right"))
        last = int(np.searchsorted(starts, t1, side="left"))
        index = selected[first:last]
        begin = self.starts[index] + np.maximum(0, t0 - starts[first:last])  # of each piece, in the files
        end = self.starts[index] + np.minimum(self.lengths[index], t1 - starts[first:last])
        breaks = np.flatnonzero(begin[1:] != end[:-1]) + 1  # runs of pieces contiguous in the files
        run_begin, run_end = begin[np.r_[0, breaks]], end[np.r_[breaks - 1, len(end) - 1]]
        out = []
        for fd in self._fds:
            parts = [os.pread(fd, int(b - a) * 4, int(a) * 4) for a, b in zip(run_begin, run_end)]
            out.append(np.frombuffer(b"".join(parts), np.int32))
        return out

    def close(self) -> None:
        """Close and delete the files (finished or not)."""
        for f in self._writers:
            f.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        shutil.rmtree(self.paths[0].parent, ignore_errors=True)


def spool_source(
    source, data_cfg, encoder: Encoder, workers: int, directory: Path, cpus: Optional[Set[int]] = None
) -> Spool:
    """Every well-formed row of `source` tokenised into a Spool, in one reading (sources.rows: a
    bad row stops the tokenising; the DataError naming them all comes once the reading ends)."""
    spool = Spool(directory)
    read = sources.rows(source, data_cfg)
    chunks = iter(lambda: list(itertools.islice(read, ENCODE_CHUNK)), [])
    try:
        for ids, labels, lengths, index, _, _, rows in encoded_chunks(chunks, encoder, workers, cpus):
            spool.add(ids, labels, lengths, index, rows)
    except BaseException:
        spool.close()
        raise
    return spool.finish()


# ------------------------------------------------------------------------------------ writing rows
def write_rows(
    spool: Spool, selected: np.ndarray, packed: bool, split_long: bool, seq_len: int, pad_id: int, out: Path
) -> dict:
    """The rows of the examples `selected` (spool indices, in order), written to out/<field>.npy;
    returns their count and fill."""
    if not len(selected):
        raise DataError(NO_TARGETS)
    lengths = spool.lengths[selected]
    layout, n = layout_rows(lengths, seq_len, packed, split_long)
    if packed and split_long:  # documents end to end: the one layout a corpus at scale has, made with numpy
        made = _concatenated_rows(spool, selected, seq_len, pad_id)
    else:
        piece, layout = spool.reader(selected), iter(layout)
        made = (
            materialise(piece, chunk, seq_len, pad_id)
            for chunk in iter(lambda: list(itertools.islice(layout, WRITE_CHUNK)), [])
        )
    out.mkdir(parents=True)
    files = {name: open(out / f"{name}.npy", "wb") for name in ROW_FIELDS}
    written = 0
    try:
        for name, f in files.items():
            shape = (n,) if name == "lengths" else (n, seq_len)
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
        for rows in made:
            for name, f in files.items():
                f.write(np.ascontiguousarray(getattr(rows, name), np.int32).tobytes())
            written += len(rows)
    finally:
        for f in files.values():
            f.close()
    assert written == n, (written, n)
    return {"rows": n, "fill": float(lengths.sum()) / max(1, n * seq_len)}


def _concatenated_rows(spool: Spool, selected: np.ndarray, seq_len: int, pad_id: int) -> Iterator[Rows]:
    """The rows of packing.concatenated's layout, WRITE_CHUNK at a time: the selected examples' tokens
    read end to end, and a segment (position ids from 0, the first label ignored) restarting at every
    example start and row start, and at the padding of the last row. The same rows as materialise
    (tests/test_data.py), whose loop costs ~15 us a piece: a third of a 20 MB corpus's build."""
    lengths = spool.lengths[selected]
    ends = np.cumsum(lengths)
    starts = ends - lengths  # of each selected example in the stream of them end to end
    total, span = int(ends[-1]), WRITE_CHUNK * seq_len
    for t0 in range(0, total, span):
        t1 = min(total, t0 + span)
        real, n_rows = t1 - t0, -(-(t1 - t0) // seq_len)
        size = n_rows * seq_len
        ids, labels = np.full(size, pad_id, np.int32), np.full(size, IGNORE_INDEX, np.int32)
        ids[:real], labels[:real] = spool.stream(selected, starts, ends, t0, t1)
        restart = np.zeros(size + 1, bool)
        restart[0:size:seq_len] = True
        first, last = np.searchsorted(starts, [t0, t1])
        restart[starts[first:last] - t0] = True
        restart[real] = True  # the padding (or, at `size`, nothing)
        restart = restart[:size]
        labels[restart] = IGNORE_INDEX
        at = np.arange(size)
        position = at - np.maximum.accumulate(np.where(restart, at, 0))
        row_lengths = np.full(n_rows, seq_len, np.int32)
        row_lengths[-1] = real - (n_rows - 1) * seq_len
        shape = (n_rows, seq_len)
        yield Rows(ids.reshape(shape), labels.reshape(shape), position.astype(np.int32).reshape(shape), row_lengths)
