"""Rows of a dataset and what makes one well-formed, shared by the preflight check and the task.

Light on purpose: the standard library only (pyarrow when a Parquet file is scanned), no torch,
transformers or datasets, so that `tuneforge` can scan the user's files before submitting and name
the file, row and field of every malformed row. The task loads the same files with the `datasets`
library (trainers/data.py) after running the same checks, so nothing is trained on half-read data.

Row numbers: the line in JSONL and CSV files (CSV: the line where the row ends), the 1-based element
of a JSON array, the 1-based row of a Parquet file, the 1-based document of a text file.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

#: file suffix -> the `datasets` builder that reads it
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
FORMATS = ("text", "alpaca", "chat", "completion")
CHAT_ROLES = ("system", "user", "assistant")
#: formats whose rows hold lists: CSV cells and text paragraphs cannot carry them
NEEDS_STRUCTURED_FILES = {"chat": (".jsonl", ".json", ".parquet")}


class DataError(ValueError):
    """Bad data, with where it is: `<file>:<row>: field '<name>': <problem>`."""


@dataclass
class Scan:
    """What a scan of some files found."""

    examples: int = 0  # well-formed rows (documents for text files)
    problems: List[str] = field(default_factory=list)  # the first few bad rows, "file:row: field 'x': why"
    bad_rows: int = 0  # all bad rows seen
    complete: bool = True  # every file was read to its end (False: a size budget or an unreadable file stopped it)


# ------------------------------------------------------------------------------------ fields
@dataclass(frozen=True)
class RowSpec:
    """The settings of the data config that say what a row holds, as plain attributes: reading
    them from an OmegaConf node for every row would cost more than checking the row."""

    format: str
    text_field: str
    instruction_field: str
    input_field: str
    output_field: str
    prompt_field: str
    completion_field: str
    messages_field: str
    text_sample_by: str


def row_spec(data_cfg) -> RowSpec:
    if isinstance(data_cfg, RowSpec):
        return data_cfg
    return RowSpec(**{name: getattr(data_cfg, name) for name in RowSpec.__dataclass_fields__})


def required_fields(data_cfg) -> Dict[str, str]:
    """role -> configured field name of each field a row of `data_cfg.format` must have."""
    d = data_cfg
    return {
        "text": {"text": d.text_field},
        "alpaca": {"instruction": d.instruction_field, "output": d.output_field},
        "chat": {"messages": d.messages_field},
        "completion": {"prompt": d.prompt_field, "completion": d.completion_field},
    }[d.format]


def check_record(record: Any, data_cfg) -> Optional[Tuple[str, str]]:
    """(field, problem) for a malformed row of `data_cfg.format`, None for a good one."""
    if not isinstance(record, dict):
        return "-", f"a row must be an object with fields, got {type(record).__name__}"
    for name in required_fields(data_cfg).values():
        if name not in record or record[name] is None:
            return name, "missing"
    if data_cfg.format == "chat":
        return _check_messages(record[data_cfg.messages_field], data_cfg.messages_field)
    for name in required_fields(data_cfg).values():
        problem = _check_text(record[name])
        if problem:
            return name, problem
    if data_cfg.format == "alpaca" and record.get(data_cfg.input_field) is not None:
        if not isinstance(record[data_cfg.input_field], str):  # optional, may be empty
            return data_cfg.input_field, f"must be a string, got {type(record[data_cfg.input_field]).__name__}"
    return None


def _check_text(value: Any) -> Optional[str]:
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value.strip():
        return "empty"
    return None


def _check_messages(messages: Any, name: str) -> Optional[Tuple[str, str]]:
    if not isinstance(messages, list):
        return name, f"must be a list of {{role, content}} turns, got {type(messages).__name__}"
    if not messages:
        return name, "empty"
    for i, turn in enumerate(messages):
        key = f"{name}[{i}]"
        if not isinstance(turn, dict):
            return key, f"must be an object with role and content, got {type(turn).__name__}"
        if "role" not in turn or turn["role"] is None:
            return f"{key}.role", "missing"
        if turn["role"] not in CHAT_ROLES:
            return f"{key}.role", f"unknown role {turn['role']!r}; expected one of {', '.join(CHAT_ROLES)}"
        if "content" not in turn or turn["content"] is None:
            return f"{key}.content", "missing"
        problem = _check_text(turn["content"])
        if problem:
            return f"{key}.content", problem
    if not any(turn["role"] == "assistant" for turn in messages):
        return name, "no assistant turn: nothing to learn from"
    return None


# ------------------------------------------------------------------------------------ files
def data_files(path: Path) -> List[Path]:
    """The readable data files at `path`: the file itself, or a folder's files in name order."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS and not p.name.startswith("."))
    return [path]


def read_rows(file: Path, data_cfg) -> Iterator[Tuple[int, Any]]:
    """(row number, row) of one file; an unparsable row raises DataError naming its place."""
    suffix = file.suffix
    if suffix == ".jsonl":
        yield from _jsonl_rows(file)
    elif suffix == ".json":
        yield from _json_rows(file)
    elif suffix == ".csv":
        yield from _csv_rows(file)
    elif suffix == ".parquet":
        yield from _parquet_rows(file)
    elif suffix == ".txt":
        yield from _text_rows(file, data_cfg)
    else:
        raise DataError(f"{file}: unsupported file type '{suffix}'; use one of {', '.join(BUILDERS)}")


def _jsonl_rows(file: Path) -> Iterator[Tuple[int, Any]]:
    with open(file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None


def _json_rows(file: Path) -> Iterator[Tuple[int, Any]]:
    text = file.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n" in text.strip():  # JSON Lines in a .json file, as `datasets` allows
            yield from _jsonl_rows(file)
            return
        raise DataError(f"{file}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list):
        raise DataError(f"{file}:1: a JSON file must hold an array of rows, got {type(rows).__name__}")
    yield from enumerate(rows, 1)


def _csv_rows(file: Path) -> Iterator[Tuple[int, Any]]:
    with open(file, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row:  # more cells than header columns
                raise DataError(
                    f"{file}:{reader.line_num}: {len(row) - 1 + len(row[None])} cells, "
                    f"the header has {len(reader.fieldnames)} columns"
                )
            yield reader.line_num, row


def _parquet_rows(file: Path) -> Iterator[Tuple[int, Any]]:
    import pyarrow.parquet as pq

    row_no = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


def _text_rows(file: Path, data_cfg) -> Iterator[Tuple[int, Any]]:
    """Documents of a text file, split as `datasets`' text builder does (sample_by), blank ones skipped."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = file.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{file}:{line}: not UTF-8 text ({e.reason})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as datasets reads it
    parts = {"paragraph": text.split("\n\n"), "line": text.split("\n"), "document": [text]}[data_cfg.text_sample_by]
    docs = (p for p in parts if p.strip())
    yield from ((i, {data_cfg.text_field: doc}) for i, doc in enumerate(docs, 1))


def scan(files: Sequence[Path], data_cfg, max_problems: int = 5, max_bytes: Optional[int] = None) -> Scan:
    """Read `files` and check every row; stop after `max_bytes` of files (then `complete` is False)."""
    result, budget, data_cfg = Scan(), max_bytes, row_spec(data_cfg)
    for file in files:
        size = file.stat().st_size
        if budget is not None and size > budget:
            result.complete = False
            break
        try:
            for row_no, row in read_rows(file, data_cfg):
                bad = check_record(row, data_cfg)
                if bad is None:
                    result.examples += 1
                    continue
                result.bad_rows += 1
                if len(result.problems) < max_problems:
                    result.problems.append(f"{file}:{row_no}: field '{bad[0]}': {bad[1]}")
        except DataError as e:  # the file cannot be read past this point
            result.bad_rows += 1
            if len(result.problems) < max_problems:
                result.problems.append(str(e))
        except PermissionError:
            result.complete = False  # maybe readable on the compute nodes: checked at the start of the job
        if budget is not None:
            budget -= size
    return result


def problem_summary(result: Scan) -> List[str]:
    """The lines to show for a scan's bad rows: the first few, then how many more."""
    lines = list(result.problems)
    more = result.bad_rows - len(result.problems)
    if more > 0:
        lines.append(f"... and {more} more bad row(s)")
    return lines
