"""Hugging Face model directories written without the whole model in one place.

The layout is `save_pretrained`'s: `model.safetensors`, or `model-0000i-of-0000n.safetensors` files of at
most `max_shard_size` each plus `model.safetensors.index.json` ({"metadata": {"total_parameters",
"total_size"}, "weight_map"}), tied weights written once (under the first name, as transformers keeps
them), non-persistent buffers left out, config.json (dtype = the weights') and generation_config.json.

The files are planned from shapes alone (huggingface_hub's `split_torch_state_dict_into_shards` on meta
tensors: it sizes them by their storage and does not try to dedup meta storages), then each file is
written by `SafetensorsStreamWriter`: its header first, then each tensor as it is gathered. So the writer
(rank 0) holds one full tensor at a time, whatever the file size; the other ranks only take part in the
collectives.

Where the tensors come from:
- `live_tensors(model)` in a training job (collective, every rank iterates): FSDP2 DTensors are
  all-gathered one at a time; ZeRO-3 parameters give their fp32 master (`safe_get_full_fp32_param`) or,
  frozen, are gathered one at a time; anything else is taken as it is.
- `dcp_tensors(engine_dir, names)` from a torch.distributed.checkpoint folder (backends/fsdp.py's
  checkpoints), one process, read unit by unit (DCP reads only the requested items' bytes).
- `zero_tensors(engine_dir, tag)` from a DeepSpeed checkpoint, one process: DeepSpeed's own
  zero_to_fp32 in lazy mode (its optimizer files memory-mapped, each parameter assembled when asked).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from tuneforge import fsutil
from tuneforge.compat import deepspeed as deepspeed_compat
from tuneforge.compat.torch import non_persistent_buffers
from tuneforge.trainers.sharded.meta import own_parameters
from tuneforge.trainers.sharded.safetensors_io import INDEX_FILE, SafetensorsStreamWriter

Entry = Tuple[str, torch.dtype, Tuple[int, ...]]
DEFAULT_MAX_SHARD_SIZE = "5GB"


def plan_files(entries: Sequence[Entry], max_shard_size="5GB"):
    """huggingface_hub's split of these tensors into files (a StateDictSplit), from their shapes only."""
    from huggingface_hub import split_torch_state_dict_into_shards

    meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, dtype, shape in entries}
    return split_torch_state_dict_into_shards(
        meta, max_shard_size=max_shard_size, filename_pattern="model{suffix}.safetensors"
    )


Reader = Callable[[Sequence[Entry]], Iterator[Tuple[str, Optional[torch.Tensor]]]]


def write_weights(
    out_dir,
    entries: Sequence[Entry],
    read: Reader,
    is_main: bool = True,
    max_shard_size="5GB",
    total_parameters: Optional[int] = None,
) -> List[str]:
    """Plan the files, then drive read(entries in file order) (on every rank, when it is collective: the
    plan is the same everywhere); the main process writes each tensor into its file as it arrives.
    Returns the file names."""
    split = plan_files(entries, max_shard_size)
    by_name = {name: (dtype, shape) for name, dtype, shape in entries}
    files = list(split.filename_to_tensors.items())
    out_dir = Path(out_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    # a tensor larger than the cap gets a file of its own, ahead of the file being filled: file order
    ordered = [(name, *by_name[name]) for _, names in files for name in names]
    it = iter(read(ordered))
    for filename, names in files:
        writer = (
            SafetensorsStreamWriter(out_dir / filename, [(n, *by_name[n]) for n in names], metadata={"format": "pt"})
            if is_main
            else None
        )
        for name in names:
            got, tensor = next(it)
            if got != name:
                raise RuntimeError(f"tensors arrive out of order: {got}, expected {name}")
            if writer is not None:
                writer.write(name, tensor.to(by_name[name][0]))
            del tensor
        if writer is not None:
            writer.close()
    if is_main and split.is_sharded:
        metadata = dict(split.metadata)
        if total_parameters is not None:
            metadata["total_parameters"] = total_parameters
        index = {"metadata": metadata, "weight_map": split.tensor_to_filename}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [f for f, _ in files]


# ------------------------------------------------------------------------------------------- live models
def _global_shape(tensor: torch.Tensor) -> Tuple[int, ...]:
    return deepspeed_compat.full_shape(tensor)


def model_entries(
    model: nn.Module,
    select: Optional[Callable[[str, torch.Tensor], bool]] = None,
    dtype: Optional[Callable[[str, torch.Tensor], torch.dtype]] = None,
) -> List[Entry]:
    """(name, dtype, global shape) of what `state_dict()` holds, tied tensors once, in its order;
    select(name, tensor) filters. dtype(name, tensor): the dtype written (default: the tensor's)."""
    entries, seen = [], set()
    for name, tensor in _state_tensors(model):
        if id(tensor) in seen or (select is not None and not select(name, tensor)):
            continue
        seen.add(id(tensor))
        entries.append((name, dtype(name, tensor) if dtype else tensor.dtype, _global_shape(tensor)))
    return entries


def _state_tensors(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = module_name + "." if module_name else ""
        for attr, param in own_parameters(module):
            yield prefix + attr, param
        skip = non_persistent_buffers(module)
        for attr, buf in module.named_buffers(recurse=False, remove_duplicate=False):
            if attr not in skip:
                yield prefix + attr, buf


def export_dtype(name: str, tensor: torch.Tensor) -> torch.dtype:
    """What a live tensor is exported as: ZeRO-3's trainable parameters as their fp32 masters."""
    if deepspeed_compat.is_partitioned(tensor) and tensor.requires_grad and tensor.is_floating_point():
        return torch.float32
    return tensor.dtype


def live_tensors(
    model: nn.Module, entries: Sequence[Entry], is_main: bool
) -> Iterator[Tuple[str, Optional[torch.Tensor]]]:
    """Collective: every rank iterates; yields (name, full CPU tensor on the main rank, None elsewhere)."""
    tensors = dict(_state_tensors(model))
    for name, _, _ in entries:
        full = gather_full(tensors[name])
        yield name, (full.cpu() if is_main and full is not None else None)
        del full


def gather_full(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """The full value of one (possibly sharded) tensor; collective for sharded ones."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor().detach()
    if deepspeed_compat.is_partitioned(tensor):
        import deepspeed

        full = deepspeed.utils.safe_get_full_fp32_param(tensor) if tensor.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([tensor]):
                full = tensor.detach().clone()
        return full
    return tensor.detach()


def trainable(name: str, tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.Parameter) and tensor.requires_grad


def gather_state_dict(
    model: nn.Module, select: Callable[[str, torch.Tensor], bool], is_main: bool, dtype=export_dtype
) -> Optional[Dict[str, torch.Tensor]]:
    """Collective: {name: full tensor} of the selected tensors on the main rank (None elsewhere), gathered
    one at a time (select=trainable for an adapter: the frozen base is never gathered)."""
    entries = model_entries(model, select, dtype)
    state = {name: t for name, t in live_tensors(model, entries, is_main) if is_main}
    return state if is_main else None


def write_model_dir(model: nn.Module, out_dir, tokenizer=None, is_main: bool = True, max_shard_size="5GB") -> None:
    """Collective: `model` (a transformers model, possibly FSDP2- or ZeRO-3-sharded) as a Hugging Face
    directory `out_dir`, written by the main rank to a temp name and renamed into place."""
    import torch.distributed as dist

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    entries = model_entries(model, dtype=export_dtype)
    write_weights(
        tmp,
        entries,
        lambda ordered: live_tensors(model, ordered, is_main),
        is_main,
        max_shard_size,
        total_parameters=sum(_numel(shape) for _, _, shape in entries),
    )
    if is_main:
        _finish_dir(model, tmp, out_dir, tokenizer, entries)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _finish_dir(model, tmp: Path, out_dir: Path, tokenizer, entries: Sequence[Entry]) -> None:
    """config.json (its architectures and dtype as save_pretrained writes them), generation_config.json,
    the tokenizer; then `tmp` replaces `out_dir`."""
    config = getattr(model, "config", None)
    if config is not None:
        architecture = model_class(model)
        if architecture is not None:
            config.architectures = [architecture.__name__]
        config.save_pretrained(tmp)
        _set_config_dtype(tmp / "config.json", entries)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    from tuneforge.trainers.export import inference_ready  # what every written model dir needs, in one place

    inference_ready(tmp)
    fsutil.replace_dir(tmp, out_dir)


def model_class(model: nn.Module):
    """The transformers class of `model`, beneath the subclass FSDP2's fully_shard makes of it."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel

    for cls in type(model).__mro__:
        if issubclass(cls, PreTrainedModel) and not issubclass(cls, FSDPModule):
            return cls
    return None


def _set_config_dtype(path: Path, entries: Sequence[Entry]) -> None:
    floating = [dtype for _, dtype, _ in entries if dtype.is_floating_point]
    if not floating:
        return
    dtype = str(max(set(floating), key=floating.count)).split(".")[1]
    config = json.loads(path.read_text())
    if config.get("dtype") != dtype:
        config["dtype"] = dtype
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------- offline: saved checkpoints
def dcp_entries(engine_dir, prefix: str = "model.") -> List[Entry]:
    """The tensors under `prefix` of a DCP checkpoint, in the order they were saved (model order)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(engine_dir)).read_metadata().state_dict_metadata
    return [
        (key[len(prefix) :], md.properties.dtype, tuple(md.size))
        for key, md in metadata.items()
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    ]


def block_of(name: str) -> str:
    """The group a tensor is read with offline: its block for "<x>.layers.<i>.<...>" names (HF's), else itself."""
    parts = name.split(".")
    return ".".join(parts[:3]) if len(parts) > 3 and parts[2].isdigit() else name


def dcp_tensors(
    engine_dir, entries: Sequence[Entry], group: Callable[[str], str] = block_of, prefix: str = "model."
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Full tensors from a DCP checkpoint in one process, read one group (block) at a time."""
    import warnings

    import torch.distributed.checkpoint as dcp

    batch: List[Entry] = []

    def flush():
        state = {prefix + n: torch.empty(shape, dtype=dtype) for n, dtype, shape in batch}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*load in a single process")
            dcp.load(state, checkpoint_id=str(engine_dir), no_dist=True)
        for n, _, _ in batch:
            yield n, state.pop(prefix + n)

    for entry in entries:
        if batch and group(batch[-1][0]) != group(entry[0]):
            yield from flush()
            batch = []
        batch.append(entry)
    if batch:
        yield from flush()


def zero_tensors(
    engine_dir, tag: str, entries: Sequence[Entry], exclude_frozen: bool = True
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Full fp32 tensors from a DeepSpeed ZeRO checkpoint in one process (lazy: one parameter at a time)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(
        str(engine_dir), tag=tag, exclude_frozen_parameters=exclude_frozen, lazy_mode=True
    )
    for name, _, _ in entries:
        value = lazy[name]
        yield name, value.contiguous() if hasattr(value, "flat_groups") else value


def zero_entries(engine_dir, tag: str, exclude_frozen: bool = True) -> List[Entry]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(
        str(engine_dir), tag=tag, exclude_frozen_parameters=exclude_frozen, lazy_mode=True
    )
    entries = []
    for name, value in lazy.items():
        entries.append((name, value.dtype, tuple(value.shape)))
    return entries


def export_offline(
    model: nn.Module,
    entries: Sequence[Entry],
    read: Callable[[Sequence[Entry]], Iterator[Tuple[str, torch.Tensor]]],
    out_dir,
    tokenizer=None,
    max_shard_size="5GB",
) -> None:
    """One process: a Hugging Face directory from a checkpoint whose tensors are `entries` (`dcp_entries`,
    `zero_entries`), read by read(entries in file order) (e.g. `lambda e: dcp_tensors(dir, e)`).
    `model` gives names, order and config (a meta model is enough); a tensor it has and the checkpoint
    lacks, or one it does not know, is an error."""
    wanted = [name for name, _, _ in model_entries(model)]
    every_name = {name for name, _ in _state_tensors(model)}  # tied aliases included
    have = {name: entry for entry in entries for name in [entry[0]]}
    missing, unexpected = sorted(set(wanted) - set(have)), sorted(set(have) - every_name)
    if missing or unexpected:
        raise RuntimeError(f"the checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    entries = [have[name] for name in wanted]  # the model's order, tied aliases dropped
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_weights(
        tmp, entries, read, True, max_shard_size, total_parameters=sum(_numel(shape) for _, _, shape in entries)
    )
    _finish_dir(model, tmp, out_dir, tokenizer, entries)


def is_sharded_model(model: nn.Module) -> bool:
    """Whether any parameter is an FSDP2 DTensor or a ZeRO-3 partition."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or deepspeed_compat.is_partitioned(p) for p in model.parameters())
