"""safetensors without loading whole files: read any element range of a tensor, write a file tensor by tensor.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes of
JSON ({name: {"dtype", "shape", "data_offsets": [begin, end]}, optional "__metadata__"}), then the data,
each tensor row-major and contiguous at data_offsets relative to the end of the header. So elements
[a, b) of a tensor are one contiguous byte range: a rank reads exactly the bytes of its shard with one
positioned read (`os.preadv`) into the shard's own memory. No mmap: mapped file pages would count in the
rank's RSS for as long as the file stays open.

`ShardedCheckpoint` reads a model directory (model.safetensors, or the shards listed in
model.safetensors.index.json) and counts the bytes it has read.
`SafetensorsStreamWriter` writes one file whose header is known in advance (names, dtypes, shapes),
appending each tensor's bytes as it arrives, so the writer never holds more than one tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from tuneforge import safetensors_files
from tuneforge.safetensors_files import INDEX_FILE, SINGLE_FILE

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class TensorInfo:
    __slots__ = ("file", "dtype", "shape", "begin", "end")

    def __init__(self, file: Path, dtype: torch.dtype, shape: Tuple[int, ...], begin: int, end: int):
        self.file, self.dtype, self.shape, self.begin, self.end = file, dtype, shape, begin, end

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """The tensors of one safetensors file (absolute byte offsets) and its __metadata__."""
    header, start = safetensors_files.read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which this reader does not know")
        begin, end = entry["data_offsets"]
        tensors[name] = TensorInfo(
            Path(path), DTYPES[entry["dtype"]], tuple(entry["shape"]), start + begin, start + end
        )
    return tensors, metadata


class ShardedCheckpoint:
    """The tensors of a Hugging Face model directory, read by element range."""

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        bad = safetensors_files.problems(self.dir)  # a file missing or cut short: named before any is read
        if bad:
            raise FileNotFoundError("; ".join(bad))
        files = safetensors_files.checkpoint_files(self.dir)[0]
        if not files:
            raise FileNotFoundError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} (sharded loading reads safetensors)")
        self.tensors: Dict[str, TensorInfo] = {}
        for name in files:
            self.tensors.update(read_header(self.dir / name)[0])
        self.bytes_read = 0
        self._fds: Dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.info(name).shape

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.dir}: no tensor {name!r} in the checkpoint") from None

    def read_flat(self, name: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements [start, stop) of tensor `name` (row-major), into `out` (any dtype: cast) or a new tensor."""
        info = self.info(name)
        if not 0 <= start <= stop <= info.numel:
            raise ValueError(f"{name}: elements [{start}, {stop}) outside its {info.numel}")
        count = stop - start
        direct = out is not None and out.dtype == info.dtype and out.device.type == "cpu" and out.is_contiguous()
        buffer = out if direct else torch.empty(count, dtype=info.dtype)
        if out is not None and out.numel() != count:
            raise ValueError(f"{name}: {count} elements read into a tensor of {out.numel()}")
        if count:
            item = info.dtype.itemsize
            view = memoryview(buffer.view(-1).view(torch.uint8).numpy())
            self._pread(info.file, view, info.begin + start * item)
            self.bytes_read += count * item
        if out is None:
            return buffer
        if not direct:
            out.copy_(buffer.view(out.shape))
        return out

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.read_flat(name, 0, info.numel).view(info.shape)

    def _pread(self, path: Path, view: memoryview, offset: int) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise IOError(f"{path}: short read at byte {offset + done}")
            done += n

    def checkpoint_bytes(self) -> int:
        """Bytes of every tensor of the checkpoint."""
        return sum(t.end - t.begin for t in self.tensors.values())

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsStreamWriter:
    """One safetensors file, its tensors appended in the order of `entries` (name, dtype, shape).

    The header is written first (it only needs shapes); `write(name, tensor)` must then be called for each
    entry in order; `close()` checks that all were written. The file is valid for `safe_open` and
    `safetensors.torch.load_file`.
    """

    def __init__(
        self,
        path,
        entries: Iterable[Tuple[str, torch.dtype, Tuple[int, ...]]],
        metadata: Optional[Dict[str, str]] = None,
    ):
        self.path = Path(path)
        header: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._order: List[Tuple[str, int]] = []
        for name, dtype, shape in entries:
            nbytes = dtype.itemsize
            for s in shape:
                nbytes *= s
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._file = open(self.path, "wb")
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, nbytes = self._order[self._next]
        if name != expected:
            raise ValueError(f"{self.path.name}: got {name}, expected {expected} next")
        data = tensor.detach().cpu().contiguous()
        if data.numel() * data.element_size() != nbytes:
            raise ValueError(f"{name}: {data.numel() * data.element_size()} bytes, the header says {nbytes}")
        if nbytes:
            self._file.write(memoryview(data.view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._order):
            missing = [n for n, _ in self._order[self._next :]]
            raise RuntimeError(f"{self.path}: {len(missing)} tensor(s) never written, first {missing[0]}")
