"""Every causal-LM family a user brings (model=hf model.name_or_path=<dir>), against transformers and peft.

- shapes (arch/families.py): the parameter count and every decoder layer's weights of each family's
  config equal what transformers builds (on the meta device), also with the config.json keys older
  checkpoints omit left out; unfamiliar families are counted on the meta device;
- attention and refusals (arch/support.py, launch/families.py): the flags read from transformers' source
  equal the imported classes'; what cannot train is refused before submission, naming its key;
- PEFT (arch/adapters.py): the adapter count of every method on every family equals peft's;
- packing: PACKING_LEAKS is what a packed row does in each family;
- the matrix (slow, arch/tiny.MATRIX): full and LoRA on DDP for every family, and on FSDP2 and ZeRO-3
  (activation checkpointing on) for GPT-2, Falcon, Gemma-2 and Mixtral, on 2 CPU ranks: the loss falls
  in 3 steps, the result loads (final/ with AutoModelForCausalLM, an exported checkpoint; the adapter
  with PeftModel, merged by export to the same logits), and the preflight's model states are within 10%
  of the bytes each rank holds. Two cases go through the CLI (and `tuneforge export`); the others are
  composed, validated and estimated by the launcher's own functions here and trained by the task every
  rank runs (trainers/task.py) in two worker processes that stay up for all cases: the CLI adds
  submitit and the launcher's process start-up, nothing per family.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from conftest import saved_model

from tuneforge.arch import support, tiny
from tuneforge.launch import cli

SEQ_LEN, GLOBAL_BATCH, STEPS = 32, 8, 3
#: cases trained through the real command line (the others in the workers below)
THROUGH_CLI = (("mixtral", "lora", "ddp"), ("gpt2", "full", "zero3"))
Case = Tuple[str, str, str]


def _variants() -> Dict[str, dict]:
    """Tiny configs of every family, plus variants whose sizes are spelled differently."""
    from transformers import AutoConfig

    def cfg(model_type, **kw):
        return AutoConfig.for_model(
            model_type, vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw
        ).to_dict()

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    out = {f: tiny.config(f).to_dict() for f in tiny.FAMILIES}
    out.update(
        {
            "falcon_40b_style": cfg("falcon", **small, num_kv_heads=2, new_decoder_architecture=True),
            "falcon_sequential": cfg("falcon", **small, parallel_attn=False, multi_query=False, bias=True),
            "falcon_new_one_norm": cfg(
                "falcon", **small, num_kv_heads=2, new_decoder_architecture=True, num_ln_in_parallel_attn=1
            ),
            "gpt2_untied_n_inner": cfg("gpt2", n_embd=64, n_layer=2, n_head=4, n_inner=96, tie_word_embeddings=False),
            "opt_350m_style": cfg("opt", **small, ffn_dim=128, word_embed_proj_dim=32),
            "opt_post_norm": cfg(
                "opt", **small, ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=False, enable_bias=False
            ),
            "qwen2_moe_dense_layers": cfg(
                "qwen2_moe",
                **{**small, "num_hidden_layers": 4},
                intermediate_size=96,
                num_key_value_heads=2,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=48,
                mlp_only_layers=[0],
                decoder_sparse_step=2,
            ),
            "qwen3_moe": cfg(
                "qwen3_moe",
                **small,
                intermediate_size=96,
                num_key_value_heads=2,
                head_dim=16,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
            ),
            "gptj": cfg("gptj", n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
            "phi": cfg("phi", **small, intermediate_size=128, qk_layernorm=True),
            "gpt_bigcode": cfg("gpt_bigcode", n_embd=64, n_layer=2, n_head=4, n_positions=128),
            "gpt_bigcode_mha": cfg("gpt_bigcode", n_embd=64, n_layer=2, n_head=4, n_positions=128, multi_query=False),
            "stablelm": cfg(
                "stablelm",
                **small,
                intermediate_size=128,
                num_key_value_heads=2,
                qk_layernorm=True,
                use_qkv_bias=True,
                use_parallel_residual=True,
            ),
            "llama_tied_biased": cfg(
                "llama",
                **small,
                intermediate_size=128,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                attention_bias=True,
                mlp_bias=True,
            ),
            "starcoder2_no_bias": cfg(
                "starcoder2",
                **small,
                intermediate_size=128,
                num_key_value_heads=2,
                use_bias=False,
                tie_word_embeddings=False,
            ),
        }
    )
    return out


def _layout(shape) -> set:
    return {
        frozenset((w.name, w.fan_in, w.fan_out, w.bias, w.kind, w.experts, w.plain) for w in b.weights)
        for b in shape.blocks
    }


# ------------------------------------------------------------------------------------------ shapes
def test_shapes_count_what_transformers_builds():
    from tuneforge import arch
    from tuneforge.arch.meta import build_on_meta, shape_of_model

    warnings.filterwarnings("ignore")
    for name, cfg in _variants().items():
        shape = arch.shape_from_config(cfg)
        model = build_on_meta(cfg)
        counted = shape_of_model(model)
        assert shape.params() == sum(p.numel() for p in model.parameters()), name  # tied weights once
        assert _layout(shape) == _layout(counted), name
        assert {w.name for w in shape.outer} == {w.name for w in counted.outer}, name
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        # DeepSpeed's largest_layer_params (a fused experts module is gathered whole; OPT's position table
        # holds 2 rows beyond its position limit)
        assert shape.largest_module_params() >= 0.99 * largest, name
        experts = [p.numel() for p in model.parameters() if p.dim() == 3]
        if shape.is_moe:  # FLOPs: only experts_per_token of every expert stack
            idle = sum(experts) * (shape.experts - shape.experts_per_token) // shape.experts
            assert shape.active_params() == shape.params() - idle, name
        else:
            assert shape.active_params() == shape.params() and not experts, name


def test_keys_older_configs_omit_take_the_family_defaults():
    """Drop every key DEFAULTS knows from each config.json: the count still equals what transformers
    builds from the shortened config (it fills in its own defaults)."""
    from tuneforge import arch
    from tuneforge.arch.meta import build_on_meta

    warnings.filterwarnings("ignore")
    for name, cfg in _variants().items():
        defaults = arch.DEFAULTS.get(cfg["model_type"])
        if not defaults:
            continue
        short = {k: v for k, v in cfg.items() if k not in defaults}
        built = sum(p.numel() for p in build_on_meta(short).parameters())
        assert arch.shape_from_config(short).params() == built, name


def test_unfamiliar_families_are_counted_on_the_meta_device(tmp_path, capsys):
    from transformers import AutoConfig

    from tuneforge import arch
    from tuneforge.arch.meta import build_on_meta
    from tuneforge.launch.families import checkpoint_shape

    warnings.filterwarnings("ignore")
    for model_type in ("smollm3", "glm4", "cohere", "helium"):
        config = AutoConfig.for_model(
            model_type,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=300,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        with pytest.raises(arch.UnknownArchitecture):
            arch.shape_from_config(config.to_dict())  # known now? move it to _variants
        config.save_pretrained(tmp_path / model_type)
        if model_type == "glm4":  # the dry run below loads nothing, but refuses a folder without weights
            saved_model(tmp_path / model_type, config.to_dict())
        shape, source = checkpoint_shape(tmp_path / model_type / "config.json")
        assert "counted on the meta device" in source, source
        assert shape.params() == sum(p.numel() for p in build_on_meta(config.to_dict()).parameters()), model_type
        assert {w.role for w in shape.layer_weights()} >= {"q", "k", "v", "o", "down"}, model_type
    args = ["logger=none", "model=hf", f"model.name_or_path={tmp_path / 'glm4'}", "method=lora", "--dry-run"]
    assert cli.main(args) == 0
    assert "counted on the meta device (torch imported)" in capsys.readouterr().out


def test_the_dry_run_of_any_known_family_imports_no_torch(tmp_path):
    """Sizes, refusals, attention and adapter targets of a Mixtral checkpoint, read without torch."""
    model_dir = saved_model(tmp_path / "model", tiny.config("mixtral").to_dict())
    code = (
        "import sys; from tuneforge.launch.cli import main; "
        f"rc = main(['--dry-run', 'model=hf', 'model.name_or_path={model_dir}', 'method=lora', 'method.dropout=0']); "
        "print('RESULT', rc, sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split("RESULT")[-1].split(None, 1) == ["0", "[]\n"], out.stdout[-2000:] + out.stderr[-2000:]
    assert "active: 2 of 4 experts" in out.stdout, out.stdout


# ------------------------------------------------------------------------------------------ refusals
def _config_dir(tmp_path: Path, config: dict) -> Path:
    out = tmp_path / "model"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _saved(model_type: str, **kw) -> dict:
    from transformers import AutoConfig

    return json.loads(AutoConfig.for_model(model_type, **kw).to_json_string())


def _tiny(family: str):
    return lambda: tiny.config(family).to_dict()


REFUSED = [  # (config.json, overrides, key, words in the problem)
    (lambda: _saved("t5"), [], "model.name_or_path", "encoder-decoder"),
    (lambda: _saved("bart"), [], "model.name_or_path", "encoder-decoder"),
    (lambda: _saved("bert"), [], "model.name_or_path", "bidirectional encoder"),
    (lambda: _saved("llava"), [], "model.name_or_path", "no causal-LM class"),
    (lambda: _saved("vit"), [], "model.name_or_path", "no causal-LM class"),
    (
        lambda: {"model_type": "my_lm", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyLM"}},
        [],
        "model.name_or_path",
        "model.trust_remote_code=true",
    ),
    (lambda: {"model_type": "brand_new_lm", "hidden_size": 64}, [], "model.name_or_path", "unknown to transformers"),
    (_tiny("gemma2"), ["model.attn_implementation=sdpa"], "model.attn_implementation", "Gemma2ForCausalLM has no sdpa"),
    (
        _tiny("bloom"),
        ["model.attn_implementation=flash_attention_2", "data.packing=false"],
        "model.attn_implementation",
        "BloomForCausalLM has no flash_attention_2",
    ),
    (_tiny("bloom"), [], "data.packing", "set data.packing=false"),
    (_tiny("opt"), [], "data.packing", "set data.packing=false"),
    (_tiny("mixtral"), ["method=lora"], "method.dropout", "set method.dropout=0"),
    (_tiny("olmoe"), ["method=qlora"], "method.dropout", "set method.dropout=0"),
    (
        _tiny("mixtral"),
        ["method=dora", "method.target_modules=[gate_up_proj]"],
        "method.target_modules",
        "cannot adapt the stacked expert weights",
    ),
    (_tiny("gpt2"), ["method=loha"], "method", "has no layer for the weights"),
    (_tiny("falcon"), ["method=qlora"], "method", "would train on an unquantised base"),
    (_tiny("gpt2"), ["method=lora", "method.target_modules=[c_atn]"], "method.target_modules", "did you mean 'c_attn'"),
    (_tiny("gpt2"), ["train.seq_len=512"], "train.seq_len", "256 positions"),
]


@pytest.mark.parametrize("config,overrides,key,words", REFUSED)
def test_refused_before_submission_naming_the_key(config, overrides, key, words, tmp_path, capsys):
    warnings.filterwarnings("ignore")
    model_dir = _config_dir(tmp_path, config())
    run_dir = tmp_path / "run"
    args = ["logger=none", "model=hf", f"model.name_or_path={model_dir}", f"run.dir={run_dir}", *overrides]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert any(line.strip().startswith(key + ":") and words in line for line in err.splitlines()), err
    assert not run_dir.exists()


def test_what_trains_is_not_refused(tmp_path, capsys):
    """The fixes the refusals name are accepted; "auto" attention says eager where there is no SDPA;
    every family's adapter is counted (no "no estimate")."""
    cases = [
        ("gemma2", []),
        ("bloom", ["data.packing=false"]),
        ("mixtral", ["method=lora", "method.dropout=0"]),
        ("mixtral", ["method=dora"]),
        ("gpt2", ["method=ia3"]),
        ("falcon", ["method=lokr"]),
        ("qwen2_moe", ["method=qlora", "method.dropout=0", "method.target_modules=[q_proj,lm_head]"]),
    ]
    for family, overrides in cases:
        model_dir = saved_model(tmp_path / family / "model", tiny.config(family).to_dict())
        args = ["logger=none", "model=hf", f"model.name_or_path={model_dir}", *overrides, "--dry-run"]
        assert cli.main(args) == 0, (family, overrides, capsys.readouterr().err)
        out = capsys.readouterr().out
        assert "no estimate" not in out, out
        if family in ("gemma2", "bloom"):
            assert "model.attn_implementation=auto: eager" in out, out


@pytest.mark.slow
def test_attention_flags_read_from_source_match_the_classes():
    """For every model type AutoModelForCausalLM knows: _supports_sdpa / _supports_flash_attn read by
    arch/support.py from transformers' source equal the imported class's."""
    import transformers

    warnings.filterwarnings("ignore")
    wrong = []
    for model_type, class_name in support.registry().causal_lm.items():
        cls = getattr(transformers, class_name)
        for flag in ("_supports_sdpa", "_supports_flash_attn"):
            if support.class_attribute(model_type, flag) != bool(getattr(cls, flag)):
                wrong.append((model_type, flag))
    assert not wrong
    assert {f for f, (t, _) in tiny.FAMILIES.items() if not support.class_attribute(t, "_supports_sdpa")} == {
        "gemma2",
        "bloom",
    }


# ------------------------------------------------------------------------------------------ PEFT
@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_adapter_counts_match_peft(family):
    """Default targets of every PEFT method on every family: peft wraps exactly the weights the
    preflight counted (its trainable parameters are launch/estimate.py's count), and a backward runs."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge import arch
    from tuneforge.arch import adapters
    from tuneforge.conf import methods
    from tuneforge.launch.estimate import adapter_params
    from tuneforge.trainers.methods import family_targets, peft_config

    warnings.filterwarnings("ignore")
    config = tiny.config(family)
    shape = arch.shape_from_config(config.to_dict())
    for name in methods.PEFT_METHODS:
        if name == "qlora":
            continue  # lora's layout on a 4-bit base: tests/test_peft.py
        spec = methods.method(name)
        method_cfg = spec.schema(**({"dropout": 0.0} if hasattr(spec.schema, "dropout") else {}))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        if adapters.problems(shape, spec, method_cfg, adapters.targets(shape, spec, method_cfg)):
            with pytest.raises(ValueError):
                family_targets(model, method_cfg)
            continue
        wrapped = peft.get_peft_model(model, peft_config(method_cfg, 10, family_targets(model, method_cfg)))
        trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        wrapped(input_ids=torch.randint(3, 200, (1, 8))).logits.sum().backward()
        assert trainable == adapter_params(method_cfg, shape), (family, name)


# ------------------------------------------------------------------------------------------ packing
def test_packing_leaks_only_where_the_table_says():
    """A packed row's logits equal each example's run alone, except in PACKING_LEAKS."""
    import torch
    from transformers import AutoModelForCausalLM

    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(5, 400, (1, 10), generator=g), torch.randint(5, 400, (1, 6), generator=g)
    packed, positions = torch.cat([a, b], 1), torch.cat([torch.arange(10), torch.arange(6)])[None]
    leaks = set()
    for family, (model_type, _) in tiny.FAMILIES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny.config(family), attn_implementation="eager").eval()
        with torch.no_grad():
            together = model(input_ids=packed, position_ids=positions, use_cache=False).logits
            alone = torch.cat([model(input_ids=x, use_cache=False).logits for x in (a, b)], 1)
        if not torch.allclose(together, alone, atol=1e-5):
            leaks.add(model_type)
    assert leaks == set(support.PACKING_LEAKS)


# ------------------------------------------------------------------------------------------ README
def test_the_readme_table_of_families_is_the_rendered_one():
    from tuneforge.launch.matrix import render_families

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert render_families() in readme, "README.md: paste the output of scripts/render-families.py"


# ------------------------------------------------------------------------------------------ the matrix
def tokenizer():
    """A byte-level BPE trained on the bundled corpus (tuneforge's own recipe), vocabulary 512."""
    from tuneforge.data import bundled
    from tuneforge.trainers.model import train_tokenizer

    docs = [p.strip() for p in bundled("demo_corpus").read_text().split("\n\n") if p.strip()]
    return train_tokenizer(docs, 512, 2)


def build(family: str, out_dir: Path, tok) -> Path:
    """A random tiny `family` model and its tokenizer, saved in `out_dir` as a user's checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny.config(family, vocab_size=len(tok), bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> Path:
    """Every family of arch/tiny.py saved under <root>/<family>/, and <root>/data.txt: a slice of the
    bundled corpus that packs into exactly one global batch (every step trains on the same rows)."""
    from tuneforge.data import bundled

    warnings.filterwarnings("ignore")
    root = tmp_path_factory.mktemp("families")
    tok = tokenizer()
    for family in tiny.FAMILIES:
        build(family, root / family, tok)
    docs = [p.strip() for p in bundled("demo_corpus").read_text().split("\n\n") if p.strip()]
    kept, tokens = [], 0
    for doc in docs:
        words = doc.split(" ")
        while words and tokens + len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) + 1 > (
            GLOBAL_BATCH * SEQ_LEN
        ):
            words.pop()
        if not words:
            break
        kept.append(" ".join(words))
        tokens += len(tok(kept[-1], add_special_tokens=False)["input_ids"]) + 1
    (root / "data.txt").write_text("\n\n".join(kept) + "\n")
    return root


def matrix_args(root: Path, case: Case, run_dir: Path) -> List[str]:
    family, method, backend = case
    args = [
        "logger=none",
        "model=hf",
        f"model.name_or_path={root / family}",
        f"data.path={root / 'data.txt'}",
        "data.validation_fraction=0",
        f"method={method}",
        f"backend={backend}",
        f"run.dir={run_dir}",
        f"train.max_steps={STEPS}",
        "train.warmup_steps=1",
        "train.lr=1e-2",
        f"train.seq_len={SEQ_LEN}",
        "train.micro_batch=2",
        f"train.global_batch={GLOBAL_BATCH}",
        # the last step's checkpoint of a sharded full run is exported below (its backend's own format)
        f"train.checkpoint_every={STEPS if backend != 'ddp' and method == 'full' else 0}",
        "cluster.collective_timeout_s=120",
    ]
    args += tiny.required_overrides(family, method)  # what the refusals ask for (test_refused_...)
    if backend != "ddp":
        args.append("train.activation_checkpointing=true")
    if backend == "zero3":
        args.append("backend.param_persistence_threshold=0")  # partition every parameter, as on a real model
    return args


def _worker(rank: int, cases_file: str) -> None:
    """One of the 2 ranks: every case's task in turn (trainers/task.py, as a job's rank runs it); a
    failure is written to <run dir>/error.rank<N>.txt and the next case starts."""
    import traceback

    from tuneforge.trainers.task import DistEnv, StopFlag, run

    warnings.filterwarnings("ignore")
    cfgs = pickle.loads(Path(cases_file).read_bytes())
    fresh = _deepspeed_state()
    for i, cfg in enumerate(cfgs):
        port = _meet(Path(cases_file).parent / "meet", i, rank)
        env = DistEnv(rank, rank, 2, 2, 1, "127.0.0.1", port, "families", "cpu")
        try:
            run(cfg, env, StopFlag())
        except Exception:  # noqa: BLE001 (reported by the test of this case)
            (Path(cfg.run.dir) / f"error.rank{rank}.txt").write_text(traceback.format_exc())
        fresh()
        print(f"case {i + 1}/{len(cfgs)} done: {cfg.run.dir}", flush=True)  # the test's sign of progress


def _meet(where: Path, case: int, rank: int, timeout_s: float = 900) -> int:
    """Both ranks at `case` before either starts it; returns its port, free when rank 0 chose it.
    Without this, a case that failed early on one rank leaves the ranks a case apart, each waiting at a
    different port until its timeout, and every later case fails the same way."""
    from conftest import free_port

    where.mkdir(exist_ok=True)
    if rank == 0:
        chosen = where / f"{case}.port"
        chosen.with_suffix(".tmp").write_text(str(free_port()))
        chosen.with_suffix(".tmp").rename(chosen)  # rank 1 never reads half a number
    (where / f"{case}.rank{rank}").touch()
    deadline = time.time() + timeout_s
    while not (where / f"{case}.rank{1 - rank}").exists():
        if time.time() > deadline:
            raise TimeoutError(f"rank {1 - rank} did not reach case {case} in {timeout_s:.0f} s")
        time.sleep(0.05)
    return int((where / f"{case}.port").read_text())


def _deepspeed_state():
    """A job runs one task per process; these workers run many. DeepSpeed keeps the process groups it
    made in module globals (deepspeed.utils.groups, deepspeed.comm.cdb), which name the process group of
    the previous case once it is destroyed, and transformers the ZeRO-3 config it constructs under:
    returns a function that puts them back as imported."""
    try:
        import deepspeed.comm.comm as ds_comm
        from deepspeed.utils import groups
    except ImportError:
        return lambda: None
    initial = {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(groups).items() if _is_state(k, v)}

    def reset():
        import gc

        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        for key, value in initial.items():
            setattr(groups, key, dict(value) if isinstance(value, dict) else value)
        ds_comm.cdb = None
        # a ZeRO-3 case keeps its HfDeepSpeedConfig alive on its model (trainers/sharded/zero3.py); the
        # next case must not construct under it (transformers' global weak reference, with this world)
        unset_hf_deepspeed_config()
        gc.collect()

    return reset


def _is_state(name: str, value) -> bool:
    return (name.startswith("_") and name.isupper() or name in ("mpu", "mesh_device")) and (
        value is None or isinstance(value, dict)
    )


@pytest.fixture(scope="module")
def matrix(families, tmp_path_factory, request) -> Dict[Case, Path]:
    """The cases of tiny.MATRIX this session runs (all, or those `-k` selects) trained: {case: run dir}."""
    from tuneforge.launch import preflight, rundir
    from tuneforge.launch.compose import compose
    from tuneforge.launch.validate import validate
    from tuneforge.trainers.metrics import PEAK_FILE

    root = tmp_path_factory.mktemp("matrix")
    selected = [
        item.callspec.params["case"] for item in request.session.items if item.originalname == "test_family_trains"
    ]
    run_dirs = {case: root / "-".join(case) for case in selected}
    started = time.time()
    cfgs = []
    for case in selected:
        if case in THROUGH_CLI:
            continue
        args = matrix_args(families, case, run_dirs[case])
        cfg = compose(args)
        assert not validate(cfg), (case, [str(p) for p in validate(cfg)])
        rundir.create(cfg, args)
        preflight.save(preflight.check(cfg), run_dirs[case])
        # the GEMM ceiling of a 2-layer model says nothing: a declared figure spares each case ~1 s
        (run_dirs[case] / PEAK_FILE).write_text(json.dumps({"peak_tflops": 1.0}))
        cfgs.append(cfg)
    cases_file = root / "cases.pkl"
    cases_file.write_bytes(pickle.dumps(cfgs))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(cases_file)],
            env=env,
            stdout=(root / f"rank{rank}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for rank in (0, 1)
    ]
    for case in (c for c in THROUGH_CLI if c in run_dirs):  # meanwhile the CLI's, in processes of their own
        assert cli.main(matrix_args(families, case, run_dirs[case])) == 0, case
    _wait_for(workers, [root / f"rank{rank}.log" for rank in (0, 1)])
    print(f"\nfamily matrix: {len(selected)} cases trained in {time.time() - started:.0f} s")
    return run_dirs


def _wait_for(workers, logs: List[Path], stalled_s: float = 600) -> None:
    """Until both ranks exit: fails as soon as one fails, or when neither finished a case for `stalled_s`
    (a busy machine slows the matrix down; only a rank that stopped moving fails it)."""
    last, moved = None, time.time()
    while any(w.poll() is None for w in workers):
        progress = [log.stat().st_size for log in logs]
        if progress != last:
            last, moved = progress, time.time()
        failed = [w for w in workers if w.poll() not in (None, 0)]
        if failed or time.time() - moved > stalled_s:
            for w in workers:
                w.kill()
            pytest.fail("\n".join(f"{log.name}:\n{log.read_text()[-3000:]}" for log in logs))
        time.sleep(1)
    assert [w.returncode for w in workers] == [0, 0], [log.read_text()[-3000:] for log in logs]


def _ids():
    import torch

    return torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize("case", tiny.MATRIX, ids=["-".join(c) for c in tiny.MATRIX])
def test_family_trains(case, matrix, families, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    family, method, backend = case
    run_dir = matrix[case]
    errors = sorted(run_dir.glob("error.rank*.txt"))
    if errors:  # the exception's own line first: it is what a summary line (-ra) shows
        trace = errors[0].read_text()
        pytest.fail(f"{errors[0].name}: {trace.strip().splitlines()[-1]}\n{trace[-3000:]}")
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and losses[-1] < losses[0], losses

    ids = _ids()
    with torch.no_grad():
        if method == "full":  # final/ is a Hugging Face model; a sharded run's checkpoint exports to the same
            final = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()(input_ids=ids).logits
            assert torch.isfinite(final).all()
            if backend != "ddp":
                out = tmp_path / "export"
                if case in THROUGH_CLI:
                    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
                else:
                    from tuneforge.conf.schema import load
                    from tuneforge.trainers.export import export_checkpoint

                    export_checkpoint(load(run_dir / "config.yaml"), run_dir / "checkpoints" / f"step_{STEPS}", out)
                exported = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
                torch.testing.assert_close(exported, final, atol=1e-4, rtol=0)
        else:  # the adapter reloads on its base and changes it; export merges it into the same logits
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(families / family).eval()
            before = base(input_ids=ids).logits
            adapted = PeftModel.from_pretrained(base, str(run_dir / "final")).eval()(input_ids=ids).logits
            assert not torch.allclose(before, adapted, atol=1e-4), "the adapter changed nothing"
            if case in THROUGH_CLI:
                assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
            else:
                from tuneforge.trainers.export import export_adapter_run

                export_adapter_run(run_dir, out=tmp_path / "merged")
            merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
            torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)

    # the preflight's model states (params + grads + optimizer) against what each rank held
    estimate = json.loads((run_dir / "preflight.json").read_text())
    assert estimate["available"], estimate
    states = sum(estimate["memory_bytes"][k] for k in ("params", "grads", "optim", "cpu"))
    for rank in json.loads((run_dir / "summary.json").read_text())["mem_per_rank"]:
        measured = rank["mem_params_bytes"] + rank["mem_grads_bytes"] + rank["mem_optim_bytes"]
        print(
            f"\n{'-'.join(case)}: model states estimated {states}, measured {measured} ({states / measured - 1:+.1%})"
        )
        assert states == pytest.approx(measured, rel=0.10)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2])
