"""`tuneforge generate <run or model dir> "prompt" [--max-new-tokens N] [--system S] [--raw]`: a greedy answer.

A run dir answers with its final model (a PEFT run: its adapter on its base), its prompt rendered as
the run's data was: a user turn in the run's chat template (chat data), the Alpaca prompt (alpaca),
as it is (text, completion). A model dir (final/, an export, any Hugging Face model directory) renders
a chat prompt when its tokenizer has a chat template. The same rendering and greedy decoding as the
answers a run records in samples.jsonl (trainers/generate.py), in this process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from tuneforge import layout
from tuneforge.commands import BadArguments, Parser


def main(args: List[str]) -> int:
    """Print the model's greedy answer to a prompt, rendered as the run trained (chat template included)."""
    parser = Parser("generate", main.__doc__)
    parser.add_argument("path", type=Path, help="a run directory, or a Hugging Face model directory")
    parser.add_argument("prompt", help="the prompt (a question, an instruction, or text to continue)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--system", default=None, help="a system turn before the prompt (chat models)")
    parser.add_argument("--raw", action="store_true", help="continue the prompt as it is: no chat or Alpaca template")
    opts = parser.parse_args(args)
    if opts.max_new_tokens < 1:
        raise BadArguments("tuneforge generate: --max-new-tokens must be at least 1")
    model_dir, data_cfg = _source(opts.path.expanduser().resolve())
    import torch

    from tuneforge.trainers.generate import answer

    tokenizer, model = _load(model_dir)
    if opts.raw:
        data_cfg = _plain()
    elif data_cfg is None:  # a bare model dir: chat when its tokenizer says how
        data_cfg = _plain("chat" if getattr(tokenizer, "chat_template", None) else "text")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(answer(model.to(device), tokenizer, data_cfg, opts.prompt, opts.system, opts.max_new_tokens, device))
    return 0


def _source(path: Path):
    """(model dir, the run's data config or None) of a run dir or a model dir."""
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        from tuneforge.conf.schema import load

        final = path / layout.FINAL
        if not (final / "config.json").is_file() and not (final / "adapter_config.json").is_file():
            raise BadArguments(
                f"tuneforge generate: {path} has no final/ yet; export a checkpoint with `tuneforge export {path} "
                "--step N` and generate from that directory"
            )
        return final, load(path / "config.yaml").data
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path, None
    raise BadArguments(f"tuneforge generate: {path} is neither a run directory nor a model directory")


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if (model_dir / "adapter_config.json").is_file():  # a PEFT run's final/: the adapter on its base
        from peft import PeftConfig, PeftModel

        base = AutoModelForCausalLM.from_pretrained(PeftConfig.from_pretrained(model_dir).base_model_name_or_path)
        return tokenizer, PeftModel.from_pretrained(base, model_dir)
    return tokenizer, AutoModelForCausalLM.from_pretrained(model_dir)


def _plain(fmt: str = "text"):
    from tuneforge.conf.schema import DataConfig

    return DataConfig(format=fmt)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
