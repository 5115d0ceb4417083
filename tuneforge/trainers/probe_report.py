"""The probe's report: <probe dir>/probe.json, the ranked table and the one-line recommendation.

`tuneforge probe` writes probe.json when it submits (every candidate: its label, run dir, catalog
facts and the preflight of the training planned for it); each candidate's job writes its scores to
<its run dir>/probe_result.json (trainers/probe.py) and then calls `update`, so probe.json holds the
ranking of what is scored so far whichever element finishes last (a lock keeps two from racing).
`render` is the table `tuneforge probe` prints, and `tuneforge probe <probe dir>` prints again.

Pure Python: the CLI reads it without torch.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import List, Optional

from tuneforge import fsutil, units

PROBE = "probe.json"  # in the probe dir
RESULT = "probe_result.json"  # in each candidate's run dir
PROGRESS = "probe_progress.json"  # in each candidate's run dir, while it is interrupted


def is_probe_dir(path: Path) -> bool:
    return (Path(path) / PROBE).is_file()


def read(probe_dir: Path) -> dict:
    return json.loads((Path(probe_dir) / PROBE).read_text())


@contextlib.contextmanager
def _locked(probe_dir: Path):
    import fcntl

    with open(Path(probe_dir) / ".probe.lock", "w") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def update(probe_dir: Path) -> Optional[dict]:
    """Read every candidate's result into probe.json, rank them and write the recommendation."""
    probe_dir = Path(probe_dir)
    if not is_probe_dir(probe_dir):
        return None
    with _locked(probe_dir):
        record = read(probe_dir)
        for candidate in record["candidates"]:
            path = Path(candidate["run_dir"]) / RESULT
            candidate["result"] = json.loads(path.read_text()) if path.is_file() else candidate.get("result")
        record["ranking"] = ranking(record)
        record["recommendation"] = recommendation(record)
        fsutil.write_json(probe_dir / PROBE, record)
    return record


def _bpb(candidate: dict, which: str = "domain") -> Optional[float]:
    result = candidate.get("result") or {}
    return (result.get(which) or {}).get("bits_per_byte")


def ranking(record: dict) -> List[int]:
    """Candidate indices, lowest bits per byte on the user's data first; unscored ones last."""
    cands = record["candidates"]
    scored = sorted((i for i, c in enumerate(cands) if _bpb(c) is not None), key=lambda i: (_bpb(cands[i]), i))
    return scored + [i for i, c in enumerate(cands) if _bpb(c) is None]


def recommendation(record: dict) -> str:
    """One line: which candidate to start from, and whether to continue pretraining it first."""
    cands = record["candidates"]
    scored = [cands[i] for i in record["ranking"] if _bpb(cands[i]) is not None]
    if not scored:
        return "no candidate scored yet"
    fitting = [c for c in scored if (c.get("preflight") or {}).get("fits") is not False]
    best = (fitting or scored)[0]
    line = f"recommendation: {best['label']}: the lowest bits per byte on your data ({_bpb(best):.3f}"
    others = [c for c in (fitting or scored) if c is not best]
    line += f"; next {others[0]['label']} {_bpb(others[0]):.3f})" if others else ")"
    if best is not scored[0]:
        line += f" of those that fit ({scored[0]['label']} scores {_bpb(scored[0]):.3f} but does not)"
    plan, pre = record.get("planned", {}), best.get("preflight") or {}
    if pre.get("fits") is False:
        line += f"; the planned {plan.get('method')} fits no candidate: `--dry-run` of it lists changes that fit"
    elif pre.get("available"):
        hours = pre.get("gpu_hours")
        line += f"; the planned {plan.get('method')}: {pre.get('total_gib')} GiB per GPU" + (
            f", {hours:.2f} GPU-hours" if hours is not None else ""
        )
    gap, threshold = best["result"]["gap"], record.get("large_gap", 0.3)
    if gap > threshold:
        line += (
            f"; its gap to general text is {gap:+.3f} bits/byte, large: your domain is far from what it was "
            "trained on, continue pretraining it on your domain text first (method=full on a text corpus), then finetune"
        )
    else:
        method = plan.get("method") if plan.get("method") not in (None, "pretrain") else "lora"
        line += f"; gap to general text {gap:+.3f} bits/byte, small: finetune it directly (method={method})"
    return line


# ------------------------------------------------------------------------------------------ output
COLUMNS = (
    "rank",
    "candidate",
    "bits/byte",
    "general",
    "gap",
    "tok/word",
    "params",
    "context",
    "licence",
    "fits",
    "GPU-h",
)


def _num(value, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def rows(record: dict) -> List[tuple]:
    out = []
    for place, i in enumerate(record.get("ranking") or range(len(record["candidates"])), 1):
        c = record["candidates"][i]
        result, cat, pre = c.get("result") or {}, c.get("catalog") or {}, c.get("preflight") or {}
        params = result.get("params") or (cat.get("params_b") and cat["params_b"] * 1e9)
        context = result.get("context") or cat.get("context")
        if not pre.get("available"):
            fits = "no estimate"
        elif pre.get("fits") is None:
            fits = f"{pre.get('total_gib')} GiB"
        else:
            fits = f"{'yes' if pre['fits'] else 'NO'} {pre.get('total_gib')}/{pre.get('gpu_memory_gib')}"
        scored = _bpb(c) is not None
        out.append(
            (
                str(place) if scored else "-",
                c["label"],
                _num(_bpb(c)) if scored else (c.get("error") or "not scored yet"),
                _num(_bpb(c, "general")),
                _num(result.get("gap"), "+.3f"),
                _num((result.get("domain") or {}).get("tokens_per_word"), ".2f"),
                units.count(params) if params else "?",
                str(context or "?"),
                cat.get("licence", "-"),
                fits,
                _num(pre.get("gpu_hours"), ".2f"),
            )
        )
    return out


def render(record: dict) -> str:
    lines = rows(record)
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    plan = record.get("planned") or {}
    head = (
        f"# probe of {len(record['candidates'])} candidate(s) on {record.get('data', '?')} "
        f"({record.get('examples', '?')} rows) and on general text ({record.get('general', '?')}); "
        f"fits and GPU-h: {plan.get('text', 'the planned training')}"
    )
    table = "\n".join(fmt.format(*row).rstrip() for row in [COLUMNS, *lines])
    return f"{head}\n{table}\n{record.get('recommendation') or recommendation(record)}"
