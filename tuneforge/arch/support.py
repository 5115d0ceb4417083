"""What the installed transformers can do with a config.json, decided before launch without importing it.

Importing transformers' model registry imports torch (1-2 s, and the dry run promises no torch), so
this module reads transformers' own source files instead (found with importlib.util.find_spec, which
imports nothing): the registry of model types (models/auto/auto_mappings.py), the causal-LM class of
each type (models/auto/modeling_auto.py), and class attributes of those classes in their modeling
files (`_supports_sdpa`, `_supports_flash_attn`), resolved through the base classes as Python would.
tests/test_families.py compares every answer with the imported classes, for every causal-LM type.

- `refusal(cfg, trust_remote_code)`: why AutoModelForCausalLM cannot train this checkpoint (not a
  causal LM: encoder-decoder, encoder-only, multimodal without a causal-LM class; or its code is not in
  transformers and trust_remote_code is off), or None.
- `attention(cfg, requested)`: the attention implementation a run gets ("auto": sdpa where the model
  class has an SDPA path, else eager) and a note, or a refusal of a requested one the class lacks.
- `packing_isolated(model_type)`: whether packed rows keep each example's attention to itself.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Tuple

from tuneforge.arch.families import language_config

ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2")
#: the class attribute saying a model class can run each implementation (PreTrainedModel's defaults: False)
ATTENTION_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}
#: Families whose attention mask ignores position_ids, so that a packed row's examples attend to each
#: other (transformers 5: OPT builds its mask from attention_mask alone, BLOOM's ALiBi mask too). Measured
#: for every family of arch/tiny.py by tests/test_families.py (packed logits vs each example alone).
PACKING_LEAKS = frozenset({"opt", "bloom"})


@dataclass(frozen=True)
class Registry:
    root: Optional[Path]  # transformers/ (None: not installed)
    version: str
    config_types: frozenset
    module_names: Dict[str, str]
    causal_lm: Dict[str, str]  # model_type -> class AutoModelForCausalLM builds


@lru_cache(maxsize=1)
def registry() -> Registry:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return Registry(None, "", frozenset(), {}, {})
    root = Path(list(spec.submodule_search_locations)[0])
    try:
        from importlib.metadata import version

        installed = version("transformers")
    except Exception:  # noqa: BLE001 (a source checkout without metadata)
        installed = "?"
    auto = root / "models" / "auto"
    mappings = _literal_mappings(
        auto / "auto_mappings.py", ("CONFIG_MAPPING_NAMES", "SPECIAL_MODEL_TYPE_TO_MODULE_NAME")
    )
    causal = _literal_mappings(auto / "modeling_auto.py", ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",))
    extra = _literal_mappings(auto / "configuration_auto.py", ())  # its .update({...}) calls, read below
    config_types = set(mappings.get("CONFIG_MAPPING_NAMES", {})) | set(extra) | {"gpt-sw3"}
    return Registry(
        root,
        installed,
        frozenset(config_types),
        mappings.get("SPECIAL_MODEL_TYPE_TO_MODULE_NAME", {}),
        causal.get("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", {}),
    )


def _literal_mappings(path: Path, names: Tuple[str, ...]) -> Dict[str, dict]:
    """`NAME = OrderedDict([...])` assignments of a source file, as dicts (names empty: the keys of its
    `X.update({...})` calls, merged into one dict)."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return {}
    out: Dict[str, dict] = {}
    for node in tree.body:
        if (
            names
            and isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in names
            and isinstance(node.value, ast.Call)
            and node.value.args
        ):
            try:
                out[node.targets[0].id] = dict(ast.literal_eval(node.value.args[0]))
            except ValueError:
                continue
        elif (
            not names
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "attr", "") == "update"
            and node.value.args
        ):
            try:
                out.update(ast.literal_eval(node.value.args[0]))
            except ValueError:
                continue
    return out


def module_name(model_type: str) -> str:
    """transformers' models/<module> of a model type (its model_type_to_module_name)."""
    return registry().module_names.get(model_type, model_type).replace("-", "_")


@lru_cache(maxsize=None)
def _classes(path: Path) -> Dict[str, Tuple[Tuple[str, ...], Dict[str, object]]]:
    """class name -> (base names, literal class attributes) of one modeling file."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return {}
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            attrs = {}
            for stmt in node.body:
                target = stmt.targets[0] if isinstance(stmt, ast.Assign) else getattr(stmt, "target", None)
                value = getattr(stmt, "value", None)
                if isinstance(target, ast.Name) and value is not None:
                    try:
                        attrs[target.id] = ast.literal_eval(value)
                    except ValueError:
                        continue
            out[node.name] = (
                tuple(b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases),
                attrs,
            )
    return out


@lru_cache(maxsize=None)
def _defining_file(class_name: str, model_type: str) -> Optional[Path]:
    root = registry().root
    if root is None:
        return None
    home = root / "models" / module_name(model_type)
    candidates = sorted(home.glob("modeling_*.py")) if home.is_dir() else []
    for path in candidates:
        if f"class {class_name}(" in path.read_text():
            return path
    pattern = re.compile(rf"^class {re.escape(class_name)}\(", re.M)  # aliases (exaone -> LlamaForCausalLM)
    for path in sorted((root / "models").glob("*/modeling_*.py")):
        if pattern.search(path.read_text()):
            return path
    return None


def class_attribute(model_type: str, attribute: str, default=False):
    """A class attribute of the causal-LM class of `model_type`, resolved through its bases (those
    defined in the same modeling file; PreTrainedModel's value `default` at the end). None when the
    class is not found."""
    class_name = registry().causal_lm.get(model_type)
    path = _defining_file(class_name, model_type) if class_name else None
    if path is None:
        return None
    classes = _classes(path)

    def lookup(name: str, depth: int = 0):
        if name not in classes or depth > 20:
            return None
        bases, attrs = classes[name]
        if attribute in attrs:
            return attrs[attribute]
        for base in bases:
            found = lookup(base, depth + 1)
            if found is not None:
                return found
        return None

    found = lookup(class_name)
    return default if found is None else found


# ------------------------------------------------------------------------------------------ refusal
def _source_says(model_type: str, kind: str, needle: str) -> bool:
    root = registry().root
    home = root / "models" / module_name(model_type) if root else None
    if home is None or not home.is_dir():
        return False
    return any(re.search(needle, p.read_text()) for p in home.glob(f"{kind}_*.py"))


def encoder_decoder(cfg: dict) -> bool:
    if "is_encoder_decoder" in cfg:
        return bool(cfg["is_encoder_decoder"])
    return _source_says(cfg.get("model_type", ""), "configuration", r"is_encoder_decoder(: bool)?\s*=\s*True")


def encoder_only(cfg: dict) -> bool:
    """A bidirectional encoder whose causal-LM class is its MLM body run as a decoder (BERT, RoBERTa, ...):
    transformers warns "If you want to use `XLMHeadModel` as a standalone, add `is_decoder=True`"."""
    return not cfg.get("is_decoder") and _source_says(cfg.get("model_type", ""), "modeling", r"as a standalone, add")


def remote_code(cfg: dict) -> Optional[str]:
    """The custom class config.json's auto_map names for AutoModelForCausalLM (or its config), if any."""
    auto_map = cfg.get("auto_map") or {}
    return auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoConfig") if isinstance(auto_map, dict) else None


def refusal(cfg: dict, trust_remote_code: bool = False) -> Optional[str]:
    """Why AutoModelForCausalLM cannot train the checkpoint of this config.json, or None."""
    reg = registry()
    model_type = cfg.get("model_type")
    custom = remote_code(cfg)
    if custom and model_type not in reg.config_types:
        if trust_remote_code:
            return None  # its own code decides; nothing here can check it
        return (
            f"its architecture is custom code shipped with the checkpoint (config.json auto_map: {custom}), "
            f"not part of transformers {reg.version}; set model.trust_remote_code=true if you trust that code"
        )
    if not model_type:
        return "config.json has no model_type: not a transformers model config"
    if model_type not in reg.config_types:
        return (
            f"model_type '{model_type}' is unknown to transformers {reg.version} and config.json names no "
            "custom code (auto_map); upgrade transformers or use a checkpoint of a supported architecture"
        )
    if encoder_decoder(cfg):
        return (
            f"'{model_type}' is an encoder-decoder model; tuneforge trains decoder-only causal LMs "
            "(AutoModelForCausalLM), which would drop its encoder"
        )
    if model_type not in reg.causal_lm:
        text = (cfg.get("text_config") or {}).get("model_type")
        hint = (
            f"; its language model ('{text}', text_config) is one: train a checkpoint of that alone"
            if text in reg.causal_lm
            else ""
        )
        return (
            f"'{model_type}' has no causal-LM class in transformers {reg.version} (AutoModelForCausalLM cannot "
            f"load it: encoder-only, multimodal or another task){hint}"
        )
    if encoder_only(cfg):
        return (
            f"'{model_type}' is a bidirectional encoder (its {reg.causal_lm[model_type]} is the masked-LM body run "
            "as a decoder, is_decoder=false in config.json); tuneforge trains pretrained causal LMs"
        )
    return None


# ------------------------------------------------------------------------------------------ attention
def attention(cfg: dict, requested: str) -> Tuple[Optional[str], str]:
    """(implementation, note): what `model.attn_implementation=requested` becomes for this model, and
    why; (None, reason) when the model class has no such path (the caller refuses the run)."""
    cfg = language_config(cfg)
    model_type = cfg.get("model_type", "")
    class_name = registry().causal_lm.get(model_type, model_type or "this model")
    flags = {impl: class_attribute(model_type, flag) for impl, flag in ATTENTION_FLAGS.items()}
    if flags["sdpa"] is None:  # class not found (custom code): transformers decides at load time
        return requested, ""
    version = registry().version
    if requested == "auto":
        if flags["sdpa"]:
            return "sdpa", ""
        return (
            "eager",
            f"model.attn_implementation=auto: eager ({class_name} has no SDPA path in transformers {version})",
        )
    flag = flags.get(requested)
    if flag is False:
        others = ", ".join(i for i in ("eager", "sdpa", "flash_attention_2") if i == "eager" or flags.get(i))
        return None, (
            f"{class_name} has no {requested} attention in transformers {version}; set "
            f"model.attn_implementation to one it has ({others}) or auto"
        )
    return requested, ""


def packing_isolated(model_type: str) -> bool:
    return model_type not in PACKING_LEAKS
