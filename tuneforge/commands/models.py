"""`tuneforge models [--domain D] [--kind base|instruct] [--fits "<overrides>"]`: the model catalog.

Every preset under conf/model/ with its catalog entry (conf/catalog.yaml): family, parameters, context,
licence, gated, base or instruct, domains, release date. `--fits "cluster=mysite method=lora ..."`
composes each preset with those overrides and runs the preflight on it (the same estimate as
`--dry-run`, offline: the presets carry config.json's sizes), listing what fits first, cheapest first.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from typing import List, Optional

from tuneforge.commands import BadArguments, Parser


def main(args: List[str]) -> int:
    """List the catalog's presets, optionally those of a domain, and (--fits) what fits a cluster and method."""
    from tuneforge.conf import catalog

    parser = Parser("models", main.__doc__)
    parser.add_argument("--domain", help=f"only models for this domain: {', '.join(catalog.DOMAINS)}")
    parser.add_argument("--kind", choices=("base", "instruct"), help="only base (pretrained) or instruct models")
    parser.add_argument(
        "--fits",
        metavar="OVERRIDES",
        help='the training you plan, as overrides: "cluster=slurm cluster.gpu_type=a100_80g method=lora"',
    )
    opts = parser.parse_args(args)
    chosen = select(catalog.entries(), opts.domain, opts.kind)
    if opts.fits is None:
        print(render_catalog(chosen))
        return 0
    overrides = shlex.split(opts.fits)
    rows = estimates(chosen, overrides)
    print(render_fits(rows, overrides))
    return 0


def select(entries: dict, domain: Optional[str], kind: Optional[str]) -> list:
    """The entries of `domain` and `kind`; BadArguments naming the option when none matches."""
    from tuneforge.conf import catalog

    chosen = list(entries.values())
    if domain is not None:
        chosen = [e for e in chosen if domain in e.domains]
        if not chosen:
            known = sorted({d for e in entries.values() for d in e.domains} | set(catalog.DOMAINS))
            raise BadArguments(f"--domain: no model in the catalog has domain '{domain}'; domains: {', '.join(known)}")
    if kind is not None:
        chosen = [e for e in chosen if e.kind == kind]
        if not chosen:
            raise BadArguments(f"--kind: no {'' if domain is None else domain + ' '}model of kind '{kind}'")
    return chosen


@dataclasses.dataclass
class Row:
    entry: object  # catalog.Entry
    model: object  # the preset's ModelConfig
    report: object = None  # launch/preflight.Report; None when validation refused the config
    problem: str = ""  # the first validation problem


def estimates(entries: list, overrides: List[str]) -> List[Row]:
    """The preflight of each preset composed with `overrides` (BadArguments when they do not compose)."""
    from tuneforge.launch import preflight, rundir
    from tuneforge.launch.compose import ConfigError, compose, group_option
    from tuneforge.launch.validate import validate

    per_preset = any(o.lstrip("+~").startswith("model") for o in overrides)  # else compose once, swap the model
    try:
        base = None if per_preset else compose([*overrides, f"model={entries[0].preset}"])
    except ConfigError as e:
        raise BadArguments(f"--fits: {e}") from None
    rows = []
    for entry in entries:
        try:
            if per_preset:
                cfg = compose([f"model={entry.preset}", *overrides])
            else:
                cfg = dataclasses.replace(base, model=group_option("model", entry.preset))
        except ConfigError as e:
            raise BadArguments(f"--fits: {e}") from None
        problems = validate(cfg)
        if problems:
            rows.append(Row(entry, cfg.model, problem=str(problems[0])))
            continue
        rows.append(Row(entry, cfg.model, preflight.check(rundir.with_run_dir(cfg))))
    return rows


# ------------------------------------------------------------------------------------------ output
def _params(entry, model) -> str:
    """The declared size; a mixture of experts also its parameters used per token, counted from the
    preset's sizes by tuneforge/arch (the preflight's reading; families it reads, so that listing the
    catalog never builds a model on the meta device)."""
    from tuneforge.arch.families import FAMILIES
    from tuneforge.launch import preflight

    total = f"{model.params_b:g}B" if model.params_b else "?"
    if model.model_type not in FAMILIES:
        return total
    shape, _ = preflight.model_shape(model)
    return total + (f" ({shape.active_params() / 1e9:.1f}B active)" if shape is not None and shape.is_moe else "")


def _context(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def render_catalog(entries: list) -> str:
    from tuneforge.launch.compose import group_option

    header = ("preset", "hub id", "family", "params", "context", "licence", "gated", "kind", "domains", "released")
    lines = []
    for e in entries:
        model = group_option("model", e.preset)
        lines.append(
            (
                e.preset,
                model.name_or_path,
                e.family,
                _params(e, model),
                _context(e.context),
                e.licence,
                "yes" if e.gated else "no",
                e.kind,
                ",".join(e.domains),
                e.released,
            )
        )
    note = f'{len(entries)} model(s). Use one with model=<preset>; `--fits "<overrides>"` for the preflight.'
    return _table(header, lines) + "\n" + note


def render_fits(rows: List[Row], overrides: List[str]) -> str:
    from tuneforge import units

    fits = [r for r in rows if r.report is not None and r.report.available and r.report.fits is not False]
    too_big = [r for r in rows if r.report is not None and r.report.fits is False]
    no_estimate = [r for r in rows if r.report is not None and not r.report.available]
    refused = [r for r in rows if r.report is None]
    fits.sort(key=lambda r: (r.report.gpu_hours if r.report.gpu_hours is not None else 0.0, r.report.memory.total))
    header = ("preset", "params", "context", "licence", "kind", "domains", "GiB/GPU", "limit", "GPU-h")
    first = (fits or too_big or [None])[0]
    what = _plan(first.report) if first is not None else " ".join(overrides)

    def table(chosen: List[Row]) -> str:
        lines = []
        for r in chosen:
            rep = r.report
            limit = "-" if rep.gpu_memory is None else f"{units.gib(rep.gpu_memory)} {'ok' if rep.fits else 'NO'}"
            hours = "-" if rep.gpu_hours is None else f"{rep.gpu_hours:.2f}"
            e = r.entry
            lines.append(
                (e.preset, _params(e, r.model), _context(e.context), e.licence, e.kind, ",".join(e.domains))
                + (units.gib(rep.memory.total), limit, hours)
            )
        return _table(header, lines) if lines else "  (none)"

    checked = any(r.report.gpu_memory is not None for r in fits + too_big)
    out = [f"# {len(fits)} model(s) {'fit' if checked else 'estimated'}: {what}", table(fits)]
    if too_big:
        too_big.sort(key=lambda r: r.report.memory.total)
        again = f"tuneforge model=<preset> {' '.join(overrides)} --dry-run"
        out += [f"# {len(too_big)} do not fit (`{again}` lists changes that do):", table(too_big)]
    for r in no_estimate:
        out.append(f"  {r.entry.preset}: no estimate ({r.report.reason})")
    for r in refused:
        out.append(f"  {r.entry.preset}: refused: {r.problem}")
    if not checked and fits:
        out.append("# memory not checked: give cluster.gpu_type (or cluster.gpu_memory_gb) with cluster.gpus_per_node")
    return "\n".join(out)


def _plan(report) -> str:
    j, m = report.job, report.method
    return (
        f"{m.name} on {j.layout.kind} x {j.world_size} {report.gpu_label}, micro_batch {j.micro_batch} x seq_len "
        f"{j.seq_len}, {j.dtype}, {report.steps_left} steps"
    )


def _table(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*map(str, row)).rstrip() for row in [header, *rows])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
