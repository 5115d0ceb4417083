"""The files of a safetensors checkpoint, checked without reading their data (no torch).

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes of
JSON ({name: {"dtype", "shape", "data_offsets": [begin, end]}, optional "__metadata__"}), then the data at
data_offsets relative to the end of the header. A file is complete when it is at least as long as its
header says (8 + N + the largest end); a sharded checkpoint when every file its
model.safetensors.index.json names is there and complete. An interrupted download or copy fails both
ways; `problems(dir)` says which file, before the job is submitted (launch/validate.py) and before a
rank reads it (trainers/sharded/safetensors_io.py reads headers through `read_header`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: a header longer than this is not one (safetensors itself refuses headers above 100 MB)
MAX_HEADER_BYTES = 100_000_000


class BadFile(ValueError):
    """A safetensors file that cannot be what it claims; the message names the file."""


def read_header(path: Path) -> Tuple[dict, int]:
    """(the header's JSON object, the byte where the data starts) of one safetensors file; BadFile if
    the file is too short for its header or the header is not a safetensors one."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadFile(f"{path}: {size} bytes, shorter than a safetensors header")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES:
            raise BadFile(f"{path}: not a safetensors file (a header of {length} bytes)")
        if 8 + length > size:
            raise BadFile(f"{path}: truncated: its header needs {8 + length} bytes, the file has {size}")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as e:
            raise BadFile(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise BadFile(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header, 8 + length


def data_end(header: dict, path: Path) -> int:
    """The largest data offset of a header (relative to the data start)."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise BadFile(f"{path}: not a safetensors file (tensor {name!r} has no data_offsets)")
        end = max(end, offsets[1])
    return end


def check_file(path: Path) -> None:
    """BadFile unless `path` is a complete safetensors file."""
    header, start = read_header(path)
    need, size = start + data_end(header, path), Path(path).stat().st_size
    if size < need:
        raise BadFile(f"{path}: truncated: its header says {need} bytes, the file has {size}")


def checkpoint_files(model_dir: Path) -> Tuple[List[str], List[str]]:
    """(the safetensors files a directory's weights are in, files its index names that are absent)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map: Dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise BadFile(f"{index}: not a safetensors index (no weight_map: {type(e).__name__})") from None
        return [f for f in files if (model_dir / f).is_file()], [f for f in files if not (model_dir / f).is_file()]
    return ([SINGLE_FILE] if (model_dir / SINGLE_FILE).is_file() else []), []


def problems(model_dir: Path) -> List[str]:
    """One line per missing or incomplete safetensors file of a model directory (empty: complete, or no
    safetensors at all: what else loads is from_pretrained's to check)."""
    model_dir = Path(model_dir)
    try:
        present, absent = checkpoint_files(model_dir)
    except BadFile as e:
        return [str(e)]
    out = [
        f"{model_dir / name}: named in {INDEX_FILE} but absent (an interrupted download or copy); copy it again"
        for name in absent
    ]
    for name in present:
        try:
            check_file(model_dir / name)
        except BadFile as e:
            out.append(f"{e}; copy it again")
        except OSError as e:
            out.append(f"{model_dir / name}: cannot be read ({e.strerror or e})")
    return out
