"""What trains: `apply_method` marks (full, pretrain) or adds (PEFT) the trainable weights, and returns
the method's hooks into the loop.

PEFT methods wrap the model with peft (no adapter math here): method config -> peft config class.
Methods differ from plain training in a few places only, each a `MethodHooks` call made by the loop
whatever the method and backend:
- `extra_losses(model)`: terms added to the objective once per optimizer step (AdaLoRA's orthogonality
  penalty), logged under their own names, apart from the language-model `loss`;
- `before_step(model)` / `after_step(model, step)`: around the backend's optimizer step (AdaLoRA's rank
  allocation, which peft wants after `optimizer.step()` and before the gradients are cleared);
- `save(engine, directory, is_main)` / `load(model, directory)`: at every checkpoint, the adapter in
  PEFT format (from the backend's consolidated state, so never empty under sharding) and the method's
  own state (AdaLoRA's rank allocator), restored on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from tuneforge.arch import adapters
from tuneforge.conf import methods
from tuneforge.conf.methods import AdaLoraMethodConfig, MethodConfig
from tuneforge.layout import ADAPTER


class MethodHooks:
    """The loop's calls into a method; the defaults do nothing (full finetuning, pretraining)."""

    def extra_losses(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        return {}

    def before_step(self, model: torch.nn.Module) -> None:
        pass

    def after_step(self, model: torch.nn.Module, step: int) -> Dict[str, float]:
        return {}

    def save(self, engine, directory: Path, is_main: bool) -> None:
        pass

    def load(self, model: torch.nn.Module, directory: Path) -> None:
        pass


def apply_method(
    model: torch.nn.Module, method_cfg: MethodConfig, total_steps: int, seed: int
) -> Tuple[torch.nn.Module, MethodHooks]:
    """Full finetuning and pretraining train every weight; PEFT methods wrap the model with peft.

    The adapter is initialised from `seed` so that every rank starts from the same weights whatever
    the backend (FSDP does not broadcast rank 0's weights)."""
    if not methods.is_peft(method_cfg.name):
        model.requires_grad_(True)
        return model, MethodHooks()
    from peft import get_peft_model

    check_target_modules(model, method_cfg)
    targets = family_targets(model, method_cfg)
    local_base = Path(str(model.__dict__.get("name_or_path") or ""))
    if str(local_base) not in ("", ".") and local_base.is_dir():
        # The adapter records its base model: an absolute path loads from any directory (tuneforge export).
        model.name_or_path = str(local_base.resolve())
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, peft_config(method_cfg, total_steps, targets))
    from tuneforge.trainers.adapters import speed_up

    speed_up(peft_model)  # the LoRA family's cheaper dropout and bf16 adapter compute: the same maths
    hooks = AdaLoraHooks(method_cfg.orth_reg_weight) if isinstance(method_cfg, AdaLoraMethodConfig) else AdapterHooks()
    return peft_model, hooks


def peft_config(method_cfg: MethodConfig, total_steps: int, targets: Optional[adapters.Targets] = None):
    """The peft config of a PEFT method: its class and arguments come from conf/methods.py; `targets`
    (family_targets) replace its target names by the family's own weights, the ones the preflight counted."""
    import peft

    spec = methods.method(method_cfg.name)
    if not spec.peft:
        raise ValueError(f"method.name: '{method_cfg.name}' is not a PEFT method")
    args = spec.peft_args(method_cfg, total_steps)
    if targets is not None:
        args["target_modules"] = list(targets.modules)
        if targets.parameters:  # stacked experts and routers: peft's LoRA ParamWrapper
            args["target_parameters"] = list(targets.parameters)
        if "feedforward_modules" in args:
            args["feedforward_modules"] = list(targets.feedforward)
    return getattr(peft, spec.peft_class)(task_type="CAUSAL_LM", **args)


def family_targets(model: torch.nn.Module, method_cfg: MethodConfig) -> adapters.Targets:
    """The weights the method adapts in this model's family (tuneforge/arch/adapters.py, what the preflight
    counted); raises ValueError naming the key for what peft cannot do here (a hub id is first seen here)."""
    from tuneforge.arch.meta import shape_of

    shape, spec = shape_of(model), methods.method(method_cfg.name)
    chosen = adapters.targets(shape, spec, method_cfg)
    for key, message in adapters.problems(shape, spec, method_cfg, chosen):
        raise ValueError(f"{key}: {message}")
    return chosen


def check_target_modules(model: torch.nn.Module, method_cfg: MethodConfig) -> None:
    """Fail with the model's own layer names when a requested target matches no module. Validation
    checks this before launch for known architectures; this catches the others at job start."""
    names = [n for n, _ in model.named_modules() if n]
    requested = list(method_cfg.target_modules or []) + list(getattr(method_cfg, "feedforward_modules", None) or [])
    unknown = [t for t in requested if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        leaves = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"
            }
        )
        raise ValueError(
            f"method.target_modules: {', '.join(map(repr, unknown))} matches no module of this "
            f"{model.config.model_type} model; its linear layers are {', '.join(leaves)}"
        )


class AdapterHooks(MethodHooks):
    """PEFT methods: the adapter (adapter_config.json + adapter_model.safetensors) in every checkpoint."""

    def save(self, engine, directory: Path, is_main: bool) -> None:
        save_adapter(engine, Path(directory) / ADAPTER, is_main)


def save_adapter(engine, out_dir: Path, is_main: bool) -> None:
    """Collective. The adapter of `engine.module` (a PeftModel) from the backend's consolidated state
    dict, written by rank 0: under ZeRO-3 or FSDP the live parameters are shards (or empty), so peft's
    own `save_pretrained()` without a state dict would write an empty or partial adapter. A base loaded
    sharded (trainers/sharded/) is never gathered: only the trainable tensors are, one at a time."""
    from tuneforge.trainers.sharded import glue as sharded

    if sharded.exports_sharded(engine):
        from tuneforge.trainers.sharded.export import gather_state_dict, trainable

        state_dict = gather_state_dict(engine.module, trainable, is_main)
    else:
        state_dict = engine.full_state_dict()
    if is_main:
        engine.module.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)


class AdaLoraHooks(AdapterHooks):
    """AdaLoRA: the orthogonality penalty, and peft's rank allocation after every optimizer step.

    peft adds the penalty inside `AdaLoraModel.forward` only when labels are passed, which the loop does
    not do (it computes the token loss itself): it is computed here the same way and returned as an
    extra loss. `update_and_allocate(step)` needs each adapter weight's gradient after the optimizer
    step, but backends clear gradients inside their step: `before_step` keeps references to them (after
    clipping, which works in place) and `after_step` puts them back for the allocation, then drops them.
    `step` is the number of optimizer steps done, so the budget reaches target_r at train.max_steps.
    """

    def __init__(self, orth_reg_weight: float):
        self.orth_reg_weight = orth_reg_weight
        self._grads: Dict[str, torch.Tensor] = {}

    def extra_losses(self, model) -> Dict[str, torch.Tensor]:
        if self.orth_reg_weight == 0:
            return {}
        adapter = model.base_model.trainable_adapter_name
        terms = []
        for name, p in model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and adapter in name:
                cov = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.size(0), dtype=cov.dtype, device=cov.device)))
        if not terms:
            return {}
        return {"orth_loss": self.orth_reg_weight * torch.stack(terms).mean()}

    def before_step(self, model) -> None:
        self._grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
        missing = [n for n, g in self._grads.items() if g is None]
        if missing:
            raise RuntimeError(
                f"AdaLoRA needs the gradient of every adapter weight after backward; {missing[0]} "
                "has none on this backend (its gradients live in the backend's own buffers)"
            )

    def after_step(self, model, step: int) -> Dict[str, float]:
        params = dict(model.named_parameters())
        for name, grad in self._grads.items():
            params[name].grad = grad
        try:
            model.base_model.update_and_allocate(step)
        finally:
            for name in self._grads:
                params[name].grad = None
            self._grads = {}
        return {"adalora_rank": float(allocated_rank(model))}

    def save(self, engine, directory: Path, is_main: bool) -> None:
        if is_main:  # every rank holds the same allocator state: it sees the same reduced gradients
            torch.save(allocator_state(engine.module), Path(directory) / "adalora_state.pt")
        super().save(engine, directory, is_main)

    def load(self, model, directory: Path) -> None:
        load_allocator_state(
            model, torch.load(Path(directory) / "adalora_state.pt", map_location="cpu", weights_only=False)
        )


def allocated_rank(model) -> int:
    """The total rank currently allocated over all adapted modules (init_r x modules until the first cut)."""
    config = model.peft_config[model.base_model.trainable_adapter_name]
    if config.rank_pattern:
        return int(sum(sum(bool(x) for x in mask) for mask in config.rank_pattern.values()))
    return sum(p.shape[0] for n, p in model.named_parameters() if "lora_E" in n)


def allocator_state(model) -> dict:
    """What `update_and_allocate` keeps between steps: peft's RankAllocator scores and the rank pattern."""
    allocator = model.base_model.rankallocator
    config = model.peft_config[model.base_model.trainable_adapter_name]
    return {
        "ipt": allocator.ipt,
        "exp_avg_ipt": allocator.exp_avg_ipt,
        "exp_avg_unc": allocator.exp_avg_unc,
        "rank_pattern": config.rank_pattern,
    }


def load_allocator_state(model, state: dict) -> None:
    allocator = model.base_model.rankallocator
    device = next(model.parameters()).device
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(allocator, key, {n: t.to(device) for n, t in state[key].items()})
    model.peft_config[model.base_model.trainable_adapter_name].rank_pattern = state["rank_pattern"]
