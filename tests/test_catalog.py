"""The model catalog: presets and conf/catalog.yaml in step, estimates offline, `tuneforge models`."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import tuneforge

from tuneforge.conf import catalog
from tuneforge.launch import preflight
from tuneforge.launch.compose import compose, group_option, group_options

HUB_PRESETS = [name for name in group_options("model") if name not in ("tiny", "hf")]


def test_every_hub_preset_has_a_catalog_entry_and_back():
    entries = catalog.entries()
    assert sorted(entries) == sorted(HUB_PRESETS)
    assert len(entries) >= 30
    for name, entry in entries.items():
        model = group_option("model", name)
        assert model.kind == "hf" and model.name_or_path and model.model_type and model.params_b, name
        assert set(entry.domains) <= set(catalog.DOMAINS), name
        assert entry.kind in ("base", "instruct") and len(entry.released) == 7, name
    ladder = sorted(group_option("model", n).params_b for n in entries)
    assert ladder[0] <= 0.6 and ladder[-1] >= 70  # about 0.5B to 70B
    for domain in catalog.DOMAINS:
        assert any(domain in e.domains for e in entries.values()), domain


def test_presets_estimate_offline_within_3_percent_of_their_declared_size():
    """Every preset's sizes, read by the preflight (tuneforge/arch: mixtures of experts too; a family it
    does not spell, counted on the meta device), count its declared parameters."""
    meta = set()
    for name in HUB_PRESETS:
        model = group_option("model", name)
        shape, source = preflight.model_shape(model)
        assert shape is not None, (name, source)
        assert source.startswith("sizes of the preset (model.architecture)"), source
        if "meta device" in source:
            meta.add(name)
        # StarCoder2 15B: 15.66B with transformers' default tie (docs/models.md), the card's nominal "15B"
        assert shape.params() == pytest.approx(model.params_b * 1e9, rel=0.05 if name == "starcoder2_15b" else 0.03)
    assert meta == {"aya_23_8b", "gemma3_1b"}  # cohere and gemma3_text: no reader in tuneforge/arch yet
    mixtral = preflight.model_shape(group_option("model", "mixtral_8x7b"))[0]
    assert mixtral.is_moe and mixtral.active_params() == pytest.approx(12.9e9, rel=0.01)


def test_a_preset_whose_sizes_miss_its_declared_size_gets_no_estimate():
    model = dataclasses.replace(group_option("model", "qwen2_5_7b"), params_b=3.0)
    shape, why = preflight.model_shape(model)
    assert shape is None and "model.params_b=3B" in why and "correct the preset" in why


def test_qwen2_5_7b_is_the_base_models_config():
    # the instruct model's config says 32768; the base checkpoint's 131072
    assert compose(["model=qwen2_5_7b"]).model.architecture["max_position_embeddings"] == 131072


def test_catalog_lookup_by_hub_id():
    entry = catalog.lookup(compose(["model=hf", "model.name_or_path=Qwen/Qwen2.5-7B"]).model)
    assert entry.preset == "qwen2_5_7b" and entry.licence == "apache-2.0"
    assert catalog.lookup(compose(["model=hf", "model.name_or_path=org/unknown"]).model) is None


def test_models_lists_a_domain(capsys):
    tuneforge("models", "--domain", "medical")
    out = capsys.readouterr().out
    assert "biomistral_7b" in out and "BioMistral/BioMistral-7B" in out and "qwen2_5_7b" not in out
    assert "1 model(s)" in out


def test_models_fits_lists_what_fits_with_the_estimate(capsys):
    plan = "cluster=slurm cluster.gpu_type=a100_80g cluster.gpus_per_node=1 method=lora train.dtype=bf16"
    tuneforge("models", "--fits", plan + " train.seq_len=2048 train.micro_batch=1 train.global_batch=8")
    out = capsys.readouterr().out
    assert out.startswith("# 30 model(s) fit: lora on ddp x 1 a100_80g")
    fitting = out.split(" do not fit")[0]
    assert "qwen2_5_7b" in fitting and "llama3_1_70b" not in fitting
    # validation first: LoRA's default dropout cannot apply to the experts peft adapts as parameters
    assert "  mixtral_8x7b: refused: method.dropout: 0.05 cannot apply" in out
    assert "  qwen3_30b_a3b_base: refused: method.dropout" in out
    # the same figure as the preflight of that preset
    report = preflight.check(compose(["model=qwen2_5_7b", *plan.split(), "train.seq_len=2048", "train.micro_batch=1"]))
    row = next(line for line in fitting.splitlines() if line.startswith("qwen2_5_7b "))
    assert f"{report.memory.total / 2**30:.1f}" in row.split()


@pytest.mark.parametrize(
    "args,key",
    [
        (["--domain", "astrology"], "--domain: no model in the catalog has domain 'astrology'"),
        (["--domain", "medical", "--kind", "instruct"], "--kind: no medical model of kind 'instruct'"),
        (["--fits", "method=lorra"], "--fits: method=lorra: no such option"),
    ],
)
def test_models_bad_filters_name_the_option(args, key, capsys):
    assert tuneforge("models", *args, check=False) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(key) and len(err.splitlines()) == 1


def test_a_hub_id_that_is_not_a_preset(tmp_path, monkeypatch):
    """Offline and not cached: the reason names the keys to give. In the hub cache: its config.json."""
    import huggingface_hub

    cfg = compose(["model=hf", "model.name_or_path=some-org/some-model", "method=full"])
    shape, reason = preflight.model_shape(cfg.model)
    assert shape is None
    assert "model.architecture.hidden_size" in reason and "model.architecture.num_hidden_layers" in reason
    snapshot = tmp_path / "models--some-org--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--some-org--some-model" / "refs").mkdir()
    (tmp_path / "models--some-org--some-model" / "refs" / "main").write_text("abc123")
    config = group_option("model", "qwen2_5_0_5b").architecture | {"model_type": "qwen2"}
    (snapshot / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    shape, reason = preflight.model_shape(cfg.model)
    assert reason == "config.json of some-org/some-model in the local hub cache"
    assert shape.params() == pytest.approx(0.494e9, rel=0.01)
