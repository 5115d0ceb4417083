"""Vocabulary extension for domain terms (`model.new_tokens`, `model.new_tokens_file`).

The terms are added to the run's tokenizer as ordinary (not special) tokens, so each one encodes as a
single id, before the data is tokenised. A model whose embeddings have no row for them (a loaded
model) gets its input embeddings, and its output head when untied, resized to the new vocabulary; the
new rows start as the mean of the rows the vocabulary had before (a common initialisation: the new
tokens start as an "average" token, not as noise that would spike the loss). A model built from its
config (pretraining) is built with the larger vocabulary in the first place. `final/` is saved with
the resized model and the extended tokenizer, so AutoModelForCausalLM and AutoTokenizer load both with
the new size; `tuneforge export` extends the tokenizer and the model the same way before loading the
checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch

from tuneforge.conf.schema import ModelConfig


def new_tokens(model_cfg: ModelConfig) -> List[str]:
    """The configured terms, in order, without repeats: model.new_tokens, then model.new_tokens_file's lines."""
    terms = list(model_cfg.new_tokens)
    if model_cfg.new_tokens_file:
        lines = Path(model_cfg.new_tokens_file).expanduser().read_text(encoding="utf-8").splitlines()
        terms += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return list(dict.fromkeys(terms))


def extend_tokenizer(tokenizer, model_cfg: ModelConfig) -> int:
    """Add the configured terms the tokenizer does not know yet; returns its size before them."""
    before = len(tokenizer)
    terms = [t for t in new_tokens(model_cfg) if t not in tokenizer.get_vocab()]
    if terms:
        tokenizer.add_tokens(terms)
    return before


@torch.no_grad()
def resize_model(model: torch.nn.Module, tokenizer, old_vocab: int) -> int:
    """Give every id of `tokenizer` an embedding row (and head row); rows of the ids from `old_vocab` on
    start as the mean of the rows below `old_vocab`. Returns how many rows were initialised."""
    new_vocab = len(tokenizer)
    if new_vocab <= old_vocab:
        return 0
    embeddings = model.get_input_embeddings()
    if embeddings.weight.shape[0] < new_vocab:
        model.resize_token_embeddings(new_vocab, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(head.weight)
    for weight in matrices:
        weight[old_vocab:new_vocab] = weight[:old_vocab].float().mean(0).to(weight.dtype)
    return new_vocab - old_vocab
