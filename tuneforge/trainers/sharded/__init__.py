"""Models larger than one device: built, loaded, trained and exported without the whole model in one place.

Every function here takes plain arguments (a transformers config, a directory, a dtype, a callable that
shards); only `glue.py` reads tuneforge's config objects.

- `safetensors_io`: reads byte ranges of the tensors of a Hugging Face safetensors directory (each rank
  reads only the elements it owns) and writes safetensors files tensor by tensor.
- `meta`: the model built on the meta device; non-persistent buffers initialised as `from_pretrained` does.
- `init`: the deterministic random initialisation (pretraining), one block at a time, the same values on
  every world size and backend.
- `fill`: which elements of each parameter this rank holds (FSDP2 dim-0 shards, ZeRO-3 flat partitions,
  whole tensors) and filling them from a source.
- `peft_meta`: a PEFT method applied to a base that is still on the meta device.
- `fsdp`, `zero3`: the two sharded builders.
- `export`: safetensors shards + index, gathered one tensor at a time (live) or read from a DCP / ZeRO
  checkpoint in one process (offline).
- `memory`: RSS sampling for the memory harness (benchmarks/load_memory.py).
- `glue`: tuneforge's configs -> those plain arguments (the only file here that reads them).
"""
