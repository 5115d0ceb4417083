"""Sweeps: `tuneforge -m key=a,b other=x,y` -> one run per combination, submitted as ONE Slurm job array.

Hydra's own override grammar and its basic sweeper's cartesian product expand the sweep, so
`key=a,b`, `key=range(1,4)`, `key=choice(a,b)` and quoting mean here what they mean in Hydra.
Every element is composed and validated before anything is written or submitted. The layout:

    <sweep dir> = runs/<name>/<timestamp>/ (or run.dir)
        sweep.json          command, elements (index, overrides, run dir), array job id, W&B group
        slurm/              submitit's folder of the array: sbatch script, logs of every element
        0/ 1/ ...           one ordinary run dir per element (config.yaml, submit.json, checkpoints, ...)

All elements share one W&B group (logger.group, the sweep's id unless given). On Slurm the command
returns once the array is queued, and every element requeues itself like a single job does; with
cluster=local the elements run one after another in the foreground.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from tuneforge import fsutil
from tuneforge.conf.schema import Config
from tuneforge.launch import index, preflight, rundir
from tuneforge.launch import overrides as overrides_mod
from tuneforge.launch.compose import ConfigError, checked, validator
from tuneforge.launch.sources import Sources


@dataclass
class Sweep:
    directory: Path
    group: str
    overrides: List[List[str]]  # per element, as given to compose
    labels: List[List[str]]  # per element, the overrides that vary across the sweep
    configs: List[Config]  # per element, run.dir and logger.group fixed
    problems: List[str] = field(default_factory=list)
    reports: list = field(default_factory=list)  # per element, launch/preflight.py's Report

    @property
    def cluster(self):
        return self.configs[0].cluster


def expand(overrides: Sequence[str], sources: Optional[Sources] = None) -> Tuple[List[List[str]], List[List[str]]]:
    """Every element's full override list (the cartesian product of the sweep overrides, in Hydra's
    order), and its label: only the overrides that vary across the sweep. `glob()` over a group is
    expanded to the group's options first (Hydra's basic sweeper needs an app's config loader for it)."""
    from hydra.errors import HydraException

    from tuneforge.compat import hydra as hydra_compat

    problems = overrides_mod.problems(overrides, multirun=True)
    if problems:
        raise ConfigError(problems)
    try:
        parsed, elements = hydra_compat.sweep_elements(overrides_mod.expand_globs(overrides, sources))
    except HydraException as e:
        raise ConfigError([f"sweep: {str(e).strip().splitlines()[0]}"]) from None
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    labels = [[o for o in element if o.split("=", 1)[0] in swept] for element in elements]
    return elements, labels


def plan(overrides: Sequence[str], now: Optional[float] = None, sources: Optional[Sources] = None) -> Sweep:
    """Compose and validate every element; `problems` lists them all, each prefixed with its element
    (a problem that every element has is listed once, without a prefix)."""
    try:
        elements, labels = expand(overrides, sources)
    except ConfigError as e:
        return Sweep(Path(), "", [], [], [], e.problems)
    composed, per_element = [], []
    for element in elements:
        cfg, found = checked(element, sources)
        per_element.append(found)
        if cfg is not None:
            composed.append(cfg)
    shared = set.intersection(*(set(p) for p in per_element)) if len(per_element) > 1 else set()
    problems = [p for p in per_element[0] if p in shared] if per_element else []
    for i, (label, found) in enumerate(zip(labels, per_element)):
        problems += [f"element {i} ({' '.join(label)}): {p}" for p in found if p not in shared]
    if problems:
        return Sweep(Path(), "", elements, labels, [], problems)
    if any(c.cluster != composed[0].cluster for c in composed):
        problems.append(
            "cluster: a sweep is one Slurm job array, so every element needs the same cluster "
            "settings; sweep cluster.* keys in separate submissions"
        )
    directory = Path(rundir.with_run_dir(composed[0], now).run.dir)
    group = composed[0].logger.group or f"{composed[0].run.name}-{directory.name}"
    configs = [_element_config(cfg, directory / str(i), group) for i, cfg in enumerate(composed)]
    reports = [preflight.check(cfg, validator(element, sources)) for cfg, element in zip(configs, elements)]
    problems += [f"element {i} ({' '.join(labels[i])}): {p}" for i, r in enumerate(reports) for p in r.problems]
    return Sweep(directory, group, elements, labels, configs, problems, reports)


def misfits(sweep: Sweep) -> List[str]:
    """The elements that the preflight estimates do not fit in GPU or host memory (refused unless --force)."""
    return [
        f"element {i} ({' '.join(label)}): {preflight.refusal(report).replace('tuneforge: ', '', 1)}"
        for i, (label, report) in enumerate(zip(sweep.labels, sweep.reports))
        if report.misfit
    ]


def _element_config(cfg: Config, run_dir: Path, group: str) -> Config:
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)), logger=dataclasses.replace(cfg.logger, group=group)
    )


def show(sweep: Sweep) -> int:
    """--dry-run: the elements, and the sbatch script of the array (Slurm)."""
    print(f"# sweep of {len(sweep.configs)} element(s) into {sweep.directory} (W&B group {sweep.group})")
    for i, (label, cfg) in enumerate(zip(sweep.labels, sweep.configs)):
        print(f"{i:>4}  {cfg.run.dir}  {' '.join(label)}")
    print("# validation: ok (every element)")
    for i, report in enumerate(sweep.reports):
        print(f"# element {i}\n{preflight.render(report)}")
    if sweep.cluster.name == "slurm":
        from tuneforge.slurm.executors import sbatch_script

        print(f"# sbatch script (one job array of {len(sweep.configs)})")
        print(sbatch_script(sweep.cluster, sweep.directory / "slurm", array_size=len(sweep.configs)))
    else:
        print("# cluster=local: the elements run one after another in the foreground")
    print(f"# dry run: nothing submitted, {sweep.directory} not created")
    for problem in misfits(sweep):
        print(f"tuneforge: {problem}", file=sys.stderr)
    return 2 if misfits(sweep) else 0


def launch(sweep: Sweep, argv: Sequence[str], job_class=None) -> int:
    """Write the sweep dir and every run dir, then submit the array (Slurm) or run each (local).
    Resubmitted into the same dir, the finished elements are left as they are (rundir.check).
    `job_class`: what every element runs (launch/submit.py `submit`)."""
    problems, done = [], []
    for i, cfg in enumerate(sweep.configs):
        try:
            rundir.check(cfg)
        except rundir.NotSubmitted as e:
            (done if e.code == 0 else problems).extend(
                f"element {i} ({' '.join(sweep.labels[i])}): {x}" for x in e.lines
            )
    if problems or len(done) == len(sweep.configs):
        return rundir.NotSubmitted(problems or done, code=2 if problems else 0).report()
    for line in done:
        print(f"tuneforge: {line}", flush=True)
    todo = [i for i in range(len(sweep.configs)) if not any(line.startswith(f"element {i} ") for line in done)]
    sweep.directory.mkdir(parents=True, exist_ok=True)
    run_dirs = [Path(cfg.run.dir) for cfg in sweep.configs]
    try:
        for i in todo:
            rundir.create(sweep.configs[i], sweep.overrides[i])
            preflight.save(sweep.reports[i], run_dirs[i])
    except rundir.NotSubmitted as e:  # lost a race for a run dir
        return e.report()
    record = {
        "command": "tuneforge " + " ".join(shlex.quote(a) for a in argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "group": sweep.group,
        "cluster": sweep.cluster.name,
        "folder": str(sweep.directory / "slurm"),
        "array_job_id": None,
        "elements": [
            {"index": i, "label": " ".join(label), "overrides": e, "run_dir": str(d)}
            for i, (e, label, d) in enumerate(zip(sweep.overrides, sweep.labels, run_dirs))
        ],
    }
    _write(sweep.directory, record)
    index.add(sweep.directory, "sweep", argv)
    print(f"sweep {sweep.directory}: {len(run_dirs)} element(s), W&B group {sweep.group}", flush=True)
    if sweep.cluster.name == "local":
        return _run_locally(sweep, run_dirs, todo, job_class)
    from tuneforge.launch.submit import submit

    jobs = submit([sweep.configs[i] for i in todo], [run_dirs[i] for i in todo], sweep.directory / "slurm", job_class)
    record["array_job_id"] = str(jobs[0].job_id).split("_")[0]
    _write(sweep.directory, record)
    print(
        f"array job {record['array_job_id']} ({len(jobs)} elements)\nlogs {sweep.directory / 'slurm'}\n"
        f"follow with: tuneforge status {sweep.directory}",
        flush=True,
    )
    return 0


def _run_locally(sweep: Sweep, run_dirs: List[Path], todo: List[int], job_class=None) -> int:
    from tuneforge.launch.follow import EXIT_INTERRUPTED, follow
    from tuneforge.launch.submit import submit

    worst = 0
    for i in todo:
        cfg, run_dir = sweep.configs[i], run_dirs[i]
        print(f"[{i + 1}/{len(run_dirs)}] {' '.join(sweep.labels[i])} -> {run_dir}", flush=True)
        (job,) = submit([cfg], [run_dir], run_dir / "slurm", job_class)
        code = follow(job, run_dir, cfg.train.max_steps, cfg.cluster.name)
        if code == EXIT_INTERRUPTED:
            left = len(run_dirs) - i - 1
            print(
                f"sweep stopped, {left} element(s) not run; to continue: the same command with run.dir={sweep.directory}"
            )
            return code
        worst = max(worst, code)
    return worst


def _write(directory: Path, record: dict) -> None:
    fsutil.write_json(directory / "sweep.json", record)


def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / "sweep.json").is_file()


def read(path: Path) -> dict:
    return json.loads((Path(path) / "sweep.json").read_text())
