"""Commands on existing run directories: `tuneforge <command> <run dir> ...`. No daemon: each command
reads the run dir's records (commands/runinfo.py), asks the scheduler through submitit, and exits.

    tuneforge export <run dir> [--step N] [--out DIR]    # a Hugging Face model dir from a checkpoint
                                                        # (PEFT runs: the adapter merged into its base)
    tuneforge status [run or sweep dir]                  # job, state, step/max, loss, tokens/s, elapsed, requeues, W&B
    tuneforge logs <run dir> [--follow] [--rank N]
    tuneforge cancel <run or sweep dir>
    tuneforge sync <run or sweep dir> [--print] [--timeout S]
    tuneforge models [--domain D] [--fits "<overrides>"]  # the model catalog; what fits a cluster and method
    tuneforge probe <overrides, candidates swept: model=a,b>  # bits per byte of each candidate on your data
    tuneforge generate <run or model dir> "prompt"       # a greedy answer, rendered as the run trained
    tuneforge compare <run dir> [<run dir> ...]          # answers and losses before and after training

One module per command, each with a `main(args) -> exit code`; this module only dispatches. Exit
codes: 0 done, 1 failed while working, 2 bad arguments (nothing written).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List

#: command name -> its module under tuneforge/commands/ (imported only when run)
COMMANDS = {"export": "export", "status": "status", "logs": "logs", "cancel": "cancel", "sync": "sync"}
COMMANDS.update(models="models", probe="probe", generate="generate", compare="compare")  # issue 13


def main(name: str, args: List[str]) -> int:
    if name not in COMMANDS:
        print(f"tuneforge: unknown command '{name}'; one of {', '.join(sorted(COMMANDS))}", file=sys.stderr)
        return 2
    command = importlib.import_module(f"tuneforge.commands.{COMMANDS[name]}")
    try:
        return command.main(args)
    except BadArguments as e:
        print(str(e), file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # not a run dir, no runs yet
        print(f"tuneforge {name}: {e}", file=sys.stderr)
        return 2


class Parser(argparse.ArgumentParser):
    """argparse that returns exit code 2 with one line instead of printing usage and exiting."""

    def __init__(self, name: str, description: str):
        super().__init__(prog=f"tuneforge {name}", description=description)

    def error(self, message: str):
        raise BadArguments(f"{self.prog}: {message}")


class BadArguments(ValueError):
    pass
