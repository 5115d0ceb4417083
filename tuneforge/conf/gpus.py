"""GPU types a cluster profile may name (`cluster.gpu_type`): memory and the datasheet's dense bf16 peak.

The preflight checks memory against these and estimates time from the peak; the trainer divides its
achieved FLOP/s by the same peak for the MFU it logs, so both speak of the same figure.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

#: gpu_type -> (memory in GiB as nvidia-smi reports it (MiB / 1024), dense bf16 peak TFLOP/s from the
#: vendor's datasheet, without sparsity; V100 and T4 have no bf16: their fp16 tensor-core peak).
GPU_TYPES: Dict[str, Tuple[float, float]] = {
    "a100_40g": (40.0, 312.0),
    "a100_80g": (80.0, 312.0),
    "h100_80g": (79.6, 989.0),  # SXM; the PCIe card peaks at 756
    "h100_pcie": (79.6, 756.0),
    "h100_nvl": (93.6, 835.0),
    "h200": (140.4, 989.0),
    "gh200": (94.5, 989.0),
    "b200": (178.4, 2250.0),
    "l40s": (44.4, 362.0),
    "l40": (44.4, 181.0),
    "l4": (22.0, 121.0),
    "a10g": (22.0, 70.0),
    "a10": (22.0, 125.0),
    "a6000": (47.5, 155.0),
    "rtx4090": (23.6, 165.0),
    "v100_16g": (16.0, 125.0),
    "v100_32g": (32.0, 125.0),
    "t4": (15.0, 65.0),
    "mi250x": (64.0, 383.0),  # one GCD (a Slurm "GPU") of the two on a card
    "mi300x": (192.0, 1307.0),
}


def datasheet_peak_tflops(gpu_type: Optional[str]) -> Optional[float]:
    """The dense bf16 TFLOP/s of a known GPU type, else None."""
    return GPU_TYPES[gpu_type][1] if gpu_type in GPU_TYPES else None
