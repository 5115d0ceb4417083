"""Data: rows of a source -> examples -> fixed-length rows -> deterministic, resumable batches.

    build(cfg.data, cfg.train, tokenizer, dist_env) -> Data(train, validation, stats)

A weighted mixture of several sources (data.sources) is built by data/mixture.py from the same parts.

Not streaming (the default): rank 0 checks every row, tokenises and packs the whole dataset once,
and writes the rows to a cache directory keyed by the data (files' sizes and times, or the
dataset id), the tokenizer (a hash of it and of the chat template), the format settings and
seq_len; the other ranks wait, then every rank memory-maps the rows. A restarted or requeued job
finds the cache and skips all of it. Global batch `step` is a fixed slice of a seeded permutation
of the rows, so it depends on (seed, step) only: resuming costs nothing, and each rank reads only
its own disjoint part of the batch (data/batches.py). Streaming: data/streaming.py.

A micro batch is a dict of tensors passed to the model as keyword arguments, `labels` popped for
the loss: input_ids, labels and position_ids when packed (see packing.py), input_ids, labels and
attention_mask when padded (trimmed to the micro batch's longest row).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import numpy as np

from tuneforge.compat.torch import default_store
from tuneforge.conf.schema import DataConfig, TrainConfig, source_views
from tuneforge.data import prepare, sources
from tuneforge.data.batches import Collate, EvalBatches, GlobalBatches
from tuneforge.data.packing import ROW_FIELDS, Rows
from tuneforge.data.records import DataError
from tuneforge.data.tokenize import Encoder, tokenizer_fingerprint

CACHE_VERSION = 2  # bump when the cached layout or the tokenisation rules change
BUILD_TIMEOUT = datetime.timedelta(hours=6)  # how long the other ranks wait for rank 0 to build the cache
CPU_OFFER_WAIT = datetime.timedelta(seconds=20)  # how long rank 0 waits for its node's ranks to offer their CPUs
#: data settings that change the rows (with seq_len, the seed when a validation fraction is carved off,
#: the sources and the tokenizer)
ROW_SETTINGS = (
    "format",
    "text_field",
    "instruction_field",
    "input_field",
    "output_field",
    "prompt_field",
    "completion_field",
    "messages_field",
    "text_sample_by",
    "train_on_prompt",
    "packing",
    "validation_fraction",
)


@dataclass
class Data:
    train: Any  # GlobalBatches, or streaming.StreamingBatches
    validation: Optional["EvalBatches"]
    stats: Dict[str, Any] = field(default_factory=dict)  # rows, fill, cache status: logged in the run summary


def build(data_cfg: DataConfig, train_cfg: TrainConfig, tokenizer, dist_env, flatten_packed: bool = False) -> Data:
    """The run's training batches and validation batches. `flatten_packed`: give packed micro
    batches as one row (flash attention finds the examples from the position ids only then).
    Two or more `data.sources`: a weighted mixture (data/mixture.py); one: that source, as data.path."""
    views = source_views(data_cfg)
    if len(views) > 1:
        from tuneforge.data import mixture

        return mixture.build(data_cfg, train_cfg, tokenizer, dist_env, flatten_packed)
    data_cfg, t = views[0], train_cfg
    encoder = Encoder(data_cfg, tokenizer, t.seq_len)
    collate = Collate(packed=data_cfg.packing, flatten=flatten_packed)
    train_src = sources.train_source(data_cfg)
    val_src = sources.validation_source(data_cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if data_cfg.streaming:
        from tuneforge.data.streaming import StreamingBatches

        _, val_rows, stats = (
            cached_rows(None, val_src, encoder, data_cfg, t, pad_id, dist_env)
            if val_src
            else (None, None, {"data_cache": "off (streaming)"})
        )
        train = StreamingBatches(train_src, encoder, data_cfg, t, pad_id, dist_env, collate)
    else:
        train_rows, val_rows, stats = cached_rows(train_src, val_src, encoder, data_cfg, t, pad_id, dist_env)
        if len(train_rows) < t.global_batch:
            raise DataError(
                f"data: {len(train_rows)} rows of train.seq_len={t.seq_len} tokens from {train_src.label}, fewer "
                f"than one global batch (train.global_batch={t.global_batch}); add data or lower train.global_batch"
            )
        train = GlobalBatches(
            train_rows,
            t.global_batch,
            t.micro_batch,
            t.seed,
            dist_env.rank,
            dist_env.world_size,
            collate,
            key=stats["data_key"],
        )
    validation = None
    if val_rows is not None and len(val_rows) and t.eval_every:
        validation = EvalBatches(
            val_rows,
            t.global_batch * t.eval_batches,
            t.micro_batch,
            dist_env.rank,
            dist_env.world_size,
            collate,
            pad_id,
        )
    return Data(train, validation, stats)


# ------------------------------------------------------------------------------------ cache
def cached_rows(
    train_src, val_src, encoder: Encoder, data_cfg, train_cfg, pad_id: int, dist_env
) -> Tuple[Optional[Rows], Optional[Rows], Dict[str, Any]]:
    """(train rows, validation rows, stats) from the cache, built by rank 0 on a miss."""
    describe = {
        "version": CACHE_VERSION,
        "train": train_src.fingerprint(data_cfg) if train_src else None,
        "validation": val_src.fingerprint(data_cfg) if val_src else None,
        "settings": {k: getattr(data_cfg, k) for k in ROW_SETTINGS},
        "seq_len": train_cfg.seq_len,
        "split_seed": train_cfg.seed if data_cfg.validation_fraction and not val_src else None,
        "tokenizer": tokenizer_fingerprint(encoder.tokenizer, encoder.template),
        "pad_id": pad_id,
    }
    key = hashlib.sha256(json.dumps(describe, sort_keys=True).encode()).hexdigest()[:20]
    directory = Path(data_cfg.cache_dir).expanduser().resolve() / key

    def build_into(tmp: Path, cpus: Optional[Set[int]]) -> None:
        meta = _build(train_src, val_src, encoder, data_cfg, train_cfg.seed, pad_id, tmp, cpus)
        (tmp / "meta.json").write_text(json.dumps({**meta, "describe": describe}, indent=1))

    status = shared_build(directory, build_into, dist_env, name=key)
    meta = json.loads((directory / "meta.json").read_text())
    train = _load_rows(directory / "train") if (directory / "train").is_dir() else None
    val = _load_rows(directory / "validation") if (directory / "validation").is_dir() else None
    stats = {**meta["stats"], "data_cache": status, "data_key": key, "data_cache_dir": str(directory)}
    if dist_env.rank == 0:
        print(f"data: cache {status} {directory} ({json.dumps(meta['stats'])})", flush=True)
    return train, val, stats


def _build(train_src, val_src, encoder: Encoder, data_cfg, seed: int, pad_id: int, out: Path, cpus=None) -> dict:
    """Read, check, tokenise (one reading: data/prepare.py, on `cpus`), split and pack; write the rows
    under `out`; return the stats."""
    workers, splits = prepare_workers(data_cfg, cpus), []  # (split, spool, its examples, its records)
    try:
        if train_src:
            spool = prepare.spool_source(train_src, data_cfg, encoder, workers, out / ".spool-train", cpus)
            held = held_out_mask(spool.records, 0 if val_src else data_cfg.validation_fraction, seed)
            example_held = held[spool.record]
            splits.append(("train", spool, np.flatnonzero(~example_held), spool.records - int(held.sum())))
            if held.any():
                splits.append(("validation", spool, np.flatnonzero(example_held), int(held.sum())))
        if val_src:
            spool = prepare.spool_source(val_src, data_cfg, encoder, workers, out / ".spool-validation", cpus)
            splits.append(("validation", spool, np.arange(len(spool.lengths)), spool.records))
        stats: Dict[str, Any] = {}
        for split, spool, selected, n_records in splits:
            if not n_records and (split == "validation" or train_src is None):
                continue
            if not n_records:
                raise DataError(f"data: no examples in {train_src.label}")
            rows = prepare.write_rows(
                spool, selected, data_cfg.packing, data_cfg.format == "text", encoder.seq_len, pad_id, out / split
            )
            stats.update(
                {f"{split}_examples": n_records, f"{split}_rows": rows["rows"], f"{split}_fill": round(rows["fill"], 4)}
            )
    finally:
        for _, spool, _, _ in splits:
            spool.close()
    stats.update(truncated=encoder.truncated, dropped_without_targets=encoder.dropped)
    return {"stats": stats}


def prepare_workers(data_cfg, cpus: Optional[Set[int]] = None) -> int:
    """data.prepare_workers, or one per CPU given (default: those this process may run on)."""
    return data_cfg.prepare_workers or len(cpus or own_cpus())


def own_cpus() -> Set[int]:
    """The CPUs this process may run on (its share of the node where Slurm binds tasks); the trainer's
    thread count per rank reads it too."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def held_out_mask(records: int, fraction: float, seed: int) -> np.ndarray:
    """Which of `records` rows the validation split holds: a seeded `fraction` of them."""
    held = np.zeros(records, dtype=bool)
    if fraction > 0 and records:
        held[np.random.default_rng(seed).permutation(records)[: max(1, round(records * fraction))]] = True
    return held


def split_validation(records: List[dict], fraction: float, seed: int) -> Tuple[List[dict], List[dict]]:
    """(train, validation): held_out_mask's rows held out, both in their original order (documents
    stay in sequence)."""
    held = held_out_mask(len(records), fraction, seed)
    return [r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h]


def held_out_records(data_cfg: DataConfig, seed: int, limit: int) -> List[dict]:
    """The first `limit` validation rows, as the run holds them out (data.validation_path, else the
    data.validation_fraction carved off with `seed`): the default prompts of eval.prompts."""
    import itertools

    val_src = sources.validation_source(data_cfg)
    if val_src is not None:
        return list(itertools.islice(sources.rows(val_src, data_cfg), limit))
    if not data_cfg.validation_fraction:
        return []
    train = list(sources.rows(sources.train_source(data_cfg), data_cfg))
    return split_validation(train, data_cfg.validation_fraction, seed)[1][:limit]


def _load_rows(directory: Path) -> Rows:
    return Rows(*(np.load(directory / f"{name}.npy", mmap_mode="r") for name in ROW_FIELDS))


def shared_build(directory: Path, build_into: Callable[[Path, Optional[Set[int]]], None], dist_env, name: str) -> str:
    """Make sure `directory` (complete once its meta.json exists) is there for every rank: "hit" if
    it was, "built" if rank 0 built it, on the CPUs of every rank of its node (`node_cpus`). The
    others wait on the process group's store (no collective timeout), and a failure on rank 0 is
    raised on every rank with rank 0's message. A rank that still cannot see it (a cache dir local
    to each node) builds its own copy, one rank per host, on its own CPUs."""
    store = default_store() if dist_env.world_size > 1 else None
    status = "hit" if (directory / "meta.json").is_file() else None
    if dist_env.rank == 0:

        def build() -> str:
            cpus = node_cpus(store, name, dist_env.local_world_size)
            return _build_atomic(directory, lambda tmp: build_into(tmp, cpus))

        status = _publish(store, f"tuneforge-data/{name}", lambda: status or build())
    elif store is not None:
        if status is None and dist_env.local_rank:
            store.set(_cpus_key(name, dist_env.local_rank), json.dumps(sorted(own_cpus())))
        published = _wait(store, f"tuneforge-data/{name}")
        status = status or ("hit" if published == "hit" else "built")
    if not (directory / "meta.json").is_file():  # not shared with rank 0's node: this host builds its own
        host_key = f"tuneforge-data/{name}/{socket.gethostname()}"
        if store is None or store.add(host_key + "/builder", 1) == 1:
            status = _publish(store, host_key, lambda: _build_atomic(directory, lambda tmp: build_into(tmp, None)))
        else:
            _wait(store, host_key)
    return status


def node_cpus(store, name: str, local_world_size: int) -> Set[int]:
    """The CPUs of rank 0 and of the other ranks of its node, which only wait while it builds: each
    offers its own (where Slurm binds every task to its share, rank 0's alone would be one share of
    the node). Rank 0's own if they are not all offered within CPU_OFFER_WAIT."""
    cpus = set(own_cpus())
    keys = [_cpus_key(name, local_rank) for local_rank in range(1, local_world_size)]
    if store is None or not keys:
        return cpus
    try:
        store.wait(keys, CPU_OFFER_WAIT)
    except Exception:  # (a rank that found the cache, or is slow to start: the build does not wait for it)
        return cpus
    return cpus.union(*(json.loads(store.get(key)) for key in keys))


def _cpus_key(name: str, local_rank: int) -> str:
    return f"tuneforge-data/{name}/cpus/{socket.gethostname()}/{local_rank}"


def _publish(store, key: str, work: Callable[[], str]) -> str:
    try:
        status = work()
    except Exception as e:
        if store is not None:
            store.set(key, f"error:{type(e).__name__}: {e}")
        raise
    if store is not None:
        store.set(key, status)
    return status


def _wait(store, key: str) -> str:
    store.wait([key], BUILD_TIMEOUT)
    value = store.get(key).decode()
    if value.startswith("error:"):
        raise DataError(f"rank 0 could not prepare the data: {value[6:]}")
    return value


def _build_atomic(directory: Path, build_into: Callable[[Path], None]) -> str:
    """Build into a temporary sibling, then rename: a killed build never leaves a half cache."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build_into(tmp)
        try:
            os.replace(tmp, directory)
        except OSError:  # another job built the same key meanwhile: keep theirs
            if not (directory / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return "built"
