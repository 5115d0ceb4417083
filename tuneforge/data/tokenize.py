"""Rows of a dataset -> token ids and labels, one example each, per `data.format`.

Every format is first rendered to one string plus the character spans that are *responses*
(what the model should learn to write); the string is tokenised once, with offsets, and a token
is a target when it starts inside a response span. A text that is all response (format=text) needs
no offsets: every token is a target but those the tokenizer added (a BOS, a template's EOS). Prompt
tokens get IGNORE_INDEX as label unless `data.train_on_prompt`. Tokenising the whole string (not
prompt and response apart) gives the tokens the model will see at inference, where the prompt is
followed by its generated answer.

- text:        the document + EOS; every token is a target but those the tokenizer added.
- alpaca:      ALPACA_PROMPT(instruction, input) + output + EOS; the output and EOS are targets.
- completion:  prompt + completion + EOS; the completion and EOS are targets.
- chat:        the messages rendered by the chat template (data.chat_template, else the tokenizer's,
               else DEFAULT_CHAT_TEMPLATE); each assistant turn (its content and the end-of-turn
               text the template puts after it) is a target. The spans come from rendering the
               conversation up to each assistant turn, which needs a template whose render of a
               prefix of the conversation is a prefix of the whole render (true of common templates).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tuneforge.compat.transformers import encode_ids, encode_with_offsets
from tuneforge.data.records import DataError, row_spec

IGNORE_INDEX = -100  # label of a token that does not count in the loss (prompts, example starts, padding)

#: Used when neither data.chat_template nor the tokenizer has one (Zephyr's layout). Each turn is
#: "<|role|>\n" + content + EOS + "\n"; a generation prompt is "<|assistant|>\n".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

#: The Stanford Alpaca prompts, with and without the optional input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

Example = Tuple[Sequence[int], Sequence[int]]  # (input_ids, labels): lists, or int32 arrays once packed
Span = Tuple[int, int]  # [start, end) in characters


def chat_template(data_cfg, tokenizer) -> str:
    return data_cfg.chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def tokenizer_fingerprint(tokenizer, template: Optional[str]) -> str:
    """A hash of everything about the tokenizer that changes the tokens: vocabulary, merges,
    normalisation, special tokens, and the chat template in use."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update((template or "").encode())
    return h.hexdigest()[:16]


class Encoder:
    """Turns rows of one format into (input_ids, labels) examples."""

    def __init__(self, data_cfg, tokenizer, seq_len: int):
        self.cfg, self.tokenizer, self.seq_len = row_spec(data_cfg), tokenizer, seq_len  # plain attributes: fast
        self.format, self.train_on_prompt = data_cfg.format, bool(data_cfg.train_on_prompt)
        self.template = chat_template(data_cfg, tokenizer) if self.format == "chat" else None
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; examples could not be terminated")
        # format=text: the tokens the tokenizer adds around every text (BOS...), the only ones not targets
        self.added = added_tokens(tokenizer) if self.format == "text" else None
        self.truncated = 0  # examples longer than seq_len, cut (text documents are split instead)
        self.dropped = 0  # examples left without a single target token after truncation

    def render(self, record: Dict[str, Any]) -> Tuple[str, List[Span], bool]:
        """(text, response spans, whether to append EOS) of one well-formed row."""
        c = self.cfg
        if self.format == "text":
            text = record[c.text_field]
            return text, [(0, len(text))], True
        if self.format == "alpaca":
            extra = record.get(c.input_field) or ""
            template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
            prompt = template.format(instruction=record[c.instruction_field], input=extra)
            return prompt + record[c.output_field], [(len(prompt), len(prompt) + len(record[c.output_field]))], True
        if self.format == "completion":
            prompt = record[c.prompt_field]
            return (
                prompt + record[c.completion_field],
                [(len(prompt), len(prompt) + len(record[c.completion_field]))],
                True,
            )
        return self._render_chat(record[c.messages_field])

    def _render_chat(self, messages: List[Dict[str, str]]) -> Tuple[str, List[Span], bool]:
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        full = self._apply(messages, generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self._apply(messages[:i], generation_prompt=True)) if i else 0
            upto = self._apply(messages[: i + 1], generation_prompt=False)
            if not full.startswith(upto) or start > len(upto):
                raise DataError(
                    "data.chat_template: rendering the conversation up to a turn does not give a prefix of the "
                    "whole conversation, so the assistant turns cannot be located; give a template that renders "
                    "turn by turn (see docs/data.md)"
                )
            spans.append((start, len(upto)))
        return full, spans, False

    def _apply(self, messages, generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def encode(self, records: Sequence[Dict[str, Any]]) -> List[Example]:
        """Examples for `records` (well-formed rows); those without any target token are dropped."""
        return [(ids, labels) for _, ids, labels, _, _ in self._examples(records, with_offsets=False)]

    def encode_indexed(self, records: Sequence[Dict[str, Any]]) -> List[Tuple[int, List[int], List[int]]]:
        """`encode`, each example with the index of the record it came from."""
        return [(i, ids, labels) for i, ids, labels, _, _ in self._examples(records, with_offsets=False)]

    def encode_with_offsets(
        self, records: Sequence[Dict[str, Any]]
    ) -> List[Tuple[List[int], List[int], List[Span], str]]:
        """`encode`, with each token's character span in the rendered text ((0, 0): an added token
        such as EOS) and the text: what the probe counts the bytes of the scored text with."""
        return [example[1:] for example in self._examples(records, with_offsets=True)]

    def _examples(self, records: Sequence[Dict[str, Any]], with_offsets: bool) -> List[tuple]:
        """(record index, ids, labels, offsets or None, text) of each record that has a target token."""
        rendered = [self.render(r) for r in records]
        texts = [text for text, _, _ in rendered]
        add_special_tokens = self.format != "chat"  # a chat template writes its own BOS
        added_masks = None
        if self.format == "text" and self.added is None:  # what the tokenizer adds varies: its mask per text
            called = self.tokenizer(texts, return_special_tokens_mask=True, return_offsets_mapping=with_offsets)
            added_masks = called["special_tokens_mask"]
            encoded = zip(called["input_ids"], called["offset_mapping"] if with_offsets else [None] * len(texts))
        elif with_offsets or self.format != "text":  # the labels of a response span need every token's place
            encoded = encode_with_offsets(self.tokenizer, texts, add_special_tokens)
        else:  # format=text: the labels need only the counts of what the tokenizer added
            encoded = [(ids, None) for ids in encode_ids(self.tokenizer, texts, add_special_tokens)]
        examples = []
        for index, ((text, spans, add_eos), (ids, offsets)) in enumerate(zip(rendered, encoded)):
            if self.train_on_prompt:
                labels = list(ids)
            elif added_masks is not None:
                labels = [IGNORE_INDEX if added else tok for tok, added in zip(ids, added_masks[index])]
            elif self.format == "text":  # every token of the text
                before, after = self.added
                labels = [IGNORE_INDEX] * before + ids[before : len(ids) - after] + [IGNORE_INDEX] * after
            else:  # offsets: (start, end) tuples
                labels = [tok if _inside(off[0], off[1], spans) else IGNORE_INDEX for tok, off in zip(ids, offsets)]
            if add_eos:  # the response ends with EOS, a target (also when the tokenizer appended one itself)
                eos = self.tokenizer.eos_token_id
                if ids and ids[-1] == eos:
                    ids, labels, offsets = ids[:-1], labels[:-1], offsets and offsets[:-1]
                ids, labels = ids + [eos], labels + [eos]
                offsets = None if offsets is None else offsets + [(0, 0)]
            if self.format != "text" and len(ids) > self.seq_len:  # documents are split by the packer instead
                ids, labels, offsets = ids[: self.seq_len], labels[: self.seq_len], offsets[: self.seq_len]
                self.truncated += 1
            if all(label == IGNORE_INDEX for label in labels[1:]):  # the first token is never a target
                self.dropped += 1
                continue
            examples.append((index, ids, labels, offsets, text))
        return examples


#: Texts whose encodings, with and without the tokenizer's special tokens, show what it adds around a text.
_PROBE_TEXTS = ("a", "Tuneforge probes 12 tokens.", " two  spaces\nand a line")


def added_tokens(tokenizer) -> Optional[Tuple[int, int]]:
    """(before, after): how many tokens the tokenizer adds around every text it encodes (a BOS, a
    CLS and SEP, an EOS), read from encoding probe texts with and without them. None when what it
    adds is not one fixed run before and after (then the labels follow its mask of each text). Knowing
    these counts, a text's labels need neither offsets (a third of the Rust tokenizer's time) nor a
    per-token test."""
    found = set()
    for text in _PROBE_TEXTS:
        (with_added,), (without,) = encode_ids(tokenizer, [text], True), encode_ids(tokenizer, [text], False)
        runs = {
            (before, len(with_added) - len(without) - before)
            for before in range(len(with_added) - len(without) + 1)
            if with_added[before : before + len(without)] == without
        }
        if len(runs) != 1:
            return None
        before, after = runs.pop()
        found.add((tuple(with_added[:before]), tuple(with_added[len(with_added) - after :])))
    if len(found) != 1:  # the added tokens depend on the text
        return None
    head, tail = found.pop()
    return len(head), len(tail)


def _inside(start: int, end: int, spans: List[Span]) -> bool:
    """Whether a token at [start, end) starts inside a response span (added special tokens have end 0)."""
    if end == 0 and start == 0:
        return False
    return any(s <= start < e for s, e in spans)
