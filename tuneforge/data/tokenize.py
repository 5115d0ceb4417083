"""Rows of a dataset -> token ids and labels, one example each, per `data.format`.

Every format is first rendered to one string plus the character spans that are *responses*
(what the model should learn to write); the string is tokenised once, with offsets, and a token
is a target when it starts inside a response span. Prompt tokens get IGNORE_INDEX as label unless
`data.train_on_prompt`. Tokenising the whole string (not prompt and response apart) gives the
tokens the model will see at inference, where the prompt is followed by its generated answer.

- text:        the document + EOS; every token is a target.
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

from tuneforge.compat.transformers import encode_with_offsets
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
        return [(ids, labels) for _, ids, labels, _, _ in self._examples(records)]

    def encode_indexed(self, records: Sequence[Dict[str, Any]]) -> List[Tuple[int, List[int], List[int]]]:
        """`encode`, each example with the index of the record it came from."""
        return [(i, ids, labels) for i, ids, labels, _, _ in self._examples(records)]

    def encode_with_offsets(
        self, records: Sequence[Dict[str, Any]]
    ) -> List[Tuple[List[int], List[int], List[Span], str]]:
        """`encode`, with each token's character span in the rendered text ((0, 0): an added token
        such as EOS) and the text: what the probe counts the bytes of the scored text with."""
        return [example[1:] for example in self._examples(records)]

    def _examples(self, records: Sequence[Dict[str, Any]]) -> List[tuple]:
        """(record index, ids, labels, offsets, text) of each record that has a target token."""
        rendered = [self.render(r) for r in records]
        encoded = encode_with_offsets(
            self.tokenizer,
            [text for text, _, _ in rendered],
            add_special_tokens=self.format != "chat",  # a chat template writes its own BOS
        )
        examples = []
        # offsets: (start, end) tuples
        for index, ((text, spans, add_eos), (ids, offsets)) in enumerate(zip(rendered, encoded)):
            if self.train_on_prompt:
                labels = list(ids)
            elif spans == [(0, len(text))]:  # the whole text (format=text)
                labels = _whole_text_labels(ids, offsets, len(text))
            else:
                labels = [tok if _inside(off[0], off[1], spans) else IGNORE_INDEX for tok, off in zip(ids, offsets)]
            if add_eos:  # the response ends with EOS, a target (also when the tokenizer appended one itself)
                eos = self.tokenizer.eos_token_id
                if ids and ids[-1] == eos:
                    ids, labels, offsets = ids[:-1], labels[:-1], offsets[:-1]
                ids, labels, offsets = ids + [eos], labels + [eos], offsets + [(0, 0)]
            if self.format != "text" and len(ids) > self.seq_len:  # documents are split by the packer instead
                ids, labels, offsets = ids[: self.seq_len], labels[: self.seq_len], offsets[: self.seq_len]
                self.truncated += 1
            if all(label == IGNORE_INDEX for label in labels[1:]):  # the first token is never a target
                self.dropped += 1
                continue
            examples.append((index, ids, labels, offsets, text))
        return examples


def _whole_text_labels(ids: List[int], offsets: List[Span], n: int) -> List[int]:
    """The labels of a text that is all response: `_inside`'s rule (a token is a target unless the
    tokenizer added it, offsets (0, 0), or it starts past the text), without a Python test per token
    (a tenth of a corpus's tokenising). Such tokens are looked for at the two ends, where a template
    adds them; in between, one (0, 0) is searched for at C speed, and if found the rule runs per token.
    (A token past the text can only be in the end's run: the tokens of a text start in order.)"""
    k, first = len(ids), 0
    while first < k and not (offsets[first] != (0, 0) and offsets[first][0] < n):
        first += 1
    last = k - 1
    while last >= first and not (offsets[last] != (0, 0) and offsets[last][0] < n):
        last -= 1
    if (0, 0) in offsets[first + 1 : last]:
        return [tok if (a or b) and a < n else IGNORE_INDEX for tok, (a, b) in zip(ids, offsets)]
    return [IGNORE_INDEX] * first + ids[first : last + 1] + [IGNORE_INDEX] * (k - 1 - last)


def _inside(start: int, end: int, spans: List[Span]) -> bool:
    """Whether a token at [start, end) starts inside a response span (added special tokens have end 0)."""
    if end == 0 and start == 0:
        return False
    return any(s <= start < e for s, e in spans)
