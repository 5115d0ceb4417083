"""The prompts a run answers before and after training (`eval.prompts`), as rows of the run's own format.

An eval.prompts file is JSONL, one prompt per line: {"prompt": str, "reference": str (optional),
"system": str (optional)}. Each becomes a row of the training data's format (a user turn, with the
system turn before it, and the reference as the assistant turn, for chat data; instruction/output for
alpaca; prompt/completion for completion and text data), so that data/tokenize.py renders and masks it
exactly as training does: the text before the response span is the prompt the model continues, and
the response span's tokens give the loss of the reference answer. Without a file, the first held-out
rows of instruction or chat data serve, their response as the reference.

Light: the standard library only, so that validation checks the file before anything is submitted.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from tuneforge import data as bundled_data
from tuneforge.data.records import DataError

PROMPT_FIELDS = {"prompt": True, "reference": False, "system": False}  # field -> required


@dataclass(frozen=True)
class Prompt:
    """One prompt: shown as `prompt`, rendered from `row` (a row of the run's data format)."""

    prompt: str  # the question as shown in tables (the last user turn, the instruction, the prompt)
    reference: Optional[str]  # the expected answer; None: no reference loss
    row: Dict[str, Any]  # a well-formed row of `format`, its response the reference (or "")
    format: str  # the data format `row` is in: chat | alpaca | completion


def resolve(value: str) -> Path:
    """An eval.prompts value as a file: a path, or the name of a bundled file (demo_prompts)."""
    path = Path(value).expanduser()
    if path.exists() or "/" in value or path.suffix:
        return path.resolve()
    return bundled_data.bundled(value) or path.resolve()


def read(value: str) -> List[dict]:
    """The rows of an eval.prompts file; DataError naming the file, line and field of the first bad row."""
    path = resolve(value)
    if not path.is_file():
        raise DataError(f'\'{value}\' does not exist; give a JSONL file of {{"prompt", "reference"}} rows')
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
            problem = _check(row)
            if problem:
                raise DataError(f"{path}:{line_no}: {problem}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no prompts in it")
    return rows


def _check(row: Any) -> Optional[str]:
    if not isinstance(row, dict):
        return f"a row must be an object with a 'prompt' field, got {type(row).__name__}"
    unknown = sorted(set(row) - set(PROMPT_FIELDS))
    if unknown:
        return f"field '{unknown[0]}': unknown; a row has {', '.join(PROMPT_FIELDS)}"
    for name, required in PROMPT_FIELDS.items():
        value = row.get(name)
        if value is None:
            if required:
                return f"field '{name}': missing"
            continue
        if not isinstance(value, str) or not value.strip():
            return f"field '{name}': must be a non-empty string"
    return None


def from_file(rows: List[dict], data_cfg) -> List[Prompt]:
    """eval.prompts rows as rows of the run's data format."""
    fmt = _format(data_cfg)
    out = []
    for row in rows:
        prompt, reference, system = row["prompt"], row.get("reference"), row.get("system")
        answer = reference or ""
        d = data_cfg
        if fmt == "chat":
            turns = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]
            record = {d.messages_field: turns}
        elif fmt == "alpaca":
            record = {d.instruction_field: prompt, d.input_field: "", d.output_field: answer}
        else:
            record = {_completion(d).prompt_field: prompt, _completion(d).completion_field: answer}
        out.append(Prompt(prompt, reference, record, fmt))
    return out


def from_held_out(records: List[dict], data_cfg) -> List[Prompt]:
    """Held-out rows of instruction or chat data as prompts, their (last) response the reference; none
    for text data (a document has no question to ask)."""
    d, out = data_cfg, []
    for record in records:
        if d.format == "chat":
            turns = record[d.messages_field]
            last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
            user = [t["content"] for t in turns[:last] if t["role"] == "user"]
            shown = user[-1] if user else turns[last - 1]["content"] if last else ""
            kept = {d.messages_field: [{"role": t["role"], "content": t["content"]} for t in turns[: last + 1]]}
            out.append(Prompt(shown, turns[last]["content"], kept, "chat"))
        elif d.format == "alpaca":
            kept = {k: record.get(k) or "" for k in (d.instruction_field, d.input_field, d.output_field)}
            out.append(Prompt(record[d.instruction_field], record[d.output_field], kept, "alpaca"))
        elif d.format == "completion":
            kept = {k: record[k] for k in (d.prompt_field, d.completion_field)}
            out.append(Prompt(record[d.prompt_field], record[d.completion_field], kept, "completion"))
    return out


def _format(data_cfg) -> str:
    return "completion" if data_cfg.format == "text" else data_cfg.format


def _completion(data_cfg):
    """Text runs answer prompts as completions: prompt + continuation (+ EOS)."""
    if data_cfg.format != "text":
        return data_cfg
    return dataclasses.replace(data_cfg, format="completion", prompt_field="prompt", completion_field="completion")


def data_config(data_cfg):
    """The data config whose Encoder renders these prompts (text runs: as completions)."""
    return _completion(data_cfg)
