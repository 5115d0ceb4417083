"""Validation rules of weighted mixtures (`data.sources`) and of vocabulary extension (`model.new_tokens`).

Registered into launch/validate.py's rules (imported at its end), so `validate(cfg)` still returns every
problem at once. Every source is checked as a single `data.path` is (files, types, every row, through
data/records.py, no torch), each problem naming `data.sources[i].<key>`. A source whose rows all fail
for its format gets one line naming `data.sources[i].format`, with the formats its first row fits.
Weights are checked positive and finite by their schema field (conf/fields.py walks the list).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterator, Optional

from tuneforge import data as bundled_data
from tuneforge.conf import methods
from tuneforge.conf.schema import Config, DataConfig, TrainConfig, source_views
from tuneforge.data import records
from tuneforge.launch.validate import Problem, rule

#: a source's name becomes part of metric names (eval_loss/<name>) and W&B panels
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@rule
def _sources(cfg: Config) -> Iterator[Problem]:
    d, t = cfg.data, cfg.train
    if not d.sources:
        return
    if d.path or d.hub_id:
        which = "data.path" if d.path else "data.hub_id"
        yield Problem(which, f"give each source's path or hub_id in data.sources, not {which} as well")
    if d.validation_path:
        yield Problem(
            "data.validation_path", "with data.sources, each source has its own: data.sources[i].validation_path"
        )
    seen: dict = {}
    inherited: list = []  # sources that take a fraction to carve off a stream from data.validation_fraction
    valid = [s.weight for s in d.sources if isinstance(s.weight, (int, float)) and math.isfinite(s.weight)]
    total = sum(w for w in valid if w > 0)
    for i, (source, view) in enumerate(zip(d.sources, source_views(d))):
        key = f"data.sources[{i}]"
        if not SOURCE_NAME.match(source.name):
            yield Problem(f"{key}.name", f"{source.name!r}: use letters, digits and _ . - only (it names metrics)")
        if source.name in seen:
            yield Problem(
                f"{key}.name",
                f"'{source.name}' is also the name of data.sources[{seen[source.name]}]; each source needs its own "
                "(it labels tokens_seen/<name> and eval_loss/<name>)",
            )
        seen.setdefault(source.name, i)
        if d.streaming and view.validation_fraction and not view.validation_path:
            own = source.validation_fraction is not None  # else data.validation_fraction, said once below
            if own:
                yield Problem(
                    f"{key}.validation_fraction",
                    f"cannot carve a fraction off a stream; give {key}.validation_path=<file or folder> instead",
                )
            else:
                inherited.append(key)
        share = source.weight / total if total and source.weight in valid and source.weight > 0 else None
        yield from _source_location(key, source, view, t, share, len(d.sources))
    if inherited:
        yield Problem(
            "data.validation_fraction",
            f"cannot carve a fraction off a stream (for {', '.join(inherited)}); set data.validation_fraction=0 "
            "and give each source a validation_path=<file or folder>",
        )


def _source_location(key: str, source, view: DataConfig, t: TrainConfig, share: Optional[float], n: int):
    if source.hub_id and source.path:
        yield Problem(f"{key}.path", f"give either {key}.path (local files) or {key}.hub_id, not both")
        return
    if not source.hub_id:
        path = bundled_data.resolve(source.path, source.name)
        if path is None:
            yield Problem(
                f"{key}.name",
                f"'{source.name}' is not a bundled dataset; set {key}.path=<file or folder> or "
                f"{key}.hub_id=<dataset id>",
            )
        elif not path.exists():
            yield Problem(f"{key}.path", f"'{source.path}' does not exist")
        else:
            where = f"{key}.path" if source.path else f"{key}.name"
            yield from _source_files(key, where, path, view, t, share if n > 1 else None)
    if source.validation_path:
        path = bundled_data.resolve_path(source.validation_path)
        if not path.exists():
            yield Problem(f"{key}.validation_path", f"'{source.validation_path}' does not exist")
        else:
            yield from _source_files(key, f"{key}.validation_path", path, view, t, None)


def _source_files(key: str, where: str, path: Path, d: DataConfig, t: TrainConfig, share: Optional[float]):
    """The files of one source (or of its validation data) against its format, then every row."""
    try:
        files = records.data_files(path)
    except records.DataError as e:  # a FIFO or another special file: refused before anything opens it
        yield Problem(where, str(e))
        return
    if not files:
        yield Problem(where, f"{path}: no data files ({', '.join(records.BUILDERS)})")
        return
    unknown = sorted({f.suffix or f.name for f in files if f.suffix not in records.BUILDERS})
    if unknown:
        yield Problem(where, f"{path}: unsupported file type {', '.join(unknown)}; use {', '.join(records.BUILDERS)}")
        return
    allowed = records.NEEDS_STRUCTURED_FILES.get(d.format)
    if allowed and any(f.suffix not in allowed for f in files):
        yield Problem(f"{key}.format", f"format={d.format} needs {', '.join(allowed)} files (its rows hold lists)")
        return
    if d.format != "text" and any(f.suffix == ".txt" for f in files):
        yield Problem(
            f"{key}.format", f"format={d.format} reads fields of rows, and {path} holds documents (.txt): format=text"
        )
        return
    if not d.precheck:
        return
    scan = records.scan(files, d, max_bytes=d.precheck_max_mb * 2**20)
    if scan.bad_rows and not scan.examples and scan.complete:  # not one row fits: the wrong format (or fields)
        fits = _formats_of_first_row(files[0], d)
        hint = f"; its rows fit format={' or '.join(fits)}" if fits else ""
        yield Problem(
            f"{key}.format", f"format={d.format} does not match the rows of {path} ({scan.problems[0]}){hint}"
        )
        return
    for line in records.problem_summary(scan):
        yield Problem(where, line)
    if scan.bad_rows or not scan.complete:
        return  # the job checks what was not read, at its start
    if scan.examples == 0:
        yield Problem(where, f"{path}: the dataset is empty (no rows of format={d.format})")
    elif share is not None and d.format != "text":  # documents split into rows: counted by the job
        held = (
            max(1, round(scan.examples * d.validation_fraction))
            if d.validation_fraction and not d.validation_path
            else 0
        )
        need = math.ceil(share * t.global_batch)
        if scan.examples - held < need:
            after = f" ({held} of {scan.examples} held out by validation_fraction)" if held else ""
            yield Problem(
                where,
                f"{path}: {scan.examples - held} training examples{after}, fewer than its share of one global batch "
                f"({share:.0%} of train.global_batch={t.global_batch}: {need} rows); add data, lower "
                f"{key}.weight or train.global_batch",
            )


def _formats_of_first_row(file: Path, d: DataConfig) -> list:
    from dataclasses import replace

    try:
        _, row = next(records.read_rows(file, d))
    except (StopIteration, records.DataError, OSError, UnicodeDecodeError):
        return []
    return [f for f in records.FORMATS if f != d.format and records.check_record(row, replace(d, format=f)) is None]


# ------------------------------------------------------------------------------------- vocabulary
@rule
def _new_tokens(cfg: Config) -> Iterator[Problem]:
    m = cfg.model
    if m.new_tokens_file and not Path(m.new_tokens_file).expanduser().is_file():
        yield Problem("model.new_tokens_file", f"'{m.new_tokens_file}' is not a file")
    blank = [i for i, term in enumerate(m.new_tokens) if not str(term).strip()]
    if blank:
        yield Problem(f"model.new_tokens[{blank[0]}]", "an empty term")
    if (m.new_tokens or m.new_tokens_file) and methods.is_peft(cfg.method.name):
        yield Problem(
            "model.new_tokens",
            f"method={cfg.method.name} freezes the embeddings, so the new tokens' rows would never train; "
            "extend the vocabulary with method=full (or pretrain)",
        )
