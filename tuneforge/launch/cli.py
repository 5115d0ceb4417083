"""tuneforge: compose -> validate -> show -> submit. One direction; the task side is trainers/task.py.

    tuneforge [key=value ...] [--dry-run] [--wait] [--force]   # train (locally, or submit to Slurm)
    tuneforge -m key=a,b other=x,y [--dry-run] [--force]       # sweep: a run per combination, ONE Slurm job array
    tuneforge status|logs|cancel|sync|export|compare <run dir>  # follow and manage runs (tuneforge/commands/)
    tuneforge models|probe|generate ...                         # choose a base model, see what it answers
(--force: submit although the preflight estimates that a job does not fit in GPU memory)
"""

from __future__ import annotations

import sys
from typing import List, Optional

from tuneforge.commands import COMMANDS
from tuneforge.conf.schema import to_yaml
from tuneforge.launch import preflight, rundir, sweep
from tuneforge.launch.compose import ConfigError, compose, validator
from tuneforge.launch.validate import validate

FLAGS = {"--dry-run", "--wait", "--force", "--help", "-h", "-m", "--multirun"}
USAGE = __doc__


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        from tuneforge import commands

        return commands.main(argv[0], argv[1:])
    flags = {a for a in argv if a.startswith("-")}
    overrides = [a for a in argv if not a.startswith("-")]
    if flags & {"--help", "-h"} or flags - FLAGS:
        unknown = sorted(flags - FLAGS)
        print((f"unknown option {', '.join(unknown)}\n" if unknown else "") + USAGE, file=sys.stderr)
        return 2 if unknown else 0
    if flags & {"-m", "--multirun"}:
        return _sweep(overrides, argv, dry_run="--dry-run" in flags, force="--force" in flags)
    try:
        cfg = compose(overrides)
    except ConfigError as e:
        return _refuse([str(e)])
    problems = validate(cfg)
    if problems:
        return _refuse([str(p) for p in problems])
    cfg = rundir.with_run_dir(cfg)
    report = preflight.check(cfg, validator(overrides))
    refused = report.fits is False and "--force" not in flags
    if "--dry-run" in flags:
        return _show(cfg, report, refused)
    print(preflight.render(report), flush=True)
    if refused:
        print(preflight.refusal(report), file=sys.stderr)
        return 2
    from tuneforge.launch.submit import follow, submit

    run_dir = rundir.create(cfg, argv)
    preflight.save(report, run_dir)
    (job,) = submit([cfg], [run_dir], run_dir / "slurm")
    print(f"job {job.job_id} ({cfg.cluster.name})\nrun dir {run_dir}\nlogs {job.paths.stdout}", flush=True)
    if cfg.cluster.name == "local" or "--wait" in flags:
        return follow(job, run_dir, cfg.train.max_steps)
    return 0


def _sweep(overrides: List[str], argv: List[str], dry_run: bool, force: bool) -> int:
    try:
        plan = sweep.plan(overrides)
    except ConfigError as e:
        return _refuse([str(e)])
    if plan.problems or (sweep.misfits(plan) and not force and not dry_run):
        return _refuse(plan.problems or sweep.misfits(plan))
    return sweep.show(plan) if dry_run else sweep.launch(plan, argv)


def _refuse(problems: List[str]) -> int:
    print(f"tuneforge: {len(problems)} problem(s) in the config, nothing submitted:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 2


def _show(cfg, report, refused: bool) -> int:
    from pathlib import Path

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
