"""The PEFT method x backend matrix, rendered from the validation rules (not typed by hand).

For each method and each shipped backend option, compose the config and run `validate`: a combination
is refused when validation says so (the reason is its message), and otherwise runs; every allowed
combination is trained by tests/test_peft.py::test_matrix (2 CPU ranks: loss falls, adapter saved,
reloaded adapter gives the same logits).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from tuneforge.conf.schema import PEFT_METHODS

#: a preset whose architecture validation knows, so that only method x backend rules can object
MODEL_ARGS = ("model=llama3_8b",)


def refusals(
    methods: Sequence[str] = PEFT_METHODS, backends: Optional[Sequence[str]] = None
) -> Dict[Tuple[str, str], Optional[str]]:
    """{(method, backend): the refusal reason, or None when validation accepts the pair}."""
    from tuneforge.launch.compose import compose, group_options
    from tuneforge.launch.validate import validate

    out: Dict[Tuple[str, str], Optional[str]] = {}
    for backend in backends or group_options("backend"):
        for method in methods:
            cfg = compose([*MODEL_ARGS, f"method={method}", f"backend={backend}", "logger=none"])
            prefix = f"method={method} cannot run on backend={cfg.backend.name}: "
            reasons = [p.message[len(prefix) :] for p in validate(cfg) if p.message.startswith(prefix)]
            out[(method, backend)] = reasons[0] if reasons else None
    return out


def render(matrix: Dict[Tuple[str, str], Optional[str]]) -> str:
    """A markdown table (methods x backends) plus the numbered reasons of the refused cells."""
    methods = list(dict.fromkeys(m for m, _ in matrix))
    backends = list(dict.fromkeys(b for _, b in matrix))
    notes: List[str] = []
    lines = ["| method | " + " | ".join(backends) + " |", "|---" * (len(backends) + 1) + "|"]
    for method in methods:
        cells = []
        for backend in backends:
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
