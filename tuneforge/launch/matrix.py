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
