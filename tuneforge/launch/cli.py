"""tuneforge: compose -> validate -> show -> submit. One direction; the task side is trainers/task.py.

tuneforge [--config FILE] [key=value ...] [--dry-run | --print-config] [--wait] [--force]
tuneforge -m key=a,b other=x,y [--dry-run] [--force]       # sweep: a run per combination, ONE Slurm job array
tuneforge status|logs|cancel|sync|export <run dir> ...      # follow and manage runs (tuneforge/commands/)
tuneforge --help [GROUP] | --completion bash|zsh    # launch/args.py: flags, help; follow.py: a local run
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from tuneforge.conf.schema import to_yaml
from tuneforge.launch import preflight, rundir, secrets, sweep
from tuneforge.launch.args import Args, parse
from tuneforge.launch.compose import checked, validator


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.problems:
        return _refuse(args.problems, "on the command line")
    if args.command:
        from tuneforge import commands

        return commands.main(args.command, args.rest)
    if args.help is not None or args.version or args.completion:
        return _inform(args)
    if leaked := secrets.in_overrides(args.overrides):  # before composing, whose errors echo values
        return _refuse(leaked)
    if args.multirun:
        return _sweep(args, argv)
    cfg, problems = checked(args.overrides, args.sources)  # compose, then validate: every problem at once
    if problems:
        return _refuse(problems)
    if args.print_config:
        print(to_yaml(cfg), end="", flush=True)
        return 0
    cfg = rundir.with_run_dir(cfg)
    report = preflight.check(cfg, validator(args.overrides, args.sources))
    refused = report.refused(force=args.force)  # does not fit, or the cluster or disk cannot take it
    if args.dry_run:
        return _show(cfg, report, refused)
    print(preflight.render(report), flush=True)
    if refused:
        print(preflight.refusal(report), file=sys.stderr)
        return 2
    from tuneforge.launch.submit import launch

    return launch(cfg, report, argv, wait=args.wait)


def _sweep(args: Args, argv: List[str]) -> int:
    plan = sweep.plan(args.overrides, sources=args.sources)
    if plan.problems or (sweep.misfits(plan) and not args.force and not args.dry_run):
        return _refuse(plan.problems or sweep.misfits(plan))
    return sweep.show(plan) if args.dry_run else sweep.launch(plan, argv)


def _refuse(problems: List[str], where: str = "in the config") -> int:
    print(f"tuneforge: {len(problems)} problem(s) {where}, nothing submitted:", file=sys.stderr)
    for problem in problems:
        print(f"  {secrets.redact(problem)}", file=sys.stderr)
    return 2


def _inform(args: Args) -> int:
    if args.completion:
        from tuneforge.launch.completion import script

        print(script(args.completion), end="")
    elif args.version:
        from importlib.metadata import version

        print(f"tuneforge {version('tuneforge')}")
    else:
        from tuneforge.launch.args import help_text

        print(help_text(args.help))
    return 0


def _show(cfg, report, refused: bool) -> int:
    print("# resolved config\n" + to_yaml(cfg) + "# validation: ok")
    if cfg.cluster.name == "slurm":
        from tuneforge.slurm.executors import sbatch_script

        print("# sbatch script\n" + sbatch_script(cfg.cluster, Path(cfg.run.dir) / "slurm"))
    print(preflight.render(report))
    print(f"# dry run: nothing submitted, {cfg.run.dir} not created", flush=True)
    if refused:
        print(preflight.refusal(report), file=sys.stderr)
    return 2 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
