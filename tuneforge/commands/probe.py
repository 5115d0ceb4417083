"""`tuneforge probe <overrides> [--dry-run] [--wait]`: which base model is closest to your data?

    tuneforge probe model=qwen2_5_0_5b,llama3_2_1b,smollm2_1_7b data=text_files data.path=/data/domain/ \\
                    method=lora cluster=slurm cluster.gpu_type=a100_80g ...
    tuneforge probe 'model.name_or_path=/models/a,/models/b' model=hf data=chat_jsonl data.path=chats.jsonl
    tuneforge probe <probe dir>                          # the table again (on Slurm: as elements finish)

The candidates are ordinary overrides, swept with Hydra's syntax as `tuneforge -m` sweeps are
(launch/sweep.py): every candidate is a composed, validated Config of the training you plan (method,
backend, cluster), run as one job array on Slurm (an element per candidate, each requeued like a
training job) or one after another here. Each scores its model on the same sample of your data and on
a general-text slice (trainers/probe.py); the table ranks them by bits per byte on your data, with the
gap to general text, tokens per word, parameters, context, licence (conf/catalog.yaml), and the
preflight's fit and GPU-hours for the planned training, then one recommendation line. All of it is in
<probe dir>/probe.json (trainers/probe_report.py); each candidate logs to W&B (one group per probe).
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import List

from tuneforge.commands import BadArguments

FLAGS = {"--dry-run", "--wait", "--help", "-h"}


def main(args: List[str]) -> int:
    from tuneforge.trainers import probe_report

    if args in (["--help"], ["-h"]):
        print(__doc__)
        return 0
    flags = {a for a in args if a.startswith("-")}
    if flags - FLAGS:
        raise BadArguments(
            f"tuneforge probe: unknown option {', '.join(sorted(flags - FLAGS))}; options: --dry-run, --wait"
        )
    overrides = [a for a in args if not a.startswith("-")]
    if len(overrides) == 1 and "=" not in overrides[0]:
        path = Path(overrides[0]).expanduser().resolve()
        if not probe_report.is_probe_dir(path):
            raise BadArguments(f"tuneforge probe: {path} is not a probe directory (no probe.json)")
        print(probe_report.render(_annotated(probe_report.update(path))))
        return 0
    return _probe(overrides, args, dry_run="--dry-run" in flags, wait="--wait" in flags)


def _probe(overrides: List[str], argv: List[str], dry_run: bool, wait: bool) -> int:
    from tuneforge.launch import sweep
    from tuneforge.launch.cli import _refuse, _submit
    from tuneforge.launch.compose import ConfigError
    from tuneforge.slurm.job import ProbeJob
    from tuneforge.trainers import probe_report

    if not any(o.split("=", 1)[0] == "run.name" for o in overrides):
        overrides = ["run.name=probe", *overrides]
    try:
        plan = sweep.plan(overrides)
    except ConfigError as e:
        return _refuse([str(e)])
    problems = plan.problems or list(_candidate_problems(plan))
    if problems:
        return _refuse(problems)
    if dry_run:
        print("# the candidates' jobs score them; the preflight shown is of the training planned for each")
        sweep.show(plan)
        return 0
    _write_record(plan, argv)  # before the jobs start: each updates it when it ends
    code = _submit(sweep.launch, plan, ["probe", *argv], job_class=ProbeJob)  # Ctrl-C from here: "check status"
    record = probe_report.update(plan.directory)
    if plan.cluster.name == "local" or wait:
        if plan.cluster.name != "local":
            code = _wait(plan)
            record = probe_report.update(plan.directory)
        print(probe_report.render(_annotated(record)), flush=True)
        print(f"probe.json: {plan.directory / probe_report.PROBE}")
    else:
        print(f"the ranking, as the candidates finish: tuneforge probe {plan.directory}", flush=True)
    return code


def _candidate_problems(plan):
    """The probe scores trained weights: a candidate built at random (model=tiny) is refused."""
    for i, (cfg, label) in enumerate(zip(plan.configs, plan.labels)):
        if cfg.data.sources:
            yield (
                f"element {i} ({' '.join(label)}): data.sources: the probe scores one dataset, not a mixture; "
                "give it with data.path (or data.hub_id) and its format"
            )
        if cfg.model.kind != "hf":
            yield (
                f"element {i} ({' '.join(label)}): model: the probe scores a trained model, and model={cfg.model.kind} "
                "is built at random; give model=<preset> (tuneforge models) or model=hf model.name_or_path=<id or dir>"
            )


def _write_record(plan, argv: List[str]) -> None:
    """probe.json: the candidates, their catalog facts and the preflight of the planned training."""
    from tuneforge import fsutil
    from tuneforge.conf import catalog
    from tuneforge.trainers import probe_report

    first = plan.configs[0]
    candidates = []
    for i, (cfg, label, report) in enumerate(zip(plan.configs, plan.labels, plan.reports)):
        entry = catalog.lookup(cfg.model)
        facts = dataclasses.asdict(entry) if entry else {}
        if entry:
            facts["params_b"] = cfg.model.params_b
        pre = report.to_dict()
        candidates.append(
            {
                "index": i,
                "label": " ".join(label) or str(cfg.model.name_or_path),
                "model": cfg.model.name_or_path,
                "run_dir": cfg.run.dir,
                "catalog": facts,
                "preflight": {
                    k: pre.get(k)
                    for k in ("available", "source", "fits", "total_gib", "gpu_memory_gib", "gpu_hours", "gpu")
                },
            }
        )
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "tuneforge " + " ".join(shlex.quote(a) for a in ["probe", *argv]),
        "data": first.data.path or first.data.hub_id or first.data.name,
        "format": first.data.format,
        "examples": first.probe.examples,
        "general": first.probe.general,
        "large_gap": first.probe.large_gap,
        "planned": {"method": first.method.name, "text": _planned(plan.reports[0], first)},
        "candidates": candidates,
    }
    plan.directory.mkdir(parents=True, exist_ok=True)
    fsutil.write_json(plan.directory / probe_report.PROBE, record)


def _planned(report, cfg) -> str:
    if not report.available:
        return f"{cfg.method.name} on {cfg.backend.name} x {cfg.cluster.nodes * cfg.cluster.tasks_per_node}"
    j = report.job
    return (
        f"{report.method.name} on {j.layout.kind} x {j.world_size} {report.gpu_label}, "
        f"seq_len {j.seq_len}, {j.dtype}, {report.steps_left} steps"
    )


def _annotated(record: dict) -> dict:
    """Candidates without a result: the error their job recorded (events.jsonl), when it failed."""
    from tuneforge.slurm import events

    for c in record["candidates"]:
        if c.get("result") is None:
            failed = [e for e in events.read(Path(c["run_dir"])) if e["event"] == "failed"]
            if failed:
                c["error"] = "failed: " + failed[-1]["error"][:60]
    return record


def _wait(plan) -> int:
    """Until every element of the array has ended; 1 when any failed."""
    from tuneforge.commands import runinfo

    dirs = [Path(c.run.dir) for c in plan.configs]
    while True:
        infos = runinfo.gather(dirs)
        if all(i.state in runinfo.FINAL_STATES for i in infos):
            return int(any(i.state != "COMPLETED" for i in infos))
        time.sleep(5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
