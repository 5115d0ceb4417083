"""Weighted mixtures (`data.sources`): several datasets in one run, the rows following the weights by
target tokens, deterministic from the seed, resumed exactly.

    build(data_cfg, train_cfg, tokenizer, dist_env) -> pipeline.Data   (two or more sources)

Each source is read, checked, tokenised and packed as a dataset of its own (data/pipeline.py: its own
cache entry; or its own stream, data/streaming.py), so every row belongs to one source: its tokens are
counted for it and its validation rows give its own loss.

Which source gives the next row: the one furthest behind its share. With T_i the target tokens taken
from source i so far, s_i = w_i / sum(w) its share and t_i the target tokens of its next row, the next
row comes from the source with the smallest (T_i + t_i) / s_i, the first listed on a tie (weighted fair
queueing, by tokens): at every point of the run each source holds s_i of all target tokens taken, within
one row. Nothing is random in that choice; which row a source gives next is (its rows are read in a
permutation seeded by (seed, source, epoch of that source); a small source, replay, cycles through
more epochs than a large one).

- Cached (the default): the choice runs over the global sequence of rows, the same on any number of
  ranks; global batch `step` is its next `global_batch` rows, each rank reads its slice. The position
  saved in every checkpoint is the step with the rows and target tokens taken from each source, so a
  resumed run continues with exactly the rows of the uninterrupted one (on any number of ranks).
- Streaming: each rank makes the same choice over its own shards of the sources, each read as a
  StreamingBatches stream (windows, seeded order, exact resume), so each rank's rows, and all of them
  together, follow the weights; each stream's position and the rank's tokens per source are saved.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from tuneforge.conf.schema import DataConfig, TrainConfig, source_views, source_weights
from tuneforge.data import sources
from tuneforge.data.batches import Collate, EvalBatches
from tuneforge.data.packing import ROW_FIELDS, Rows, concatenate, row_targets
from tuneforge.data.records import DataError
from tuneforge.data.tokenize import Encoder

Pick = Tuple[int, int]  # (source index, row of that source)


def shares(weights: Sequence[float]) -> List[float]:
    """Each weight's share of the target tokens: weight / the sum of the weights."""
    total = float(sum(weights))
    return [w / total for w in weights]


class Chooser:
    """The choice of source for each next row, by target tokens (see the module's docstring)."""

    def __init__(self, weights: Sequence[float], tokens: Optional[Sequence[int]] = None):
        self.shares = shares(weights)
        self.tokens = [int(t) for t in tokens] if tokens is not None else [0] * len(self.shares)

    def choose(self, next_targets: Sequence[int]) -> int:
        best, best_key = 0, math.inf
        for i, (taken, upcoming, share) in enumerate(zip(self.tokens, next_targets, self.shares)):
            key = (taken + upcoming) / share
            if key < best_key:
                best, best_key = i, key
        self.tokens[best] += int(next_targets[best])
        return best


def _gather(parts: Sequence[Rows], picks: Sequence[Pick]) -> Rows:
    return Rows(*(np.stack([getattr(parts[i], f)[row] for i, row in picks]) for f in ROW_FIELDS))


def _tokens_by_source(targets: Sequence[np.ndarray], picks: Sequence[Pick], n: int) -> List[int]:
    out = [0] * n
    for i, row in picks:
        out[i] += int(targets[i][row])
    return out


class MixtureBatches:
    """Cached rows of several sources; global batch `step` = the next `global_batch` chosen rows."""

    def __init__(
        self,
        parts: Sequence[Rows],
        names: Sequence[str],
        weights: Sequence[float],
        global_batch: int,
        micro_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        collate: Collate,
        keys: Sequence[str] = (),
    ):
        self.parts, self.names, self.weights = list(parts), tuple(names), [float(w) for w in weights]
        self.global_batch, self.micro_batch, self.seed = global_batch, micro_batch, seed
        self.rank, self.world_size, self.collate, self.keys = rank, world_size, collate, list(keys)
        self.targets = [row_targets(p) for p in self.parts]
        self.source_names = self.names  # the loop logs tokens_seen/<name> from source_tokens
        self.source_tokens: List[int] = [0] * len(self.parts)  # this rank's target tokens per source, last step
        self._perms: Dict[int, Tuple[int, np.ndarray]] = {}  # source -> (epoch, its permutation)
        self._origin = (0, [0] * len(self.parts), [0] * len(self.parts))  # (step, rows taken, tokens) to replay from
        self._picks: Optional[Tuple[int, List[Pick]]] = None
        self._restart()

    # ------------------------------------------------------------------------------ the sequence
    def _restart(self) -> None:
        step, taken, tokens = self._origin
        self._step, self._taken = step, list(taken)
        self._chooser = Chooser(self.weights, tokens)
        self._next = [self._row_at(i, k) for i, k in enumerate(self._taken)]

    def _row_at(self, source: int, k: int) -> int:
        """Row of `source` at position k of its stream: epoch k // rows, seeded by (seed, source, epoch)."""
        epoch, at = divmod(k, len(self.parts[source]))
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            order = np.random.default_rng([self.seed, source, epoch]).permutation(len(self.parts[source]))
            cached = self._perms[source] = (epoch, order)
        return int(cached[1][at])

    def _take(self, n: int) -> List[Pick]:
        picks = []
        for _ in range(n):
            i = self._chooser.choose([int(t[row]) for t, row in zip(self.targets, self._next)])
            picks.append((i, self._next[i]))
            self._taken[i] += 1
            self._next[i] = self._row_at(i, self._taken[i])
        return picks

    def _seek(self, step: int) -> None:
        """Move the sequence to the start of global batch `step` (replaying from the origin if behind)."""
        if step < self._origin[0]:
            raise DataError(f"mixture batches resumed at step {self._origin[0]} cannot give step {step}")
        if step < self._step:
            self._restart()
        while self._step < step:
            self._take(self.global_batch)
            self._step += 1

    def picks(self, step: int) -> List[Pick]:
        """The (source, row) pairs of global batch `step`, in order."""
        if self._picks is None or self._picks[0] != step:
            self._seek(step)
            self._picks = (step, self._take(self.global_batch))
            self._step += 1
        return self._picks[1]

    def rank_picks(self, step: int) -> List[Pick]:
        per_rank = self.global_batch // self.world_size
        return self.picks(step)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def micro_batches(self, step: int) -> Iterator[Dict[str, torch.Tensor]]:
        mine = self.rank_picks(step)
        self.source_tokens = _tokens_by_source(self.targets, mine, len(self.parts))
        for start in range(0, len(mine), self.micro_batch):
            yield self.collate(_gather(self.parts, mine[start : start + self.micro_batch]))

    @property
    def accumulation(self) -> int:
        return self.global_batch // self.world_size // self.micro_batch

    # ------------------------------------------------------------------------------ resume
    def _identity(self) -> dict:
        return {
            "seed": self.seed,
            "names": list(self.names),
            "weights": self.weights,
            "rows": self._rows(),
            "keys": self.keys,
        }

    def _rows(self) -> List[int]:
        return [len(p) for p in self.parts]

    def state_dict(self, step: int) -> dict:
        self._seek(step)
        return {
            "kind": "mixture",
            **self._identity(),
            "position": step,
            "taken": list(self._taken),
            "tokens": list(self._chooser.tokens),
        }

    def load_state_dict(self, state: dict, step: int) -> None:
        if state.get("kind") != "mixture":
            raise DataError(
                f"the checkpoint's data position is of kind {state.get('kind')!r}, this run reads a cached mixture: "
                "resume with the same data.sources and data.streaming, or use a new run.dir"
            )
        _check_same(state, self._identity())
        if state["position"] != step:
            raise DataError(f"the checkpoint's data position {state['position']} is not its step {step}")
        self._origin = (step, list(state["taken"]), list(state["tokens"]))
        self._picks = None
        self._restart()


def _check_same(state: dict, now: dict) -> None:
    changed = [k for k in now if state.get(k) != now[k]]
    if changed:
        was = ", ".join(f"{k} {state.get(k)}" for k in changed)
        is_ = ", ".join(f"{k} {now[k]}" for k in changed)
        raise DataError(
            f"the mixture changed since the checkpoint ({was}; now {is_}): resuming would not continue the same "
            "sequence of rows; restore data.sources and train.seed, or start a new run.dir"
        )


class MixtureStream:
    """Streams of several sources on this rank; each step takes the next per-rank rows by the choice."""

    def __init__(self, streams: Sequence, names: Sequence[str], weights: Sequence[float], train_cfg, dist_env, collate):
        self.streams, self.names, self.weights = list(streams), tuple(names), [float(w) for w in weights]
        self.per_rank, self.micro_batch = train_cfg.global_batch // dist_env.world_size, train_cfg.micro_batch
        self.seed, self.world_size, self.collate = train_cfg.seed, dist_env.world_size, collate
        self.source_names = self.names
        self.source_tokens: List[int] = [0] * len(self.streams)
        self.position = 0
        self._chooser = Chooser(self.weights)

    @property
    def accumulation(self) -> int:
        return self.per_rank // self.micro_batch

    def micro_batches(self, step: int) -> Iterator[Dict[str, torch.Tensor]]:
        if step != self.position:
            raise RuntimeError(f"streaming batches are read in order: asked for step {step}, at step {self.position}")
        picked: List[Rows] = []
        self.source_tokens = [0] * len(self.streams)
        for _ in range(self.per_rank):
            upcoming = [s.peek_targets() for s in self.streams]
            i = self._chooser.choose(upcoming)
            picked.append(self.streams[i].next_rows(1))
            self.source_tokens[i] += upcoming[i]
        self.position += 1
        mine = concatenate(picked)
        for start in range(0, self.per_rank, self.micro_batch):
            yield self.collate(mine.take(slice(start, start + self.micro_batch)))

    def _identity(self) -> dict:
        return {"seed": self.seed, "names": list(self.names), "weights": self.weights, "world_size": self.world_size}

    def state_dict(self, step: int) -> dict:
        return {
            "kind": "stream_mixture",
            **self._identity(),
            "position": step,
            "tokens": list(self._chooser.tokens),
            "streams": [s.state_dict(s.state["position"]) for s in self.streams],
        }

    def load_state_dict(self, state: dict, step: int) -> None:
        if state.get("kind") != "stream_mixture":
            raise DataError(
                f"the checkpoint's data position is of kind {state.get('kind')!r}, this run streams a mixture: "
                "resume with the same data.sources and data.streaming, or use a new run.dir"
            )
        _check_same(state, self._identity())
        if state["position"] != step:
            raise DataError(f"the checkpoint's data position {state['position']} is not its step {step}")
        for stream, sub in zip(self.streams, state["streams"]):
            stream.load_state_dict(sub, sub["position"])
        self.position, self._chooser = step, Chooser(self.weights, state["tokens"])


class MixtureEval:
    """Validation batches of each source in turn; `by_source` tags each micro batch with its source."""

    def __init__(self, parts: Sequence[Tuple[str, EvalBatches]]):
        self.names = tuple(name for name, _ in parts)
        self.parts = [batches for _, batches in parts]
        self.num_rows = sum(b.num_rows for b in self.parts)

    def by_source(self) -> Iterator[Tuple[Optional[int], Dict[str, torch.Tensor]]]:
        for i, batches in enumerate(self.parts):
            for batch in batches.micro_batches():
                yield i, batch

    def micro_batches(self) -> Iterator[Dict[str, torch.Tensor]]:
        for _, batch in self.by_source():
            yield batch


# ------------------------------------------------------------------------------------ build
def build(data_cfg: DataConfig, train_cfg: TrainConfig, tokenizer, dist_env, flatten_packed: bool = False):
    """The training and validation batches of a mixture (pipeline.build hands two or more sources here)."""
    from tuneforge.data import pipeline

    t, views, weights = train_cfg, source_views(data_cfg), source_weights(data_cfg)
    names = [v.name for v in views]
    collate = Collate(packed=data_cfg.packing, flatten=flatten_packed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trains, vals, per_source = [], [], {}
    for i, view in enumerate(views):
        with _naming(i, view.name):
            encoder = Encoder(view, tokenizer, t.seq_len)
            train_src, val_src = sources.train_source(view), sources.validation_source(view)
            if data_cfg.streaming:
                from tuneforge.data.streaming import StreamingBatches

                _, val_rows, stats = (
                    pipeline.cached_rows(None, val_src, encoder, view, t, pad_id, dist_env)
                    if val_src
                    else (None, None, {"data_cache": "off (streaming)"})
                )
                trains.append(StreamingBatches(train_src, encoder, view, t, pad_id, dist_env, collate))
            else:
                train_rows, val_rows, stats = pipeline.cached_rows(
                    train_src, val_src, encoder, view, t, pad_id, dist_env
                )
                trains.append(train_rows)
        vals.append(val_rows)
        per_source[view.name] = {"weight": weights[i], "share": round(shares(weights)[i], 6), **stats}
    statuses = {s["data_cache"] for s in per_source.values()}
    keys = json.dumps([s.get("data_key") for s in per_source.values()])
    stats = {
        "data_cache": next((s for s in ("built", "hit") if s in statuses), "off (streaming)"),
        "data_key": hashlib.sha256(keys.encode()).hexdigest()[:20],
        "sources": per_source,
    }
    if data_cfg.streaming:
        train = MixtureStream(trains, names, weights, t, dist_env, collate)
    else:
        train = MixtureBatches(
            trains,
            names,
            weights,
            t.global_batch,
            t.micro_batch,
            t.seed,
            dist_env.rank,
            dist_env.world_size,
            collate,
            keys=[per_source[n]["data_key"] for n in names],
        )
        _check_shares(train, t, per_source)
        stats.update(
            train_rows=sum(len(r) for r in trains),
            train_examples=sum(s.get("train_examples", 0) for s in per_source.values()),
        )
    if dist_env.rank == 0:
        print("data: mixture " + ", ".join(_describe(n, s) for n, s in per_source.items()), flush=True)
    validation = None
    limit = t.global_batch * t.eval_batches  # rows per source
    evals = [
        (name, EvalBatches(rows, limit, t.micro_batch, dist_env.rank, dist_env.world_size, collate, pad_id))
        for name, rows in zip(names, vals)
        if rows is not None and len(rows)
    ]
    if evals and t.eval_every:
        validation = MixtureEval(evals)
    return pipeline.Data(train, validation, stats)


def _check_shares(batches: MixtureBatches, t: TrainConfig, per_source: dict) -> None:
    """Each source must hold the rows its share takes from one global batch (else a batch repeats rows);
    records the expected rows per step and how many times each source is read over the run."""
    targets = batches.targets
    means = [float(x.mean()) if len(x) else 0.0 for x in targets]
    rate = [s / m if m else 0.0 for s, m in zip(shares(batches.weights), means)]  # rows per target token
    for i, (rows, name) in enumerate(zip(batches.parts, batches.names)):
        per_step = t.global_batch * rate[i] / sum(rate)
        need = math.ceil(per_step - 1e-9)
        per_source[name].update(
            train_target_tokens=int(targets[i].sum()),
            rows_per_step=round(per_step, 3),
            epochs=round(per_step * t.max_steps / max(1, len(rows)), 3),
        )
        if len(rows) < need:
            raise DataError(
                f"data.sources[{i}] ({name}): {len(rows)} rows of train.seq_len={t.seq_len} tokens, fewer than its "
                f"share of one global batch (about {per_step:.1f} of train.global_batch={t.global_batch} rows); "
                f"add data, lower data.sources[{i}].weight or train.global_batch"
            )


def _describe(name: str, s: dict) -> str:
    text = f"{name} {100 * s['share']:.1f}%"
    if "epochs" in s:
        text += f" ({s.get('train_rows', '?')} rows, read {s['epochs']:g} times over the run)"
    return text


class _naming:
    """Prefix a DataError raised while reading source i with `data.sources[i] (<name>)`."""

    def __init__(self, i: int, name: str):
        self.prefix = f"data.sources[{i}] ({name})"

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, DataError) and not str(error).startswith("data.sources["):
            raise DataError(f"{self.prefix}: {error}") from error
        return False
