"""trainers/adapters.py: the LoRA family's cheaper dropout and bf16 adapter compute hold torch's and peft's maths.

What a run does with them end to end (resume equal to an uninterrupted run with dropout on, adapters
reloaded with equal logits) is in tests/test_peft.py."""

from __future__ import annotations

import pytest
import torch

from tuneforge.trainers.adapters import Dropout, speed_up

P = 0.05


def test_dropout_keeps_each_element_with_probability_1_minus_p_and_keeps_the_expectation():
    drop = Dropout(P).train()
    x = torch.full((1000, 1000), 3.0)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    p_eff = 1 - drop.kept / 2**16
    assert abs(p_eff - P) < 2**-17  # p rounded to a multiple of 2^-16
    n = x.numel()
    sd = (p_eff * (1 - p_eff) / n) ** 0.5
    assert abs(1 - kept.float().mean().item() - p_eff) < 5 * sd
    assert torch.equal(y[kept], torch.full_like(y[kept], 3.0 * 2**16 / drop.kept))  # kept ones scaled exactly
    assert abs(y.double().mean().item() - 3.0) < 5 * 3.0 * (p_eff / (1 - p_eff) / n) ** 0.5
    # rows and columns independent: no periodic pattern from packing four 16-bit draws in one 64-bit number
    by_lane = kept.view(-1, 4).float().mean(0)
    assert (by_lane - (1 - p_eff)).abs().max() < 5 * (p_eff * (1 - p_eff) / (n / 4)) ** 0.5


def test_dropout_draws_a_new_mask_per_call_from_the_seeded_generator_and_back_propagates_through_it():
    drop = Dropout(P).train()
    x = torch.randn(64, 256, requires_grad=True)
    torch.manual_seed(1)
    a, b = drop(x), drop(x)
    assert not torch.equal(a != 0, b != 0)
    torch.manual_seed(1)
    assert torch.equal(drop(x), a)  # the generator the checkpoints save and restore
    state = torch.get_rng_state()
    first = drop(x)
    torch.set_rng_state(state)
    assert torch.equal(drop(x), first)
    a.sum().backward()
    assert torch.equal(x.grad, (a != 0).float() * (2**16 / drop.kept))
    assert torch.equal(drop.eval()(x), x)  # identity in eval mode
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.slow
def test_compiled_dropout_is_seeded_and_draws_a_mask_per_call():
    """Compiled: the eager masks, the same from the same seed run after run (what resuming needs), a new
    mask for each call (never merged), and the mask the forward drew is the one the backward uses."""
    drop = Dropout(P).train()

    def twice(t):  # two dropouts of one input: two masks
        return drop(t), drop(t)

    compiled = torch.compile(twice)
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(2)
    a = compiled(x)
    torch.manual_seed(2)
    b = compiled(x)
    assert not torch.equal(a[0] != 0, a[1] != 0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    torch.manual_seed(2)
    assert all(torch.equal(u, v) for u, v in zip(a, twice(x)))  # the eager masks
    a[0].float().sum().backward()
    assert torch.equal(x.grad, ((a[0] != 0) * (2**16 / drop.kept)).to(x.grad.dtype))
    keep = torch.cat([(m != 0).flatten() for m in a]).float().mean().item()
    assert abs(keep - drop.kept / 2**16) < 0.01


def peft_llama(dtype: torch.dtype, dropout: float, dora: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(dtype)
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", use_dora=dora
    )
    return get_peft_model(base, lora)


def test_speed_up_swaps_the_dropouts_and_computes_bf16_adapters_under_autocast_as_hf_bf16_does():
    ids = torch.randint(0, 128, (2, 16))
    fp32 = peft_llama(torch.float32, P)
    assert speed_up(fp32) == {"adapter_dropouts": 14}  # 2 layers x 7 linears; an fp32 base: fp32 adapters
    assert all(type(m) is Dropout for n, m in fp32.named_modules() if n.endswith("lora_dropout.default"))
    assert speed_up(peft_llama(torch.float32, 0.0)) == {"adapter_dropouts": 0}  # p = 0: peft's Identity stays

    model = peft_llama(torch.bfloat16, 0.0)
    for p in model.parameters():  # B != 0, so that the adapters change the output
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    model.eval()
    with torch.no_grad():
        fp32_adapters = model(input_ids=ids).logits  # peft's own path: adapters in fp32, inputs cast up
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hf_bf16 = model(input_ids=ids).logits  # HF Trainer's bf16=True: autocast around peft
        assert speed_up(model) == {"adapter_dropouts": 0, "adapter_compute_dtype": "bfloat16"}
        ours = model(input_ids=ids).logits
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # fp32 master weights
    torch.testing.assert_close(ours, hf_bf16, atol=0, rtol=0)
    torch.testing.assert_close(ours.float(), fp32_adapters.float(), atol=0.05, rtol=0.05)  # bf16 rounding


@pytest.mark.slow
def test_compiled_dora_blocks_trace_in_one_graph_and_train_as_eager_ones_do():
    """peft's DoRA read of the frozen weight broke the compiled graph in every adapted linear (Dynamo then
    ran the layers eagerly); after speed_up the blocks compile without a break, and the compiled
    model's loss and adapter gradients are the eager model's."""
    from torch._dynamo.utils import counters

    from tuneforge.trainers.compile import compile_blocks

    ids = torch.randint(0, 128, (2, 16))
    runs = []
    for compiled in (False, True):
        model = peft_llama(torch.float32, 0.0, dora=True)
        torch.manual_seed(1)
        for name, p in model.named_parameters():  # B != 0, so that the adapters and the norms matter
            if p.requires_grad and "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        assert speed_up(model)["dora_compiled_whole"]
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            assert compile_blocks(model) == 2
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    (eager_loss, eager_grads), (loss, grads) = runs
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)
