"""Vocabulary extension (trainers/vocab.py, `model.new_tokens`) on a model loaded sharded.

`vocab.resize_model` grows a whole model's input embeddings (and untied head) to the extended tokenizer
and sets rows [old, new) to the mean of rows [0, old). A rank of a sharded load never holds the whole
matrix, so the same rows are produced while filling: the model is built with the larger vocabulary
(`resized_config`), and `ResizedRows` serves each embedding-like tensor with the checkpoint's rows where
they stay and the mean where `resize_model` writes it. The mean is computed before filling, each rank
summing a 1/world slice of the old rows and one all-reduce adding them up (`row_means`): no rank reads
more than its slice of the matrix beyond its own shard.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterable, Optional

import torch

#: rows summed at once while computing the mean (bounded memory whatever the vocabulary)
ROWS_PER_READ = 4096


def resized_config(config, new_vocab: int):
    """The config `resize_token_embeddings(new_vocab)` leaves (vocab_size raised when the model has fewer rows)."""
    if new_vocab <= config.vocab_size:
        return config
    config = copy.deepcopy(config)
    config.vocab_size = new_vocab
    return config


def embedding_names(model) -> list:
    """Qualified names of the input embedding weight and, when not tied to it, the output head's."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = [names[id(model.get_input_embeddings().weight)]]
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) != id(model.get_input_embeddings().weight):
        found.append(names[id(head.weight)])
    return found


@torch.no_grad()
def row_means(source, keys: Iterable[str], old_vocab: int, dtype: torch.dtype, rank: int, world: int, device="cpu"):
    """{key: the mean of rows [0, old_vocab) of each matrix, in float32}, as `resize_model` computes it from
    the model's weights (cast to `dtype`, then float). Collective: every rank sums its slice of the rows,
    one all-reduce (on `device`: the process group's) adds the slices."""
    import torch.distributed as dist

    means = {}
    for key in keys:
        rows, width = source.shape(key)[0], source.shape(key)[1]
        if old_vocab > rows:
            raise ValueError(f"{key}: {rows} rows in the checkpoint, fewer than the tokenizer's {old_vocab} tokens")
        chunk = -(-old_vocab // world)
        first, last = min(rank * chunk, old_vocab), min((rank + 1) * chunk, old_vocab)
        total = torch.zeros(width, dtype=torch.float64)
        for row in range(first, last, ROWS_PER_READ):
            stop = min(row + ROWS_PER_READ, last)
            block = source.read_flat(key, row * width, stop * width).view(stop - row, width)
            total += block.to(dtype).float().sum(0, dtype=torch.float64)
        total = total.to(device)
        if dist.is_available() and dist.is_initialized() and world > 1:
            dist.all_reduce(total)
        means[key] = (total / old_vocab).float().cpu()
    return means


class ResizedRows:
    """A source (fill.py) over `source` in which each matrix of `means` has max(rows, new) rows: rows
    [old, new) the mean, the others the checkpoint's own."""

    def __init__(self, source, means: Dict[str, torch.Tensor], old_vocab: int, new_vocab: int):
        self.source, self.means, self.old, self.new = source, means, old_vocab, new_vocab

    def __contains__(self, name: str) -> bool:
        return name in self.source

    def shape(self, name: str):
        shape = tuple(self.source.shape(name))
        return (max(shape[0], self.new), *shape[1:]) if name in self.means else shape

    @property
    def bytes_read(self) -> int:
        return self.source.bytes_read

    def checkpoint_bytes(self) -> int:
        return self.source.checkpoint_bytes()

    def close(self) -> None:
        self.source.close()

    def read_flat(self, name: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if name not in self.means:
            return self.source.read_flat(name, start, stop, out)
        rows, width = self.source.shape(name)[0], self.source.shape(name)[1]
        dtype = out.dtype if out is not None else self.source.info(name).dtype
        flat = torch.empty(stop - start, dtype=dtype) if out is None or out.device.type != "cpu" else out.view(-1)
        mean = self.means[name].to(dtype)
        # element ranges: [0, old) and [new, rows) rows from the checkpoint, [old, new) the mean
        pieces = ((0, self.old * width, False), (self.old * width, self.new * width, True))
        pieces += ((self.new * width, rows * width, False),)
        for lo, hi, is_mean in pieces:
            a, b = max(lo, start), min(hi, stop)
            if a >= b:
                continue
            target = flat[a - start : b - start]
            if is_mean:
                offset = a % width
                repeats = -(-(offset + b - a) // width)
                target.copy_(mean.repeat(repeats)[offset : offset + b - a])
            else:
                self.source.read_flat(name, a, b, target)
        if out is None:
            return flat
        if flat.data_ptr() != out.data_ptr():
            out.copy_(flat.view(out.shape))
        return out
