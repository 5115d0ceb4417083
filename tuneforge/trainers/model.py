"""Tokenizer and model: loaded from a hub id or path, or built from the config for pretraining."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from tuneforge.compat.deepspeed import full_numel
from tuneforge.conf import methods
from tuneforge.conf.methods import MethodConfig, QLoraMethodConfig
from tuneforge.conf.schema import DataConfig, ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def builds_from_config(model_cfg: ModelConfig, method_cfg: MethodConfig) -> bool:
    """Random init (no weights read): model=tiny, or pretraining an architecture given by path."""
    return model_cfg.kind == "tiny" or methods.method(method_cfg.name).builds


def load_tokenizer(
    model_cfg: ModelConfig, method_cfg: MethodConfig, texts: Callable[[], Iterable[str]], run_dir: Path, dist_env
):
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


def model_config(model_cfg: ModelConfig, tokenizer):
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


def load_model(
    model_cfg: ModelConfig, method_cfg: MethodConfig, tokenizer, dtype: str, device: str, seed: int
) -> torch.nn.Module:
    """Build at random (same weights on every rank: seeded) or load pretrained weights."""
    from transformers import AutoModelForCausalLM

    config = model_config(model_cfg, tokenizer)
    attention = attn_implementation(model_cfg, config)
    torch_dtype = DTYPES[dtype]
    if builds_from_config(model_cfg, method_cfg):
        # the same initial weights on every backend and world size, sharded or not (trainers/sharded/init.py)
        from tuneforge.trainers.sharded.glue import dense_pretrain_model

        model = dense_pretrain_model(config, torch_dtype, seed, attention, model_cfg.trust_remote_code)
    else:
        quantized = {}
        if methods.method(method_cfg.name).quantized:  # 4-bit weights are placed while loading; .to() cannot move them
            quantized = {"quantization_config": quantization_config(method_cfg, dtype), "device_map": {"": device}}
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.name_or_path,
            config=config,
            dtype=torch_dtype,
            attn_implementation=attention,
            trust_remote_code=model_cfg.trust_remote_code,
            **quantized,
        )
        if quantized:
            from peft import prepare_model_for_kbit_training

            # Freezes the base and keeps norms in fp32. Activation checkpointing is not switched on here:
            # it is a memory knob of its own, not part of the method.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            model.config.use_cache = False
            return model
    model.config.use_cache = False  # training: no KV cache
    return model.to(device)


def attn_implementation(model_cfg: ModelConfig, config) -> Optional[str]:
    """What transformers is asked for: model.attn_implementation, "auto" resolved as the launcher did
    (sdpa where the model class has an SDPA path, else eager; None: custom code, transformers decides).
    A hub id's config is first read here: what the launcher refuses for a local checkpoint (not a
    causal LM, custom code without trust_remote_code, an attention the class lacks) fails here, by key."""
    from tuneforge.arch import support

    found = config.to_dict()
    if model_cfg.kind == "hf":
        reason = support.refusal(found, model_cfg.trust_remote_code)
        if reason:
            raise ValueError(f"model.name_or_path: {model_cfg.name_or_path}: {reason}")
    impl, note = support.attention(found, model_cfg.attn_implementation)
    if impl is None:
        raise ValueError(f"model.attn_implementation: {note}")
    return None if impl == "auto" else impl


def check_packing(data_cfg: DataConfig, config) -> None:
    """Packed rows need a mask that follows their position ids; a hub id's family is first known here."""
    from tuneforge.arch import support

    model_type = config.to_dict().get("model_type", "")
    if data_cfg.packing and not support.packing_isolated(model_type):
        raise ValueError(
            f"data.packing: {model_type}'s attention mask ignores the position ids of packed rows, so packed "
            "examples would attend to each other; set data.packing=false"
        )


def quantization_config(method_cfg: QLoraMethodConfig, dtype: str):
    """bitsandbytes 4-bit loading for QLoRA: compute in `dtype` (the dtype the model is loaded in); the
    packed weights stored in it too by default, so that FSDP (which needs one float dtype) can shard them."""
    from transformers import BitsAndBytesConfig

    storage = dtype if method_cfg.quant_storage == "auto" else method_cfg.quant_storage
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method_cfg.quant_type,
        bnb_4bit_use_double_quant=method_cfg.double_quant,
        bnb_4bit_compute_dtype=DTYPES[dtype],
        bnb_4bit_quant_storage=torch.uint8 if storage == "uint8" else DTYPES[storage],
    )


def count_parameters(model: torch.nn.Module) -> dict:
    total = sum(_weights_in(p) for p in model.parameters())
    trainable = sum(_weights_in(p) for p in model.parameters() if p.requires_grad)
    counts = {"params_total": total, "params_trainable": trainable}
    four_bit = sum(_weights_in(p) for p in model.parameters() if getattr(p, "quant_state", None) is not None)
    if four_bit:  # QLoRA: how much of the base is held in 4 bits
        counts["params_4bit"] = four_bit
    return counts


def _weights_in(param: torch.Tensor) -> int:
    """Weights held by a parameter: a bitsandbytes 4-bit parameter packs several into each element."""
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else full_numel(param)  # ZeRO-3: ds_numel
