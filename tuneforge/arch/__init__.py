"""A model's architecture, read once for every family: sizes, layout, FLOPs, what transformers and
peft can do with it. A leaf: imports no other part of tuneforge.

shape.py     `ModelShape` (sizes and every weight of a decoder layer), `flops_per_token`: the one FLOP
             count of the preflight and the trainer (a mixture of experts: active parameters)
families.py  `shape_from_config(config.json dict)`: each family's spelling of its sizes and layout
meta.py      the fallback for an unfamiliar config: counted on the model built on the meta device
             (imports torch and transformers inside its functions; the submit path never imports it
             for a known family)
support.py   what the installed transformers can do with a config, read from its source files without
             importing it: refusals (not a causal LM, custom code), attention implementations, packing
adapters.py  PEFT per family: default targets, what peft cannot adapt, the adapter's size
tiny.py      tiny configs of the tested families and the test matrix (tests/test_families.py, the README table)
"""

from tuneforge.arch.families import DEFAULTS, language_config, layout_of, shape_from_config
from tuneforge.arch.shape import Block, ModelShape, UnknownArchitecture, Weight, flops_per_token

__all__ = [
    "DEFAULTS",
    "Block",
    "ModelShape",
    "UnknownArchitecture",
    "Weight",
    "flops_per_token",
    "language_config",
    "layout_of",
    "shape_from_config",
]
