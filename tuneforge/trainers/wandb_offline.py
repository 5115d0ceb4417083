"""Read W&B offline runs back from a run directory, without W&B servers or `wandb sync`.

wandb 0.31 ships no Python reader for its run files (the old ``sdk/internal/datastore.py`` is gone: the
Go ``wandb-core`` writes them), so this parses the format itself. A ``run-<id>.wandb`` file is a
LevelDB-style log: a 7-byte file header (``":W&B"``, magic 0xBEE1, version 0), then 32 KiB blocks of
chunks, each with a 7-byte header ``<IHB`` (crc32 of type byte + data, data length, type: 1 full,
2 first, 3 middle, 4 last). A chunk header never straddles a block: fewer than 7 bytes left in a block
are zero padding. Reassembled chunks are ``wandb_internal_pb2.Record`` protobufs.

A requeued run re-enters W&B with the same id but a new offline directory
(``offline-run-<YYYYmmdd_HHMMSS>-<id>[-<n>]``; ``-<n>`` when two start within the same second), so the
readers below walk every directory in start order.
"""

from __future__ import annotations

import json
import pathlib
import re
import struct
import zlib
from typing import Any, Iterator

_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_DIR_RE = re.compile(r"^offline-run-(\d{8}_\d{6})-(.+)$")


def find_offline_runs(run_dir) -> list[pathlib.Path]:
    """The ``run-<id>.wandb`` files of every offline run under ``<run_dir>/wandb``, oldest first."""
    keyed = []
    for path in pathlib.Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb"):
        m = _DIR_RE.match(path.parent.name)
        run_id = path.name[len("run-") : -len(".wandb")]
        if not m or not m.group(2).startswith(run_id):
            continue
        rest = m.group(2)[len(run_id) :]  # "" or "-<n>", the same-second collision suffix
        suffix = int(rest[1:]) if rest[1:].isdigit() else 0
        # Sort on (timestamp, suffix): a plain string sort puts "<id>/" after "<id>-1".
        keyed.append(((m.group(1), suffix), path))
    return [p for _, p in sorted(keyed)]


def read_records(wandb_file) -> list:
    """Every ``Record`` in a ``.wandb`` file. Stops quietly at a torn or corrupt tail (killed writer)."""
    return list(_iter_records(pathlib.Path(wandb_file).read_bytes()))


def _iter_records(data: bytes) -> Iterator[Any]:
    from tuneforge.compat.wandb import record_protobuf

    pb = record_protobuf()  # imported here: only readers need protobuf

    if len(data) < _FILE_HEADER.size:
        return
    ident, magic, _version = _FILE_HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"not a W&B run file (header {data[:7]!r})")
    pos, parts = _FILE_HEADER.size, []
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER.size:  # block trailer: padding only
            pos += left
            continue
        if pos + _CHUNK_HEADER.size > len(data):
            return
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        chunk = data[pos + _CHUNK_HEADER.size : pos + _CHUNK_HEADER.size + length]
        if kind == 0 or len(chunk) < length:
            return  # zero-filled or truncated tail: the writer stopped here
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            return
        pos += _CHUNK_HEADER.size + length
        if kind in (_FULL, _FIRST):
            parts = [chunk]
        else:
            parts.append(chunk)
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def _key(item) -> str:
    # Nested dicts arrive as a key path (["eval", "loss"]); W&B shows them dotted.
    return item.key or ".".join(item.nested_key)


def _value(item) -> Any:
    # Most values are JSON text; newer clients may fill one of the typed fields instead.
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which == "none":
        return None
    if which == "json":
        return json.loads(item.json)
    if which:
        return getattr(item, which)
    return json.loads(item.value_json) if item.value_json else None


def _records(run_dir) -> Iterator[tuple[pathlib.Path, Any]]:
    for path in find_offline_runs(run_dir):
        for record in read_records(path):
            yield path, record


def read_history(run_dir) -> list[dict]:
    """Every history row (metrics, ``_step``, ``_runtime``, ``_timestamp``) of every offline run, in order.

    Steps replayed after a requeue appear once per attempt, as W&B itself would upload them.
    """
    rows = []
    for _, record in _records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append({_key(item): _value(item) for item in record.history.item})
    return rows


def read_run_ids(run_dir) -> set[str]:
    """The W&B run ids seen under run_dir (one for a healthy, possibly requeued, run)."""
    ids = set()
    for path in find_offline_runs(run_dir):
        ids.add(path.name[len("run-") : -len(".wandb")])  # present even when the writer died early
        ids.update(r.run.run_id for r in read_records(path) if r.WhichOneof("record_type") == "run")
    return ids


def _apply(target: dict, update) -> None:
    for item in update.update:
        target[_key(item)] = _value(item)
    for item in update.remove:
        target.pop(_key(item), None)


def read_config(run_dir) -> dict:
    """The run config as W&B stored it (W&B's own ``_wandb`` entry left out); later attempts win."""
    config: dict = {}
    for _, record in _records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply(config, record.run.config)
        elif kind == "config":
            _apply(config, record.config)
    config.pop("_wandb", None)
    return config


def read_summary(run_dir) -> dict:
    """The run summary: the last value of each metric plus explicit summary updates."""
    summary: dict = {}
    for _, record in _records(run_dir):
        if record.WhichOneof("record_type") == "summary":
            _apply(summary, record.summary)
    return {k: v for k, v in summary.items() if k != "_wandb" and not k.startswith("_wandb.")}
