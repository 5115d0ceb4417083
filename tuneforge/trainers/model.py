"""Tokenizer and model: loaded from a hub id or path, or built from the config for pretraining."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def builds_from_config(model_cfg, method_cfg) -> bool:
    """Random init (no weights read): model=tiny, or pretraining an architecture given by path."""
    return model_cfg.kind == "tiny" or method_cfg.name == "pretrain"


def load_tokenizer(model_cfg, method_cfg, texts: Iterable[str], run_dir: Path, dist_env):
    """The run's tokenizer. Pretraining without one trains a byte-level BPE on the corpus (rank 0,
    saved in <run dir>/tokenizer, reused on resume); otherwise the model's or model.tokenizer."""
    from transformers import AutoTokenizer

    source = model_cfg.tokenizer or (model_cfg.name_or_path if model_cfg.kind == "hf" else None)
    if source:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
    else:
        import torch.distributed as dist

        saved = run_dir / "tokenizer"
        if dist_env.is_main and not (saved / "tokenizer.json").is_file():
            train_tokenizer(texts(), model_cfg.vocab_size, method_cfg.tokenizer_min_frequency).save_pretrained(saved)
        dist.barrier()
        tok = AutoTokenizer.from_pretrained(saved)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int):
    """A byte-level BPE (GPT-2 style pre-tokenisation) trained with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def model_config(model_cfg, tokenizer):
    """The transformers config of the model to build or load."""
    from transformers import AutoConfig, LlamaConfig

    if model_cfg.kind == "hf":
        return AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    return LlamaConfig(
        vocab_size=max(model_cfg.vocab_size, len(tokenizer)),
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        rope_theta=model_cfg.rope_theta,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def load_model(model_cfg, method_cfg, tokenizer, dtype: str, device: str, seed: int) -> torch.nn.Module:
    """Build at random (same weights on every rank: seeded) or load pretrained weights."""
    from transformers import AutoModelForCausalLM

    config = model_config(model_cfg, tokenizer)
    torch_dtype = DTYPES[dtype]
    if builds_from_config(model_cfg, method_cfg):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch_dtype, attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.name_or_path, config=config, dtype=torch_dtype,
            attn_implementation=model_cfg.attn_implementation, trust_remote_code=model_cfg.trust_remote_code,
        )
    model.config.use_cache = False  # training: no KV cache
    return model.to(device)


def count_parameters(model: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}
