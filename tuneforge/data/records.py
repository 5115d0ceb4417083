"""Rows of a dataset and what makes one well-formed, shared by the preflight check and the task.

Light on purpose: the standard library only (pyarrow when a Parquet file is scanned), no torch,
transformers or datasets, so that `tuneforge` can scan the user's files before submitting and name
the file, row and field of every malformed row. The task loads the same files with the `datasets`
library (trainers/data.py) after running the same checks, so nothing is trained on half-read data.

Row numbers: the line in JSONL and CSV files (CSV: the line where the row ends), the 1-based element
of a JSON array, the 1-based row of a Parquet file, the 1-based document of a text file.
"""

from __future__ import annotations

import codecs
import csv
import functools
import json
import os
import stat
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
    """role -> configured field name of each field a row of `data_cfg.format` must have (do not change
    it: for a RowSpec it is made once, as it is asked for every row)."""
    return _required_of_spec(data_cfg) if isinstance(data_cfg, RowSpec) else _required_fields(data_cfg)


@functools.lru_cache(maxsize=64)
def _required_of_spec(spec: RowSpec) -> Dict[str, str]:
    return _required_fields(spec)


def _required_fields(data_cfg) -> Dict[str, str]:
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
# Every file is read as the job's `datasets` builders will read it, and every way it can fail becomes a
# DataError of one line naming the file and the line or byte: special files (a FIFO would block the
# reader forever) are refused before they are opened, text must be UTF-8 (a byte-order mark is
# accepted, as `datasets` accepts it), a NUL byte marks a binary file, and Parquet, JSON nested past
# what a parser can follow, CSV cells past the csv module's limit and unreadable files are named.
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def special_file(path: Path) -> Optional[str]:
    """What `path` is when it is neither a regular file nor a directory ("a FIFO", ...), else None.
    Follows symlinks (a link to a FIFO is a FIFO to the reader)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def data_files(path: Path) -> List[Path]:
    """The data files at `path`: the file itself, or a folder's files in name order. Raises DataError
    for a special file (FIFO, socket, device) among them, before anything opens it."""
    kind = special_file(path)
    if kind:
        raise DataError(f"{path}: is {kind}, not a regular file; give a file or a folder of files")
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS and not p.name.startswith("."))
        for p in found:
            kind = special_file(p)
            if kind:
                raise DataError(f"{p}: is {kind}, not a regular file; remove it from {path}")
        return [p for p in found if p.is_file()]
    return [path]


def _decoded(file: Path, data: bytes, offset: int, line_no: int, first: bool) -> str:
    """`data` (line `line_no` of `file`, starting at byte `offset`) as text, or a DataError naming the place."""
    if first and data.startswith(BOM):
        data, offset = data[len(BOM) :], offset + len(BOM)
    if first and data.startswith(UTF16_BOMS):
        raise DataError(f"{file}:1: UTF-16 or UTF-32 text (its byte-order mark); convert it to UTF-8")
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"{file}:{line_no}: binary data (a NUL byte at byte {offset + nul}); not a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{file}:{line_no}: not UTF-8 (byte 0x{data[e.start]:02x} at byte {offset + e.start}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # (UTF-32's start with these too)


def _text_lines(file: Path) -> Iterator[Tuple[int, str]]:
    """(line number, decoded line with its newline) of a text file, streamed."""
    offset = 0
    with open(file, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            yield line_no, _decoded(file, raw, offset, line_no, line_no == 1)
            offset += len(raw)


def _text(file: Path) -> str:
    """A whole text file, decoded (one DataError naming the line and byte of the first bad one)."""
    with open_regular(file) as f:
        data = f.read()
    body = data[len(BOM) :] if data.startswith(BOM) else data
    if b"\0" not in body and not body.startswith(UTF16_BOMS):
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            pass
    offset = 0
    for line_no, raw in enumerate(data.splitlines(keepends=True), 1):
        _decoded(file, raw, offset, line_no, line_no == 1)  # raises at the first bad line
        offset += len(raw)
    raise DataError(f"{file}: not UTF-8 text")  # (a bad sequence split across a line break: not reached)


def open_regular(file: Path):
    """`open(file, "rb")`, refusing a special file first (opening a FIFO blocks until a writer comes)."""
    kind = special_file(file)
    if kind:
        raise DataError(f"{file}: is {kind}, not a regular file")
    return open(file, "rb")


def read_rows(file: Path, data_cfg) -> Iterator[Tuple[int, Any]]:
    """(row number, row) of one file; an unparsable row raises DataError naming its place."""
    suffix = file.suffix
    kind = special_file(file)
    if kind:
        raise DataError(f"{file}: is {kind}, not a regular file")
    try:
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
    except PermissionError:
        raise DataError(
            f"{file}: cannot be read (permission denied); if only the compute nodes can read it, set data.precheck=false"
        ) from None
    except IsADirectoryError:
        raise DataError(f"{file}: is a directory named like a data file") from None
    except OSError as e:
        raise DataError(f"{file}: cannot be read ({e.strerror or e})") from None


def _json_value(file: Path, line_no: int, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{file}:{line_no}: JSON nested too deeply to read (thousands of levels)") from None


def _jsonl_rows(file: Path) -> Iterator[Tuple[int, Any]]:
    for line_no, line in _text_lines(file):
        if line.strip():
            yield line_no, _json_value(file, line_no, line)


def _json_rows(file: Path) -> Iterator[Tuple[int, Any]]:
    text = _text(file)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n" in text.strip():  # JSON Lines in a .json file, as `datasets` allows
            yield from _jsonl_rows(file)
            return
        raise DataError(f"{file}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{file}:1: JSON nested too deeply to read (thousands of levels)") from None
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list):
        raise DataError(f"{file}:1: a JSON file must hold an array of rows, got {type(rows).__name__}")
    yield from enumerate(rows, 1)


def _csv_rows(file: Path) -> Iterator[Tuple[int, Any]]:
    # pandas (what `datasets` reads CSV with) has no cell size limit; the csv module's default is 128 KiB
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.DictReader(line for _, line in _text_lines(file))
    try:
        for row in reader:
            if None in row:  # more cells than header columns
                raise DataError(
                    f"{file}:{reader.line_num}: {len(row) - 1 + len(row[None])} cells, "
                    f"the header has {len(reader.fieldnames)} columns"
                )
            yield reader.line_num, row
    except csv.Error as e:
        raise DataError(f"{file}:{reader.line_num}: not readable as CSV ({e})") from None


def _parquet_rows(file: Path) -> Iterator[Tuple[int, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    row_no = 0
    try:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, row
    except (pyarrow.ArrowException, ValueError) as e:  # ArrowInvalid for a file that is not Parquet, or is cut short
        where = f"after row {row_no}" if row_no else "at its start"
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise DataError(f"{file}: not a readable Parquet file ({where}: {first})") from None


TEXT_BLOCK = 2**20  # bytes of a text file decoded at a time: its documents are read as a stream


def _text_rows(file: Path, data_cfg) -> Iterator[Tuple[int, Any]]:
    """Documents of a text file, split as `datasets`' text builder does (sample_by), blank ones skipped."""
    if data_cfg.text_sample_by == "document":
        parts: Iterator[str] = iter([_universal_newlines(_text(file))])
    else:
        parts = _split_stream(file, "\n\n" if data_cfg.text_sample_by == "paragraph" else "\n")
    docs = (p for p in parts if p.strip())
    yield from ((i, {data_cfg.text_field: doc}) for i, doc in enumerate(docs, 1))


def _universal_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as datasets reads text


def _split_stream(file: Path, separator: str) -> Iterator[str]:
    """`_universal_newlines(_text(file)).split(separator)`, read TEXT_BLOCK bytes at a time (a 300 MB
    corpus is not held whole). The part after the last separator seen waits for the next block; a
    block that is not clean UTF-8 text has the whole file read by `_text` for the error's place."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    with open_regular(file) as f:
        block = f.read(max(TEXT_BLOCK, len(BOM)))
        if block.startswith(UTF16_BOMS):
            _text(file)
        if block.startswith(BOM):
            block = block[len(BOM) :] or f.read(TEXT_BLOCK)
        while True:
            at_end = not block
            try:
                if b"\0" in block:
                    raise ValueError
                text = carry + decoder.decode(block, final=at_end)
            except ValueError:  # (UnicodeDecodeError too)
                _text(file)  # raises the DataError that names the line and byte
                raise
            if not at_end and text.endswith("\r"):  # may be the first half of a \r\n
                carry, text = "\r", text[:-1]
            else:
                carry = ""
            parts = _universal_newlines(text).split(separator)
            if at_end:
                yield from parts
                return
            carry = parts.pop() + carry
            yield from parts
            block = f.read(TEXT_BLOCK)


def scan(files: Sequence[Path], data_cfg, max_problems: int = 5, max_bytes: Optional[int] = None) -> Scan:
    """Read `files` and check every row; stop after `max_bytes` of files (then `complete` is False)."""
    result = Scan()
    for _ in checked_rows(files, data_cfg, result, max_problems, max_bytes):
        pass
    return result


def checked_rows(
    files: Sequence[Path], data_cfg, result: Scan, max_problems: int = 5, max_bytes: Optional[int] = None
) -> Iterator[Dict[str, Any]]:
    """The well-formed rows of `files`, in order, as they are read: one reading both checks the rows
    and feeds the task. `result` counts them and the bad ones, describing the first `max_problems`;
    a file past `max_bytes` in all stops the reading (`result.complete` False)."""
    budget, data_cfg = max_bytes, row_spec(data_cfg)
    for file in files:
        try:
            size = file.stat().st_size
        except OSError as e:
            result.bad_rows += 1
            result.problems.append(f"{file}: cannot be read ({e.strerror or e})")
            continue
        if budget is not None and size > budget:
            result.complete = False
            break
        try:
            for row_no, row in read_rows(file, data_cfg):
                bad = check_record(row, data_cfg)
                if bad is None:
                    result.examples += 1
                    yield row
                    continue
                result.bad_rows += 1
                if len(result.problems) < max_problems:
                    result.problems.append(f"{file}:{row_no}: field '{bad[0]}': {bad[1]}")
        except DataError as e:  # the file cannot be read past this point
            result.bad_rows += 1
            if len(result.problems) < max_problems:
                result.problems.append(str(e))
        if budget is not None:
            budget -= size


def problem_summary(result: Scan) -> List[str]:
    """The lines to show for a scan's bad rows: the first few, then how many more."""
    lines = list(result.problems)
    more = result.bad_rows - len(result.problems)
    if more > 0:
        lines.append(f"... and {more} more bad row(s)")
    return lines
