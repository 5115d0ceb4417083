"""Every shipped config composes and validates; the submit path stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.launch.compose import compose, group_options
from tuneforge.launch.validate import validate

CONF = Path(__file__).parents[1] / "tuneforge" / "conf"
DATA = Path(__file__).parents[1] / "tuneforge" / "data"
# Options that need a value no shipped file can know (a user's model path, a cluster partition).
NEEDS = {
    ("model", "hf"): ["model.name_or_path=org/some-model", "method=full"],
    ("model", "llama3_8b"): ["method=full"],
    ("model", "mistral_7b"): ["method=full"],
    ("model", "qwen2_5_7b"): ["method=full"],
    ("data", "alpaca_jsonl"): [f"data.path={DATA / 'demo_alpaca.jsonl'}"],
    ("data", "chat_jsonl"): [f"data.path={DATA / 'demo_instruct.jsonl'}"],
    ("data", "completion_jsonl"): [
        f"data.path={DATA / 'demo_alpaca.jsonl'}",
        "data.prompt_field=instruction",
        "data.completion_field=output",
    ],
    ("data", "text_files"): [f"data.path={DATA / 'demo_corpus.txt'}"],
    ("data", "hub"): ["data.hub_id=org/some-dataset"],
    ("experiment", "llama3_8b_lora_chat"): [f"data.path={DATA / 'demo_instruct.jsonl'}"],
    ("experiment", "continued_pretraining"): ["model.name_or_path=org/some-model"],
}
EXAMPLES = Path(__file__).parents[1] / "examples"
#: examples/site/<group>/<option>.yaml: site profiles, composed through the search path ($TUNEFORGE_CONFIG_PATH)
EXAMPLE_NEEDS = {("cluster", "mysite"): ["train.global_batch=64"]}


def shipped_options():
    """Every YAML under conf/ (recursively), as (group, option)."""
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group != ".":
            yield group, path.stem


@pytest.mark.parametrize("group,option", list(shipped_options()), ids=lambda v: str(v))
def test_every_shipped_config_composes_and_validates(group, option):
    # every method but pretraining starts from trained weights: give it a model to load
    needs = NEEDS.get((group, option), ["model=llama3_8b"] if group == "method" and option != "pretrain" else [])
    cfg = compose([f"{group}={option}", *needs])
    assert [str(p) for p in validate(cfg)] == []


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*.yaml")), ids=lambda p: p.as_posix()
)
def test_every_example_composes_and_validates(path, monkeypatch):
    """examples/site/: profiles on the config search path; examples/*.yaml: config files (--config)."""
    from tuneforge.launch.sources import Sources

    if path.parts[0] == "site":
        monkeypatch.setenv("TUNEFORGE_CONFIG_PATH", str(EXAMPLES / "site"))
        group, option = path.parts[1], path.stem
        cfg = compose([f"{group}={option}", *EXAMPLE_NEEDS.get((group, option), [])])
    else:
        cfg = compose([], Sources(file=EXAMPLES / path))
    assert [str(p) for p in validate(cfg)] == []


def test_every_group_is_walked():
    groups = {g for g, _ in shipped_options()}
    assert {"model", "method", "backend", "cluster", "data", "logger", "experiment"} <= groups
    assert set(group_options("model")) >= {"tiny", "hf", "llama3_8b", "mistral_7b", "qwen2_5_7b"}


def test_default_run_is_tiny_pretrain_on_bundled_corpus_locally():
    cfg = compose([])
    assert (cfg.model.kind, cfg.method.name, cfg.data.name, cfg.cluster.name) == (
        "tiny",
        "pretrain",
        "demo_corpus",
        "local",
    )


def test_dry_run_does_not_import_torch():
    code = (
        "import sys\n"
        "from tuneforge.launch.cli import main\n"
        "assert main(['--dry-run', 'cluster=slurm', 'cluster.nodes=2', 'cluster.check_site=false']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'deepspeed', 'wandb') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --nodes=2" in out.stdout
