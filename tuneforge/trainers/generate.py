"""Greedy answers, on every backend and any number of ranks, and the loss of a reference answer.

Under FSDP2 and ZeRO-3 a forward pass is collective (every rank gathers the shards of each block), so
every rank runs every prompt, token by token, in step with the others: the same prompts, the same
number of forward passes, and the next token that rank 0 chose (broadcast), so that no rank stops or
diverges before the others. The text is then rank 0's, which is what one process computes alone.
One prompt at a time (no padding: the answer does not depend on what it is batched with), with the
model's KV cache.

`Sampler` holds a run's prompts (data/prompts.py) tokenised as the run's data (data/tokenize.py
renders them, so a chat prompt gets the chat template and its generation prompt) and answers them
with the engine's model: the rows of <run dir>/samples.jsonl (trainers/samples.py).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from tuneforge.compat.transformers import kv_cache_key
from tuneforge.data.records import DataError
from tuneforge.data.tokenize import IGNORE_INDEX, Encoder


@torch.no_grad()
def greedy(
    model: torch.nn.Module, prompt_ids: List[int], max_new_tokens: int, eos_id: Optional[int], device
) -> List[int]:
    """The greedy continuation of `prompt_ids` (at most `max_new_tokens`, ending at EOS, which is kept out).
    Collective when a process group of several ranks exists: call it on every rank with the same prompt."""
    together = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    key, past, out = kv_cache_key(), None, []
    for _ in range(max_new_tokens):
        result = model(input_ids=ids, use_cache=True, **{key: past})
        past = getattr(result, key)
        token = result.logits[:, -1].argmax(dim=-1)
        if together:  # rank 0's choice for every rank: all stay in step and give the same text
            dist.broadcast(token, src=0)
        if eos_id is not None and int(token) == eos_id:
            break
        out.append(int(token))
        ids = token.view(1, 1)
    return out


@torch.no_grad()
def reference_loss(model: torch.nn.Module, ids: List[int], labels: List[int], device) -> Optional[float]:
    """Mean token loss of the labelled tokens (the reference answer) given the rest: one forward."""
    targets = torch.tensor([labels[1:]], dtype=torch.long, device=device)
    counted = int((targets != IGNORE_INDEX).sum())
    if counted == 0:
        return None
    logits = model(input_ids=torch.tensor([ids], dtype=torch.long, device=device)).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return float(loss) / counted


def _last_response(encoder: Encoder, row: dict, start: int):
    """(ids, labels) of a row with only its last response as targets (the reference answer: earlier
    assistant turns of a conversation are context), or None when truncation left it no target."""
    encoded = encoder.encode_with_offsets([row])
    if not encoded:
        return None
    ids, labels, offsets, _ = encoded[0]
    # tokens before the reference are context; added tokens (EOS, offsets (0, 0)) keep their label
    labels = [IGNORE_INDEX if (end > 0 and begin < start) else label for label, (begin, end) in zip(labels, offsets)]
    return (ids, labels) if any(label != IGNORE_INDEX for label in labels[1:]) else None


class Sampler:
    """A run's prompts, tokenised once, answered by the model whenever the run evaluates."""

    def __init__(self, prompts, data_cfg, tokenizer, seq_len: int, max_new_tokens: int, max_positions: int):
        from tuneforge.data import prompts as prompt_rows

        self.prompts, self.tokenizer, self.max_new_tokens = list(prompts), tokenizer, max_new_tokens
        encoder = Encoder(prompt_rows.data_config(data_cfg), tokenizer, seq_len)
        room = max(1, max_positions - max_new_tokens)  # the prompt's tokens kept (its end)
        self.inputs, self.scored = [], []
        for p in self.prompts:
            text, spans, _ = encoder.render(p.row)
            prompt_text = text[: spans[-1][0]]
            ids = tokenizer(prompt_text, add_special_tokens=encoder.format != "chat")["input_ids"]
            self.inputs.append(ids[-room:])
            self.scored.append(_last_response(encoder, p.row, spans[-1][0]) if p.reference else None)

    def __len__(self) -> int:
        return len(self.prompts)

    def answer(self, model: torch.nn.Module, device) -> List[dict]:
        """Collective: every prompt's greedy answer and its reference's loss (rows of samples.jsonl)."""
        was_training = model.training
        model.eval()
        rows = []
        try:
            for i, (p, ids, scored) in enumerate(zip(self.prompts, self.inputs, self.scored)):
                new = greedy(model, ids, self.max_new_tokens, self.tokenizer.eos_token_id, device)
                loss = reference_loss(model, *scored, device) if scored is not None else None
                answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
                rows.append({"index": i, "prompt": p.prompt, "reference": p.reference, "answer": answer})
                rows[-1]["reference_loss"] = loss
        finally:
            model.train(was_training)
        return rows


def answer(model, tokenizer, data_cfg, prompt: str, system: Optional[str], max_new_tokens: int, device) -> str:
    """One prompt's greedy answer, rendered as a run with `data_cfg` renders its eval prompts."""
    from tuneforge.data import prompts

    data_cfg = prompt_view(data_cfg)
    row = {"prompt": prompt, **({"system": system} if system else {})}
    positions = getattr(model.config, "max_position_embeddings", None) or 2048
    sampler = Sampler(prompts.from_file([row], data_cfg), data_cfg, tokenizer, positions, max_new_tokens, positions)
    return sampler.answer(model, device)[0]["answer"]


def prompt_view(data_cfg):
    """The data config prompts are rendered with: the data's own, or in a mixture (data.sources) its first
    chat or instruction source (else its first source)."""
    from tuneforge.conf.schema import source_views

    views = source_views(data_cfg)
    return next((v for v in views if v.format != "text"), views[0])


def prompts_of(eval_cfg, data_cfg, seed: int, dist_env) -> list:
    """The run's prompts: eval.prompts' rows, else the first held-out rows of instruction or chat data.
    Read by rank 0 and handed to every rank (they must all answer the same ones)."""
    chosen, error = None, None
    if dist_env.is_main:
        try:
            chosen = _read_prompts(eval_cfg, data_cfg, seed)
        except (DataError, OSError) as e:  # raised on every rank below: none may wait for the others
            error = f"eval.prompts: {e}" if eval_cfg.prompts else str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [chosen, error]
        dist.broadcast_object_list(box, src=0)
        chosen, error = box
    if error:
        raise DataError(error)
    return chosen


def _read_prompts(eval_cfg, data_cfg, seed: int) -> list:
    from tuneforge.data import pipeline, prompts

    data_cfg = prompt_view(data_cfg)
    if eval_cfg.num_prompts == 0:
        return []
    if eval_cfg.prompts:
        return prompts.from_file(prompts.read(eval_cfg.prompts), data_cfg)[: eval_cfg.num_prompts]
    if data_cfg.format == "text":
        return []
    return prompts.from_held_out(pipeline.held_out_records(data_cfg, seed, eval_cfg.num_prompts), data_cfg)
