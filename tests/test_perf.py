"""Throughput plumbing: FLOPs and MFU figures, the measured ceiling, the speed levers keep the maths."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.trainers import metrics


def tiny_llama(tied: bool = False, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        use_cache=False,
        **overrides,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_flops_count_the_weights_that_enter_a_matmul():
    from tuneforge import arch

    untied, tied = tiny_llama(), tiny_llama(tied=True)
    embedding = 128 * 32
    shape = arch.shape_from_config(untied.config.to_dict())
    assert shape.params() == sum(p.numel() for p in untied.parameters())
    assert shape.matmul_params() == shape.params() - embedding  # the input table is a lookup
    tied_shape = arch.shape_from_config(tied.config.to_dict())
    # tied: the table is the output head too, and counted once
    assert tied_shape.matmul_params() == tied_shape.params() == sum(p.numel() for p in tied.parameters())
    attention = 12 * 2 * 32 * 16
    assert arch.flops_per_token(shape, 16) == 6 * shape.matmul_params() + attention
    # a frozen base under an adapter: 4N (no weight gradient) + 6 per adapter weight
    assert arch.flops_per_token(shape, 16, adapter_params=100) == 4 * shape.matmul_params() + 600 + attention


def test_ceiling_is_measured_at_the_models_shapes_without_touching_the_run_rng():
    from tuneforge import arch

    shapes = arch.shape_from_config(tiny_llama().config.to_dict()).gemm_shapes(64)
    # q and o, k/v (2 kv heads x 8 = 16 wide), MLP up and down, the output head
    assert list(shapes) == sorted({(64, 32, 32), (64, 32, 16), (64, 32, 64), (64, 64, 32), (64, 32, 128)})
    state = torch.get_rng_state()
    found = metrics.gemm_ceiling(shapes, torch.bfloat16, tries=2)
    assert found["tflops"] > 0 and tuple(found["shape"]) in shapes
    assert torch.equal(state, torch.get_rng_state())


def test_declared_peak_wins_and_a_measured_ceiling_is_cached_in_the_run_dir(tmp_path):
    from tuneforge.conf.schema import LocalClusterConfig, TrainConfig
    from tuneforge.trainers.distributed import DistEnv

    env = DistEnv(0, 0, 1, 1, 1, "localhost", 0, "test", "cpu")
    train = TrainConfig(seq_len=16, micro_batch=4)
    declared = metrics.Throughput.of(tiny_llama(), None, LocalClusterConfig(peak_tflops=989.0), train, env, tmp_path)
    assert declared.peak_tflops == 989.0 and declared.peak_source == "cluster.peak_tflops"
    (tmp_path / "m").mkdir()
    measured = metrics.Throughput.of(tiny_llama(), None, LocalClusterConfig(), train, env, tmp_path / "m")
    assert measured.peak_tflops > 0 and measured.peak_source == "measured bf16 GEMM"
    cached = json.loads((tmp_path / "m" / metrics.PEAK_FILE).read_text())
    (tmp_path / "m" / metrics.PEAK_FILE).write_text(json.dumps({**cached, "peak_tflops": 1.5}))
    again = metrics.Throughput.of(tiny_llama(), None, LocalClusterConfig(), train, env, tmp_path / "m")
    assert again.peak_tflops == 1.5  # reused


def test_cached_epoch_permutation_gives_the_same_batches_in_any_order():
    from tuneforge.data.batches import GlobalBatches

    rows = list(range(10))  # the permutation depends only on the number of rows
    batches = GlobalBatches(rows, global_batch=4, micro_batch=2, seed=3, rank=0, world_size=1, collate=None)

    def fresh(step):  # what every step computed before the permutation was cached
        epoch, position = divmod(step, batches.steps_per_epoch)
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch))
        return perm[position * 4 : (position + 1) * 4]

    for step in (5, 0, 1, 2, 7, 3, 2):  # across epochs and back, as a resumed run may ask
        assert torch.equal(batches.indices(step), fresh(step))


def test_optimizer_is_fused_adamw_where_the_weights_allow_it():
    from tuneforge.conf.schema import TrainConfig
    from tuneforge.trainers.optim import make_optimizer

    train = TrainConfig(lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1)
    for dtype in (torch.float32, torch.bfloat16):
        optimizer = make_optimizer(tiny_llama().to(dtype), train)
        assert isinstance(optimizer, torch.optim.AdamW)
        assert all(group["fused"] for group in optimizer.param_groups)
        assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_allocator_keeps_freed_memory_on_glibc():
    import platform

    from tuneforge.trainers.allocator import keep_freed_memory

    assert keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


@pytest.mark.slow
def test_compiled_blocks_and_loss_match_eager_in_fp32():
    """train.compile changes the speed, not the maths: same loss and gradients as the eager model."""
    from tuneforge.trainers.compile import compile_blocks, loss_function

    eager, compiled = tiny_llama(), tiny_llama()
    assert compile_blocks(compiled) == 2  # the two LlamaDecoderLayer blocks
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    for model, compile_loss in ((eager, False), (compiled, True)):
        loss_function(compile_loss)(model(input_ids=ids).logits, ids).backward()
    eager_loss = loss_function(False)(eager(input_ids=ids).logits, ids)
    compiled_loss = loss_function(True)(compiled(input_ids=ids).logits, ids)
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5), name
