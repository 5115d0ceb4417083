"""The domain-fit probe's task: how well does one candidate base model already predict your data?

Every rank runs this for one candidate (one element of `tuneforge probe`'s job array), with the same
composed Config a training run of it would have, the same tokenizer and model loading, the same
data sources and rendering (data/tokenize.py), and the same backend wrapping (so that a model that
needs sharding is sharded): only the loop differs, forward passes without gradients.

The score is bits per byte: the summed token loss over the scored tokens / (ln 2 x UTF-8 bytes of
the text those tokens produce). It is comparable across tokenizers where per-token perplexity is not.
Scored tokens are the targets training would learn from: every token of a text document (but the
first of each window of train.seq_len tokens, which has no context, as in packed training rows), and
on instruction or chat data the response tokens only (the masks data/tokenize.py builds; EOS and the
template's end-of-turn included). The bytes a scored token produces are the text from the end of the
token before it to its own end (so the spaces a tokenizer leaves out of its offsets are counted,
once, by every tokenizer alike); an added EOS produces none.

Also scored: the bundled general-text slice (probe.general), and per set the tokens per word. The
sample is the same for every candidate: `probe.examples` rows of the training data, chosen with
train.seed. Each rank scores its share of the batches (the same number of forward passes on every
rank: FSDP2 and ZeRO-3 forwards are collective); the per-example sums are gathered and added in
example order, so the figure does not depend on the world size. On a stop signal the ranks save the
examples scored so far (probe_progress.json) and the job requeues as a training job does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from tuneforge import fsutil
from tuneforge.conf.schema import Config, DataConfig
from tuneforge.data.tokenize import IGNORE_INDEX
from tuneforge.trainers.probe_report import PROGRESS, RESULT

#: (example id, summed loss in nats, scored tokens, bytes, words, tokens with text)
Scored = Tuple[int, float, int, int, int, int]


def run(cfg: Config, dist_env, stop, phase) -> dict:
    """Score one candidate on this rank; `phase(name, detail)` is told each start-up step (the launcher shows them)."""
    from tuneforge.conf.backends import model_dtype
    from tuneforge.conf.methods import FullConfig
    from tuneforge.conf.schema import to_container
    from tuneforge.trainers import backends, model
    from tuneforge.trainers.distributed import agreed_stop, close_process_group, init_process_group
    from tuneforge.trainers.export import run_tokenizer
    from tuneforge.trainers.logging import RunLogger

    run_dir, t = Path(cfg.run.dir), cfg.train
    init_process_group(dist_env, cfg.cluster.collective_timeout_s)
    logger = engine = net = None
    finished = False
    try:
        full = FullConfig()  # the probe reads the base's weights whatever method the training will use
        phase("tokenizer")
        tokenizer = model.load_tokenizer(cfg.model, full, lambda: iter(()), run_dir, dist_env)
        run_tokenizer(tokenizer, cfg.data)
        phase("data", cfg.data.name)
        sets = samples(cfg, dist_env)
        examples = {name: scored_examples(d, tokenizer, t.seq_len, rows) for name, (d, rows) in sets.items()}
        dtype = model_dtype(cfg.backend, t.dtype, peft=True)  # a frozen base: train.dtype on every backend
        phase("model", cfg.model.name_or_path)
        net = model.load_model(cfg.model, full, tokenizer, dtype, dist_env.device, t.seed)
        counts = model.count_parameters(net)
        context = getattr(net.config, "max_position_embeddings", None)
        phase("backend", cfg.backend.name)
        engine = backends.prepare(net, cfg.backend, t, dist_env)
        logger = RunLogger(cfg.logger, run_dir, to_container(cfg), enabled=dist_env.is_main)
        progress = _load_progress(run_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        done_batches = 0
        phase("scoring", ", ".join(f"{len(items)} {name} examples" for name, items in examples.items()))
        for name, items in examples.items():
            batches = _batches(items, t.micro_batch)
            mine = list(range(dist_env.rank, len(batches), dist_env.world_size))
            per_rank = -(-len(batches) // dist_env.world_size)
            finished_ids = set(progress.get(name, {}))
            scored: List[Scored] = []
            for k in range(per_rank):
                batch = batches[mine[k]] if k < len(mine) else []
                todo = [e for e in batch if e["id"] not in finished_ids]
                scored += score(engine.model, todo, pad_id, dist_env.device)  # [] still runs a blank forward
                done_batches += 1
                if cfg.debug.stop_after is not None and done_batches >= cfg.debug.stop_after:
                    stop.request("stop_after")
                reason = agreed_stop(stop)
                if reason:
                    _save_progress(run_dir, progress, name, scored, dist_env.is_main)
                    return {"step": done_batches, "stopped": reason, "loss": float("nan"), "probe": True}
            progress = _merge(progress, name, _gather(scored))
        result = {
            "model": cfg.model.name_or_path,
            "params": counts["params_total"],
            "context": context,
            "dtype": dtype,
            **{name: totals(progress[name], len(sets[name][1])) for name in examples},
        }
        result["gap"] = result["domain"]["bits_per_byte"] - result["general"]["bits_per_byte"]
        if dist_env.is_main:
            fsutil.write_json(run_dir / RESULT, result)
            flat = {f"probe/{k}": v for k, v in _flatten(result).items() if isinstance(v, (int, float))}
            logger.log(flat, step=0)
            logger.summary(flat)
            logger.table("probe", list(flat), [list(flat.values())])
            from tuneforge.trainers import probe_report

            probe_report.update(run_dir.parent)  # the probe dir's probe.json, with what is done so far
            print(f"probe: {json.dumps(result)}", flush=True)
        finished = True
        return {
            "step": done_batches,
            "stopped": None,
            "loss": result["domain"]["bits_per_byte"],
            "probe": True,
            **result,
        }
    finally:
        if logger is not None:
            logger.close()
        engine = net = None  # noqa: F841 (their gloo work goes before the process group)
        close_process_group(finished)


# ------------------------------------------------------------------------------------------ the sample
def general_data(general: str) -> DataConfig:
    """The general-text slice as a data config: a bundled name or a path of text documents."""
    is_path = "/" in general or Path(general).suffix or Path(general).expanduser().exists()
    return DataConfig(name=general, path=general if is_path else None, format="text", text_sample_by="paragraph")


def samples(cfg: Config, dist_env) -> Dict[str, Tuple[DataConfig, List[dict]]]:
    """{"domain": (cfg.data, its sample), "general": (probe.general, its sample)}: read by rank 0 and handed
    to every rank (a rank 0 error is raised on every rank: none waits for the others)."""
    from tuneforge.data.records import DataError

    general = general_data(cfg.probe.general)
    chosen, error = None, None
    if dist_env.is_main:
        try:
            chosen = [sample(d, cfg.probe.examples, cfg.train.seed) for d in (cfg.data, general)]
        except (DataError, OSError) as e:
            error = f"{type(e).__name__}: {e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [chosen, error]
        dist.broadcast_object_list(box, src=0)
        chosen, error = box
    if error:
        raise DataError(error)
    return {"domain": (cfg.data, chosen[0]), "general": (general, chosen[1])}


def sample(data_cfg: DataConfig, n: int, seed: int) -> List[dict]:
    """`n` rows of the data's training source (all of them when fewer), chosen with `seed`, in file order."""
    from tuneforge.data import sources

    rows = list(sources.rows(sources.train_source(data_cfg), data_cfg))
    if len(rows) <= n:
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return [rows[i] for i in keep]


def scored_examples(data_cfg: DataConfig, tokenizer, seq_len: int, rows: List[dict]) -> List[dict]:
    """The rows tokenised as training would (windows of seq_len for documents), each with its bytes and
    words: {"id", "ids", "labels", "bytes", "words", "text_tokens"}. Ids number them in order."""
    from tuneforge.data.tokenize import Encoder

    encoder = Encoder(data_cfg, tokenizer, seq_len)
    out = []
    for ids, labels, offsets, text in encoder.encode_with_offsets(rows):
        starts = range(0, len(ids), seq_len) if data_cfg.format == "text" else [0]
        for start in starts:
            end = start + seq_len
            w_labels = list(labels[start:end])
            w_labels[0] = IGNORE_INDEX  # no context to predict the first token of a window from
            nbytes, words, with_text = scored_text(text, offsets, w_labels, start)
            if nbytes == 0:
                continue
            out.append(
                {"id": len(out), "ids": list(ids[start:end]), "labels": w_labels, "bytes": nbytes, "words": words}
                | {"text_tokens": with_text}
            )
    return out


def scored_text(text: str, offsets, window_labels: List[int], start: int) -> Tuple[int, int, int]:
    """(UTF-8 bytes, words, tokens that produce text) of what the scored tokens of a window produce: for
    each, the text from the end of the token before it to its own end (an added EOS produces none)."""
    nbytes, with_text, pieces, last = 0, 0, [], None
    prev_end = max((end for _, end in offsets[:start]), default=0)
    for i, label in enumerate(window_labels):
        end = offsets[start + i][1]
        if label != IGNORE_INDEX and end > prev_end:
            piece = text[prev_end:end]
            nbytes += len(piece.encode("utf-8"))
            pieces.append(piece if last == i - 1 else " " + piece)  # a gap between scored runs splits words
            last, with_text = i, with_text + 1
        prev_end = max(prev_end, end)
    return nbytes, len("".join(pieces).split()), with_text


# ------------------------------------------------------------------------------------------ scoring
def _batches(items: List[dict], micro_batch: int) -> List[List[dict]]:
    """Batches of similar lengths (longest first), fixed by the examples alone: the same on any world size."""
    order = sorted(items, key=lambda e: (-len(e["ids"]), e["id"]))
    return [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]


@torch.no_grad()
def score(model: torch.nn.Module, batch: List[dict], pad_id: int, device) -> List[Scored]:
    """Per example: summed loss of its scored tokens. An empty batch runs one blank forward (a rank
    short of batches keeps the collective forwards of FSDP2 and ZeRO-3 in step)."""
    was_training = model.training
    model.eval()
    rows = batch or [{"id": -1, "ids": [pad_id, pad_id], "labels": [IGNORE_INDEX, IGNORE_INDEX]}]
    width = max(len(e["ids"]) for e in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, e in enumerate(rows):
        ids[r, : len(e["ids"])] = torch.tensor(e["ids"])
        labels[r, : len(e["labels"])] = torch.tensor(e["labels"])
        mask[r, : len(e["ids"])] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
    targets = labels[:, 1:].to(device)
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    sums = losses.double().sum(dim=1).cpu().tolist()
    counts = (targets != IGNORE_INDEX).sum(dim=1).cpu().tolist()
    model.train(was_training)
    if not batch:
        return []
    return [(e["id"], sums[r], counts[r], e["bytes"], e["words"], e["text_tokens"]) for r, e in enumerate(batch)]


def totals(per_example: Dict[str, list], rows: int) -> dict:
    """Bits per byte and the rest of one set, added in example order."""
    values = [per_example[k] for k in sorted(per_example, key=int)]
    loss = math.fsum(v[0] for v in values)
    tokens, nbytes = sum(v[1] for v in values), sum(v[2] for v in values)
    words, text_tokens = sum(v[3] for v in values), sum(v[4] for v in values)
    return {
        "bits_per_byte": loss / (math.log(2) * nbytes) if nbytes else None,
        "loss_per_token": loss / tokens if tokens else None,
        "tokens_per_word": text_tokens / words if words else None,
        "rows": rows,
        "examples": len(values),
        "tokens": tokens,
        "bytes": nbytes,
        "words": words,
    }


# ------------------------------------------------------------------------------------------ progress
def _gather(scored: List[Scored]) -> List[Scored]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, scored)
        return [s for part in everyone for s in part]
    return scored


def _merge(progress: dict, name: str, scored: List[Scored]) -> dict:
    merged = dict(progress.get(name, {}))
    merged.update({str(s[0]): list(s[1:]) for s in scored})
    return {**progress, name: merged}


def _load_progress(run_dir: Path) -> dict:
    path = run_dir / PROGRESS
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_progress(run_dir: Path, progress: dict, name: str, scored: List[Scored], is_main: bool) -> None:
    """Collective: every rank's examples scored so far, written by rank 0 before the job stops."""
    merged = _merge(progress, name, _gather(scored))
    if is_main:
        fsutil.write_json(run_dir / PROGRESS, merged)
    if dist.is_initialized():
        dist.barrier()


def _flatten(result: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
