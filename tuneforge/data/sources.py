"""Where rows come from: local files and folders, or a Hugging Face dataset, read with `datasets`.

A `Source` names the data; `rows(source, data_cfg)` yields its rows as dicts: local files read
and checked in one pass by data/records.py (the reader and the checks of the check before
submission), a hub dataset through `datasets.load_dataset(streaming=True)`, checked as its rows
arrive. `dataset()` gives either as a `datasets` IterableDataset, whose position can be saved:
what a streaming run reads (data/streaming.py).
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from tuneforge import data as bundled_data
from tuneforge.conf.schema import source_views
from tuneforge.data import records
from tuneforge.data.records import DataError


@dataclass
class Source:
    """Local files (in order), or a dataset id for datasets.load_dataset."""

    label: str  # for messages: a path or "hub:<id>[<split>]"
    files: List[Path] = field(default_factory=list)
    hub_id: Optional[str] = None

    @property
    def is_local(self) -> bool:
        return self.hub_id is None

    def fingerprint(self, data_cfg) -> list:
        """What identifies the content: each file's path, size and modification time, or the dataset
        id, config, split and revision (pin data.hub_revision for a cache that follows the data)."""
        if self.is_local:
            return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]
        return [self.hub_id, data_cfg.hub_config, data_cfg.hub_split, data_cfg.hub_revision]


def train_source(data_cfg) -> Source:
    if data_cfg.hub_id:
        return Source(f"hub:{data_cfg.hub_id}[{data_cfg.hub_split}]", hub_id=data_cfg.hub_id)
    path = bundled_data.resolve(data_cfg.path, data_cfg.name)
    if path is None or not path.exists():
        raise DataError(f"data.path: '{data_cfg.path or data_cfg.name}' does not exist")
    return _local(path)


def validation_source(data_cfg) -> Optional[Source]:
    if not data_cfg.validation_path:
        return None
    path = bundled_data.resolve_path(data_cfg.validation_path)
    if not path.exists():
        raise DataError(f"data.validation_path: '{data_cfg.validation_path}' does not exist")
    return _local(path)


def _local(path: Path) -> Source:
    files = records.data_files(path)
    if not files:
        raise DataError(f"{path}: no data files ({', '.join(records.BUILDERS)})")
    return Source(str(path), files=files)


def bad_rows_error(source: Source, scan: records.Scan) -> DataError:
    return DataError(f"{scan.bad_rows} bad row(s) in {source.label}:\n  " + "\n  ".join(records.problem_summary(scan)))


def dataset(source: Source, data_cfg, streaming: bool = True):
    """The source as a `datasets` dataset (an IterableDataset when streaming)."""
    from datasets import load_dataset

    hub = (data_cfg.hub_config, data_cfg.hub_split, data_cfg.hub_revision) if not source.is_local else None
    data_cfg = records.row_spec(data_cfg)

    if not source.is_local:
        name, split, revision = hub
        return load_dataset(source.hub_id, name=name, split=split, revision=revision, streaming=streaming)
    parts = []
    # One load per run of files of the same type, in file order (a folder may mix types).
    for suffix, group in itertools.groupby(source.files, key=lambda f: f.suffix):
        files = [str(f) for f in group]
        builder = records.BUILDERS[suffix]
        kwargs: Dict[str, Any] = {}
        if builder == "text":
            kwargs["sample_by"] = data_cfg.text_sample_by
        if builder == "csv":  # every cell a string, empty cells "" (not NaN): as data/records.py reads them
            kwargs.update(keep_default_na=False, converters={name: str for name in _csv_columns(files)})
        part = load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
        if builder == "text" and data_cfg.text_field != "text":
            part = part.rename_column("text", data_cfg.text_field)
        parts.append(part)
    if len(parts) == 1:
        return parts[0]
    from datasets import concatenate_datasets

    wanted = _fields(data_cfg)  # other columns may differ in type between the files: leave them out
    return concatenate_datasets(
        [p if p.column_names is None else p.select_columns([c for c in p.column_names if c in wanted]) for p in parts]
    )


def rows(source: Source, data_cfg) -> Iterator[Dict[str, Any]]:
    """Every well-formed row of the source, in order, in one reading; text documents stripped, blank
    ones skipped. Local files are read and checked by data/records.py (the reading the check before
    submission makes): no row is yielded after a bad one, and the reading goes on to the end to
    raise one DataError naming them all. A hub dataset's rows come from `datasets`, checked as they
    arrive (its first bad row raises)."""
    spec = records.row_spec(data_cfg)
    if source.is_local:
        scan = records.Scan()
        for row in records.checked_rows(source.files, spec, scan):
            row = clean(row, spec)
            if row is not None and not scan.bad_rows:
                yield row
        if scan.bad_rows:
            raise bad_rows_error(source, scan)
        return
    for row_no, row in enumerate(dataset(source, data_cfg, streaming=True), 1):
        row = clean(row, spec)
        if row is None:
            continue
        bad = records.check_record(row, spec)
        if bad:
            raise DataError(f"{source.label}:{row_no}: field '{bad[0]}': {bad[1]}")
        yield row


def clean(row: Dict[str, Any], data_cfg) -> Optional[Dict[str, Any]]:
    """Text documents lose surrounding blank space (and a file's UTF-8 byte-order mark, which `datasets`'
    text builder keeps); a blank one (paragraph separators) is skipped."""
    if data_cfg.format == "text" and isinstance(row.get(data_cfg.text_field), str):
        text = row[data_cfg.text_field].lstrip("\ufeff").strip()
        if not text:
            return None
        row = {**row, data_cfg.text_field: text}
    return row


def texts(data_cfg) -> Iterator[str]:
    """The training text, for training a tokenizer: documents, or the fields of instruction rows (of
    every source of a mixture, in order)."""
    for view in source_views(data_cfg):
        for row in rows(train_source(view), view):
            if view.format == "chat":
                yield "\n".join(m["content"] for m in row[view.messages_field])
            else:
                yield "\n".join(str(row[name]) for name in _fields(view) if row.get(name))


def _fields(data_cfg) -> List[str]:
    names = list(records.required_fields(data_cfg).values())
    return names + ([data_cfg.input_field] if data_cfg.format == "alpaca" else [])


def _csv_columns(files: List[str]) -> List[str]:
    columns: List[str] = []
    for file in files:
        with open(file, encoding="utf-8", newline="") as f:
            columns += [c for c in next(csv.reader(f), []) if c not in columns]
    return columns
