"""Schema fields that carry their own allowed values, and the one check that reads them.

A schema field says what it accepts where it is declared: ``lr: float = knob(1e-3, gt=0)``. Validation
(launch/validate.py) walks the composed config once with `field_problems`, so every number in every
group is checked finite and in its range, and every choice against its options, by the same code;
the rules in validate.py are left with what spans several fields.

Standard library only: the submit path stays light.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterator, Optional, Sequence, Tuple

_NO_DEFAULT: Any = dataclasses.MISSING


def knob(
    default: Any = _NO_DEFAULT,
    *,
    factory: Any = None,
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    lt: Optional[float] = None,
    choices: Optional[Sequence[Any]] = None,
    size: bool = False,
) -> Any:
    """A dataclass field with its bounds (ge >=, gt >, le <=, lt <) or its `choices`; `size`: a byte size
    as save_pretrained's max_shard_size spells it ("5GB", "500MB"). None values (an unset optional field)
    are always allowed; set the field's type to Optional for those."""
    metadata = {
        key: value
        for key, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("choices", choices))
        if value is not None
    }
    if size:
        metadata["size"] = True
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_problems(node: Any, prefix: str = "") -> Iterator[Tuple[str, str]]:
    """(dotted key, problem) for every value of a dataclass tree outside its declared range or
    choices, and every float that is not finite."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from field_problems(value, key + ".")
            continue
        if isinstance(value, (list, tuple)):  # a list of schemas (data.sources): each element by its index
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from field_problems(item, f"{key}[{i}].")
            continue
        problem = _problem(value, f.metadata)
        if problem:
            yield key, problem


def _problem(value: Any, rules: dict) -> Optional[str]:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if rules.get("size") and not valid_size(value):
        return f"'{value}' is not a size like 5GB, 500MB or 200KB (a number and one of KB, MB, GB, TB)"
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        return f"'{value}' is not one of {', '.join(map(str, choices))}"
    if not isinstance(value, (int, float)):
        return None
    lo = ("ge", rules["ge"]) if "ge" in rules else ("gt", rules["gt"]) if "gt" in rules else None
    hi = ("le", rules["le"]) if "le" in rules else ("lt", rules["lt"]) if "lt" in rules else None
    below = lo is not None and (value < lo[1] if lo[0] == "ge" else value <= lo[1])
    above = hi is not None and (value > hi[1] if hi[0] == "le" else value >= hi[1])
    if not (below or above):
        return None
    return f"must be {describe(rules)}, got {value}"


SIZE = re.compile(r"^\s*(\d+(\.\d*)?|\.\d+)\s*[KMGT]B\s*$", re.IGNORECASE)


def valid_size(value: Any) -> bool:
    """A positive size in huggingface_hub's spelling (KB, MB, GB, TB: powers of 1000)."""
    return isinstance(value, str) and bool(SIZE.match(value)) and float(value.strip()[:-2]) > 0


def describe(rules: dict) -> str:
    """The allowed range in words: '>= 1', '> 0', 'in [0, 1)'."""
    lo = f"[{rules['ge']}" if "ge" in rules else f"({rules['gt']}" if "gt" in rules else None
    hi = f"{rules['le']}]" if "le" in rules else f"{rules['lt']})" if "lt" in rules else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return f">= {rules['ge']}" if "ge" in rules else f"> {rules['gt']}"
    if hi:
        return f"<= {rules['le']}" if "le" in rules else f"< {rules['lt']}"
    return "valid"


def rules_of(schema: type, name: str) -> dict:
    """The declared bounds and choices of field `name` of a dataclass schema."""
    return dict(next(f.metadata for f in dataclasses.fields(schema) if f.name == name))
