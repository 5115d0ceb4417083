"""The package's walls: which part may import which (every import, at module level or inside a function).

conf/      the schemas and the descriptions of methods, backends and GPUs: imports no other part
arch/, units, fsutil, layout, safetensors_files, compat/: leaves, importing no other part (a leaf package only itself)
data/      the data pipeline, one home: conf and the leaves
trainers/  what every rank runs: conf, data and the leaves; knows nothing of Slurm or the CLI
slurm/     submitit around the task: conf and the leaves, and trainers only through trainers/task.py
launch/    compose, validate, preflight, submit: conf, slurm, data's light modules and the leaves
commands/  after submission (status, logs, cancel, sync, export): launch, slurm, conf, trainers
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

PACKAGE = Path(__file__).resolve().parents[1] / "tuneforge"
LEAVES = {"arch", "units", "fsutil", "layout", "compat", "safetensors_files"}
ALLOWED: Dict[str, Set[str]] = {
    "conf": {"conf"},
    "arch": {"arch"},
    "units": set(),
    "fsutil": set(),
    "layout": set(),
    "safetensors_files": set(),
    "compat": {"compat"},
    "data": {"data", "conf"} | LEAVES,
    "trainers": {"trainers", "conf", "data"} | LEAVES,
    "slurm": {"slurm", "conf", "trainers.task"} | LEAVES,
    "launch": {"launch", "conf", "slurm", "data", "commands"} | LEAVES,
    "commands": {"commands", "launch", "slurm", "conf", "trainers"} | LEAVES,
}
#: launch/ may dispatch to commands/ (the CLI entry) and read data's row checks, nothing heavier
LAUNCH_DATA = {"data", "data.records", "data.prompts"}


def imports_of(path: Path) -> Set[str]:
    """Every tuneforge module `path` imports, as a dotted name below tuneforge ("conf.schema")."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name[len("tuneforge.") :] for name in names if name.startswith("tuneforge.")}
    return found


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_import_directions():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        if part == "__init__":
            continue
        for name in imports_of(path):
            target = name.split(".")[0]
            allowed = ALLOWED[part]
            ok = target in allowed or name in allowed or any(name.startswith(a + ".") for a in allowed if "." in a)
            if part == "slurm" and target == "trainers":
                ok = name == "trainers.task" or name.startswith("trainers.task.")
            if part == "launch" and target == "data":
                ok = name in LAUNCH_DATA or name.startswith("data.records.")
            if not ok:
                wrong.append(f"{path.relative_to(PACKAGE)} imports tuneforge.{name}")
    assert not wrong, "\n".join(wrong)


def test_the_submit_path_imports_no_torch():
    """Composing, validating, the preflight and the sbatch script: no torch, no transformers."""
    code = (
        "import sys; from tuneforge.launch.cli import main; "
        "rc = main(['--dry-run', 'cluster=slurm', 'cluster.check_site=false', 'model=llama3_8b', 'method=lora', "
        "'backend=zero3']); "
        "print('RESULT', rc, sorted(m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split("RESULT")[-1].split(None, 1) == ["0", "[]\n"], out.stderr[-2000:]
