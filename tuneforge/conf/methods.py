"""One description per method: its schema, what peft builds for it, its adapter's size, what it refuses.

Read by validation (knob rules, method x backend compatibility), the preflight (adapter parameters for
the memory estimate, methods it may suggest), the README's matrix, and the trainers (the peft config
class and its arguments; trainers/methods.py holds no per-method branch but AdaLoRA's hooks).

A method option is a YAML file under conf/method/ whose schema is registered here. Adding a PEFT
method: its schema and `Method` entry here, and its YAML (two files).

Pure Python: peft is named here (`peft_class`), imported only by the trainers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from omegaconf import MISSING

from tuneforge.conf.backends import BackendConfig, backend
from tuneforge.conf.fields import knob

Check = Iterator[Tuple[str, str]]  # (key, problem)


# ---------------------------------------------------------------------------------------- schemas
@dataclass
class MethodConfig:
    """How the weights are trained."""

    name: str = MISSING  # "full" | "pretrain" | a PEFT method (conf/methods.py METHODS)


@dataclass
class FullConfig(MethodConfig):
    name: str = "full"  # update every weight of a loaded model


@dataclass
class PretrainConfig(MethodConfig):
    name: str = "pretrain"  # random init from the model's architecture; trains a tokenizer if none given
    tokenizer_min_frequency: int = knob(2, ge=1, le=10**9)  # BPE merges need a pair seen at least this often


# PEFT methods: peft trains a small adapter on a frozen base. Each has its own schema, so a knob of one
# method given to another is an unknown key.
@dataclass
class PeftMethodConfig(MethodConfig):
    # Module names (the last part, e.g. q_proj, or a dotted suffix) that get an adapter. None: every
    # linear layer of the decoder except the output head (IA3: peft's per-architecture default).
    target_modules: Optional[List[str]] = None


@dataclass
class LoraMethodConfig(PeftMethodConfig):
    name: str = "lora"  # low-rank update B @ A added to each target weight
    r: int = knob(8, ge=1, le=2**16)  # rank of the update
    alpha: float = knob(16.0, gt=0, le=1e6)  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = knob(0.05, ge=0, lt=1)  # dropout on the adapter's input
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)


@dataclass
class DoraMethodConfig(LoraMethodConfig):
    name: str = "dora"  # LoRA with the weight split into magnitude and direction (peft's use_dora)


QUANT_STORAGE = ("auto", "uint8", "fp32", "bf16", "fp16")


@dataclass
class QLoraMethodConfig(LoraMethodConfig):
    name: str = "qlora"  # LoRA on a base loaded in 4 bits (bitsandbytes); compute dtype = train.dtype
    quant_type: str = knob("nf4", choices=("nf4", "fp4"))
    double_quant: bool = True  # also quantise the quantisation constants (~0.4 bit per weight saved)
    # dtype holding the packed 4-bit weights: "auto" (the dtype the other parameters are loaded in, which
    # FSDP needs to shard them) | "uint8" | "fp32" | "bf16" | "fp16"
    quant_storage: str = knob("auto", choices=QUANT_STORAGE)


@dataclass
class AdaLoraMethodConfig(PeftMethodConfig):
    name: str = "adalora"  # LoRA whose ranks are reallocated between modules during training (SVD form)
    init_r: int = knob(12, ge=1, le=2**16)  # starting rank of every module
    target_r: int = knob(8, ge=1, le=2**16)  # average rank left at the end of the budget schedule
    alpha: float = knob(16.0, gt=0, le=1e6)  # scaling of the update (alpha / rank)
    dropout: float = knob(0.05, ge=0, lt=1)
    tinit: int = knob(0, ge=0, le=10**10)  # warmup steps before ranks start to be cut
    tfinal: int = knob(0, ge=0, le=10**10)  # final steps with the ranks fixed
    deltaT: int = knob(1, ge=1, le=10**10)  # steps between two rank allocations
    beta1: float = knob(0.85, gt=0, lt=1)  # EMA of the importance scores
    beta2: float = knob(0.85, gt=0, lt=1)  # EMA of their uncertainty
    orth_reg_weight: float = knob(
        0.5, ge=0, le=1e6
    )  # weight of the orthogonality penalty on A and B (logged as orth_loss)


@dataclass
class IA3MethodConfig(PeftMethodConfig):
    name: str = "ia3"  # learned per-channel scaling vectors
    # Those of target_modules inside the MLP: IA3 scales their input instead of their output.
    # None: peft's per-architecture default (set it whenever target_modules is set).
    feedforward_modules: Optional[List[str]] = None


@dataclass
class LohaMethodConfig(PeftMethodConfig):
    name: str = "loha"  # low-rank Hadamard product update
    r: int = knob(8, ge=1, le=2**16)
    alpha: float = knob(8.0, gt=0, le=1e6)  # the update is scaled by alpha / r
    rank_dropout: float = knob(0.0, ge=0, lt=1)  # dropout on each rank of the update
    module_dropout: float = knob(0.0, ge=0, lt=1)  # probability of skipping a module's update in a step


@dataclass
class LokrMethodConfig(LohaMethodConfig):
    name: str = "lokr"  # low-rank Kronecker product update
    factor: int = knob(-1, ge=-1, le=2**16)  # Kronecker factor size; -1: as square as possible
    decompose_both: bool = False  # low-rank decompose the left Kronecker factor too


# ---------------------------------------------------------------------------------------- adapter sizes
def _factor(n: int) -> Tuple[int, int]:
    """n = a x b with a <= b as close as possible (peft's lokr `factorization(n, -1)`)."""
    a = int(n**0.5)
    while n % a:
        a -= 1
    return a, n // a


def _lora(fan_in: int, fan_out: int, m, feedforward: bool) -> int:
    return m.r * (fan_in + fan_out)  # A: r x in, B: out x r


def _dora(fan_in: int, fan_out: int, m, feedforward: bool) -> int:
    return m.r * (fan_in + fan_out) + fan_out  # + the magnitude vector


def _adalora(fan_in: int, fan_out: int, m, feedforward: bool) -> int:
    return m.init_r * (fan_in + fan_out) + m.init_r  # A, B and the singular values E


def _loha(fan_in: int, fan_out: int, m, feedforward: bool) -> int:
    return 2 * m.r * (fan_in + fan_out)  # two Hadamard-multiplied low-rank pairs


def _lokr(fan_in: int, fan_out: int, m, feedforward: bool) -> int:
    (out_l, out_k), (in_m, in_n) = _factor(fan_out), _factor(fan_in)
    w2 = m.r * (out_k + in_n) if m.r < max(out_k, in_n) / 2 else out_k * in_n
    return out_l * in_m + w2  # w1 full, w2 low-rank unless the rank is large


def _ia3(fan_in: int, fan_out: int, m, feedforward: bool) -> int:
    return fan_in if feedforward else fan_out  # one scale per input (MLP) or output channel


# ---------------------------------------------------------------------------------------- peft arguments
def _lora_args(m, total_steps: int) -> Dict[str, Any]:
    return {
        "r": m.r,
        "lora_alpha": m.alpha,
        "lora_dropout": m.dropout,
        "use_rslora": m.rslora,
        "use_dora": m.name == "dora",
        "target_modules": _targets(m),
    }


def _adalora_args(m, total_steps: int) -> Dict[str, Any]:
    return {
        "init_r": m.init_r,
        "target_r": m.target_r,
        "lora_alpha": m.alpha,
        "lora_dropout": m.dropout,
        "tinit": m.tinit,
        "tfinal": m.tfinal,
        "deltaT": m.deltaT,
        "beta1": m.beta1,
        "beta2": m.beta2,
        "orth_reg_weight": m.orth_reg_weight,
        "total_step": total_steps,
        "target_modules": _targets(m),
    }


def _ia3_args(m, total_steps: int) -> Dict[str, Any]:
    ff = list(m.feedforward_modules) if m.feedforward_modules is not None else None
    return {
        "target_modules": list(m.target_modules) if m.target_modules is not None else None,
        "feedforward_modules": ff,
    }


def _loha_args(m, total_steps: int) -> Dict[str, Any]:
    return {
        "r": m.r,
        "alpha": m.alpha,
        "rank_dropout": m.rank_dropout,
        "module_dropout": m.module_dropout,
        "target_modules": _targets(m),
    }


def _lokr_args(m, total_steps: int) -> Dict[str, Any]:
    return {**_loha_args(m, total_steps), "decompose_factor": m.factor, "decompose_both": m.decompose_both}


def _targets(m) -> Any:
    return list(m.target_modules) if m.target_modules is not None else ALL_LINEAR


#: peft's name for "every linear layer but the output head": the default of every method but IA3
ALL_LINEAR = "all-linear"


# ---------------------------------------------------------------------------------------- cross-field checks
def _adalora_checks(m: AdaLoraMethodConfig, max_steps: int) -> Check:
    if m.target_r > m.init_r:
        yield "method.target_r", f"{m.target_r} exceeds method.init_r={m.init_r}: AdaLoRA only removes rank"
    if m.tinit >= max_steps - m.tfinal:
        yield (
            "method.tinit",
            (
                f"tinit={m.tinit} + tfinal={m.tfinal} leave no step of train.max_steps={max_steps} "
                "to reallocate ranks in; lower them or raise train.max_steps"
            ),
        )


def _lokr_checks(m: LokrMethodConfig, max_steps: int) -> Check:
    if not (m.factor == -1 or m.factor >= 1):
        yield "method.factor", f"must be -1 (automatic) or >= 1, got {m.factor}"


def _ia3_checks(m: IA3MethodConfig, max_steps: int) -> Check:
    if m.feedforward_modules is None:
        return
    if m.target_modules is None:
        yield (
            "method.feedforward_modules",
            "set method.target_modules too: feedforward_modules must be a subset of them",
        )
        return
    extra = [f for f in m.feedforward_modules if f not in m.target_modules]
    if extra:
        yield (
            "method.feedforward_modules",
            f"{', '.join(extra)} not in method.target_modules [{', '.join(m.target_modules)}]",
        )


# ---------------------------------------------------------------------------------------- descriptions
Adapter = Callable[[int, int, Any, bool], int]  # (fan_in, fan_out, method config, feedforward) -> params


@dataclass(frozen=True)
class Method:
    schema: type
    # PEFT only (None for methods that train every weight): the peft config class, its arguments from
    # (method config, total steps), and the adapter parameters on one linear layer (the preflight's count)
    peft_class: Optional[str] = None
    peft_args: Optional[Callable[[Any, int], Dict[str, Any]]] = None
    adapter_params: Optional[Adapter] = None
    quantized: bool = False  # the frozen base is loaded in 4 bits (bitsandbytes)
    # The kinds of weight peft's layers of this method adapt (tuneforge/arch/shape.py KINDS: linear,
    # conv1d, experts, router); target_modules unset adapts every weight of these kinds in the decoder
    # layers, or only those of `default_roles` (IA3: peft's own default, k/v/qkv and down), scaling those of
    # `feedforward_roles` on their input side. tuneforge/arch/adapters.py reads these per family.
    adapts: Tuple[str, ...] = ()
    default_roles: Optional[Tuple[str, ...]] = None
    feedforward_roles: Tuple[str, ...] = ()
    builds: bool = False  # random init from the architecture (no weights are read)
    checks: Optional[Callable[[Any, int], Check]] = None  # cross-field rules: (method config, train.max_steps)
    # backend family -> why the method cannot run on it (one line, with the way out)
    refuses: Dict[str, str] = field(default_factory=dict)

    @property
    def peft(self) -> bool:
        return self.peft_class is not None


_ADALORA_REFUSES = {
    "fsdp": (
        "peft's AdaLoRA rank allocator reads and masks whole lora_E/A/B tensors, which FSDP2 shards "
        "(DTensor .tolist() fails); use backend=ddp"
    ),
    "deepspeed": (
        "DeepSpeed keeps the adapter's gradients and fp32 master weights in its own buffers, so AdaLoRA's "
        "importance scores see no gradient and its rank masks are undone at the next step; use backend=ddp"
    ),
}

#: what peft 0.21's layers adapt: LoRA also a mixture of experts' stacked expert weights and routers, as
#: parameters (its ParamWrapper: target_parameters); DoRA, AdaLoRA and IA3 nn.Linear and GPT-2's Conv1D;
#: LoHa and LoKr nn.Linear only
_LORA_ADAPTS = ("linear", "conv1d", "experts", "router")
_MODULES = ("linear", "conv1d")

#: option name (conf/method/<name>.yaml) -> its description. QLoRA and DoRA train correctly under
#: ZeRO-3 with every parameter partitioned (tests/test_peft.py), because DeepSpeed wraps the model after
#: it is loaded; AdaLoRA fails on FSDP2 and DeepSpeed for the reasons above.
METHODS: Dict[str, Method] = {
    "full": Method(FullConfig),
    "pretrain": Method(PretrainConfig, builds=True),
    "lora": Method(LoraMethodConfig, "LoraConfig", _lora_args, _lora, adapts=_LORA_ADAPTS),
    "qlora": Method(QLoraMethodConfig, "LoraConfig", _lora_args, _lora, quantized=True, adapts=_LORA_ADAPTS),
    "adalora": Method(
        AdaLoraMethodConfig,
        "AdaLoraConfig",
        _adalora_args,
        _adalora,
        checks=_adalora_checks,
        refuses=_ADALORA_REFUSES,
        adapts=_MODULES,
    ),
    "ia3": Method(
        IA3MethodConfig,
        "IA3Config",
        _ia3_args,
        _ia3,
        checks=_ia3_checks,
        adapts=_MODULES,
        default_roles=("k", "v", "qkv", "down"),
        feedforward_roles=("down",),
    ),
    "loha": Method(LohaMethodConfig, "LoHaConfig", _loha_args, _loha, adapts=("linear",)),
    "lokr": Method(LokrMethodConfig, "LoKrConfig", _lokr_args, _lokr, checks=_lokr_checks, adapts=("linear",)),
    "dora": Method(DoraMethodConfig, "LoraConfig", _lora_args, _dora, adapts=_MODULES),
}
#: the PEFT methods, in the order of METHODS
PEFT_METHODS = tuple(name for name, m in METHODS.items() if m.peft)


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method.name: unknown method '{name}'; one of {', '.join(METHODS)}") from None


def is_peft(name: str) -> bool:
    return method(name).peft


def incompatibility(method_name: str, backend_cfg: BackendConfig) -> Optional[str]:
    """Why `method_name` cannot run on `backend_cfg` (one line with the way out), or None when it can:
    the one place that says so, read by validation, the preflight's suggestions and the README matrix."""
    return method(method_name).refuses.get(backend(backend_cfg).family)


#: TUNEFORGE_SHARDED_LOAD=0 in the submitting shell (the job inherits it): every rank loads the whole model
#: and the backend shards it afterwards, as before sharded loading (trainers/sharded/)
SHARDED_LOAD_ENV = "TUNEFORGE_SHARDED_LOAD"


def loads_sharded(method_name: str, backend_cfg: BackendConfig) -> bool:
    """Whether a run builds its model sharded from the start (trainers/sharded/: each rank reads and holds
    only its share): backends that shard parameters (FSDP2, ZeRO-3), for every method they run but the
    quantised one (bitsandbytes quantises while transformers loads: every rank keeps a 4-bit copy of the
    whole base). Read by the trainers, the preflight's host estimate and validation."""
    import os

    if os.environ.get(SHARDED_LOAD_ENV, "1") == "0" or method(method_name).quantized:
        return False
    if incompatibility(method_name, backend_cfg):
        return False
    return backend(backend_cfg).layout(backend_cfg).shard_params


def schema_names() -> Dict[str, type]:
    """ConfigStore name -> schema for conf/schema.py's register(): YAMLs say `defaults: [base_<name>]`."""
    return {f"base_{name}": m.schema for name, m in METHODS.items()}
