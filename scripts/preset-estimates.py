"""Print the preset table of docs/preflight.md: the estimator's GiB per GPU for the model presets on
8 x 80 GB (bf16, micro batch 1, seq_len 2048), next to DeepSpeed's own estimator where it has one.

    python scripts/preset-estimates.py > /tmp/table.md   # then paste it into docs/preflight.md
"""

from __future__ import annotations

import contextlib
import sys

from tuneforge.conf.methods import METHODS
from tuneforge.launch import preflight
from tuneforge.launch.compose import compose
from tuneforge.launch.estimate import GIB, LAYOUTS, Job, memory, method_spec

PRESETS = ("llama3_8b", "mistral_7b", "qwen2_5_7b")
CASES = (("full", "zero3"), ("lora", "fsdp"), ("qlora", "ddp"), ("qlora", "fsdp"))
GPUS, MICRO_BATCH, SEQ_LEN = 8, 1, 2048


def deepspeed_zero3(n: int, largest: int) -> float:
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs its accelerator choice to stdout
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        n, largest, GPUS, 1, cpu_offload=False, cpu_offload_params=False, zero_init=True
    )
    return gpu


def main() -> None:
    print(
        "| model | method / backend | params | trainable | model states | activations, no ckpt / ckpt "
        "| peak, no ckpt | peak, ckpt | DeepSpeed (ours comparable) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in PRESETS:
        shape, _ = preflight.model_shape(compose([f"model={preset}"]).model)
        for method, backend in CASES:
            spec = method_spec(METHODS[method].schema(), shape)
            job = Job(LAYOUTS[backend], GPUS, MICRO_BATCH, SEQ_LEN, "bf16")
            plain, ckpt = memory(shape, spec, job), memory(shape, spec, job.with_(activation_checkpointing=True))
            theirs = ""
            if backend == "zero3":
                ours = plain.model_states + plain.step_transient + plain.buffers
                ds = deepspeed_zero3(shape.params(), shape.largest_module_params())
                theirs = f"{ds / GIB:.2f} ({ours / GIB:.2f}, {ours / ds - 1:+.0%})"
            print(
                f"| {preset} | {method} / {backend} | {shape.params() / 1e9:.2f}B | {_count(spec.trainable)} "
                f"| {plain.model_states / GIB:.2f} | {plain.activations / GIB:.1f} / {ckpt.activations / GIB:.1f} "
                f"| {plain.total / GIB:.1f} | {ckpt.total / GIB:.1f} | {theirs} |"
            )


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


if __name__ == "__main__":
    main()
