"""The PEFT method x backend matrix of the README, rendered from the one compatibility rule.

Each cell asks `conf.methods.incompatibility(method, backend option)`, the function validation and the
preflight's suggestions ask too; every allowed combination is trained by
tests/test_peft.py::test_matrix (2 CPU ranks: loss falls, adapter saved, reloaded adapter gives the
same logits).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from tuneforge.conf import backends, methods


def refusals(
    method_names: Sequence[str] = methods.PEFT_METHODS, backend_names: Optional[Sequence[str]] = None
) -> Dict[Tuple[str, str], Optional[str]]:
    """{(method, backend option): the refusal reason, or None when the pair runs}."""
    from tuneforge.launch.compose import group_option

    out: Dict[Tuple[str, str], Optional[str]] = {}
    for backend in backend_names or list(backends.BACKENDS):
        option = group_option("backend", backend)
        for method in method_names:
            out[(method, backend)] = methods.incompatibility(method, option)
    return out


def render(matrix: Dict[Tuple[str, str], Optional[str]]) -> str:
    """A markdown table (methods x backends) plus the numbered reasons of the refused cells."""
    method_names = list(dict.fromkeys(m for m, _ in matrix))
    backend_names = list(dict.fromkeys(b for _, b in matrix))
    notes: List[str] = []
    lines = ["| method | " + " | ".join(backend_names) + " |", "|---" * (len(backend_names) + 1) + "|"]
    for method in method_names:
        cells = []
        for backend in backend_names:
            reason = matrix[(method, backend)]
            if reason is None:
                cells.append("tested")
            else:
                if reason not in notes:
                    notes.append(reason)
                cells.append(f"refused ({notes.index(reason) + 1})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "tested: tests/test_peft.py::test_matrix trains it on 2 CPU ranks (loss falls, adapter saved, "
        "reloaded adapter gives the same logits). refused: `tuneforge` stops before submission with:"
    )
    lines.append("")
    lines.extend(f"{i}. {note}" for i, note in enumerate(notes, 1))
    return "\n".join(lines) + "\n"


def render_matrix() -> str:
    return render(refusals())


# ------------------------------------------------------------------------------------ model families
def family_cells(families: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """{family: what the README's table says of it}: its attention under model.attn_implementation=auto,
    the overrides validation asks of it, and for full and LoRA on each backend of tiny.BACKENDS "tested"
    (a case of tiny.MATRIX, trained by tests/test_families.py::test_family_trains), "allowed" (validation
    accepts it, not trained by the tests) or the first problem validation finds; and the PEFT methods
    beyond LoRA that peft cannot apply to the family's default targets."""
    import json
    import tempfile
    from pathlib import Path

    from tuneforge.arch import adapters, shape_from_config, support, tiny
    from tuneforge.launch.compose import compose
    from tuneforge.launch.validate import NO_WEIGHTS, validate

    tested = set(tiny.MATRIX)
    columns = [(m, b) for b in tiny.BACKENDS for m in tiny.METHODS]
    out: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # composed once per column, then pointed at each family (composing costs ~0.3 s)
        composed = {
            (m, b): compose(["model=hf", f"model.name_or_path={tmp}", f"method={m}", f"backend={b}"])
            for m, b in columns
        }
        for family in families or list(tiny.FAMILIES):
            model_dir = Path(tmp) / family
            model_dir.mkdir()
            config = tiny.config(family).to_dict()
            (model_dir / "config.json").write_text(json.dumps(config))
            shape = shape_from_config(config)
            needs, cells = [], {}
            for method, backend in columns:
                extra = tiny.required_overrides(family, method)
                needs += [f"{e} ({method})" if e.startswith("method.") else e for e in extra if e not in needs]
                cfg = _override(composed[(method, backend)], [f"model.name_or_path={model_dir}", *extra])
                # the family's cells: not the cluster's, nor the folder's (it holds a config.json only)
                problems = [p for p in validate(cfg) if p.key.split(".")[0] not in ("backend", "cluster")]
                problems = [p for p in problems if not (p.key == "model.name_or_path" and NO_WEIGHTS in p.message)]
                cells[(method, backend)] = (
                    f"refused: {problems[0]}"
                    if problems
                    else "tested"
                    if (family, method, backend) in tested
                    else "allowed"
                )
            refused, partial = [], []
            for name in PEFT_METHODS_BEYOND_LORA:
                spec = methods.method(name)
                method_cfg = spec.schema()
                chosen = adapters.targets(shape, spec, method_cfg)
                if [p for p in adapters.problems(shape, spec, method_cfg, chosen) if p[0] != "method.dropout"]:
                    refused.append(name)
                elif chosen.skipped:
                    partial.append(name)
            other = ([f"refused: {', '.join(refused)} (no peft layer for its weights)"] if refused else []) + (
                [f"{', '.join(partial)}: not on the stacked experts"] if partial else []
            )
            out[family] = {
                "model_type": config["model_type"],
                "moe": (shape.experts, shape.experts_per_token) if shape.is_moe else None,
                "attention": support.attention(config, "auto")[0],
                "needs": sorted(set(needs)),
                "cells": cells,
                "other": "; ".join(other) or "all",
            }
    return out


def _override(cfg, overrides: Sequence[str]):
    """`cfg` with "group.key=value" overrides of plain fields applied (values read as YAML)."""
    import dataclasses

    import yaml

    for item in overrides:
        key, value = item.split("=", 1)
        group, field = key.split(".")
        node = dataclasses.replace(getattr(cfg, group), **{field: yaml.safe_load(value)})
        cfg = dataclasses.replace(cfg, **{group: node})
    return cfg


#: the methods the family table sums up in one column (LoRA has a column per backend)
PEFT_METHODS_BEYOND_LORA = tuple(m for m in methods.PEFT_METHODS if m not in ("lora", "qlora"))


def render_families(cells: Optional[Dict[str, dict]] = None) -> str:
    """The README's table of model families (scripts/render-families.py)."""
    from tuneforge.arch import tiny

    cells = cells or family_cells()
    columns = [(m, b) for b in tiny.BACKENDS for m in tiny.METHODS]
    lines = [
        "| family | model_type | attention (auto) | needs | "
        + " | ".join(f"{m} {b}" for m, b in columns)
        + " | other PEFT methods |",
        "|---" * (len(columns) + 5) + "|",
    ]
    for family, row in cells.items():
        name = family + (f" (MoE {row['moe'][0]}x, top-{row['moe'][1]})" if row["moe"] else "")
        lines.append(
            f"| {name} | `{row['model_type']}` | {row['attention']} | {', '.join(row['needs']) or '-'} | "
            + " | ".join(row["cells"][c] for c in columns)
            + f" | {row['other']} |"
        )
    return "\n".join(lines) + "\n"
