"""The command line before composing: flags, subcommands, `--help`, and the config keys they offer.

    tuneforge [--config FILE] [group=option ...] [key=value ...] [flags]
    tuneforge -m key=a,b ...                 # a sweep
    tuneforge <command> ...                  # status, logs, cancel, ... (commands/: COMMANDS)

Flags are one table (FLAGS) read by the parser, `--help` and shell completion (launch/completion.py).
Hydra's own flags are refused with the tuneforge flag that does the same. A first word that is no
command and no override gets "did you mean".
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import io
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tuneforge.launch import sources as sources_mod
from tuneforge.launch.sources import Sources


@dataclass(frozen=True)
class Flag:
    names: Tuple[str, ...]
    attr: str
    help: str
    metavar: str = ""  # a flag that takes a value
    choices: Tuple[str, ...] = ()


FLAGS = (
    Flag(("--config",), "config", "a YAML file of groups and values, or a run dir (its config.yaml)", "FILE"),
    Flag(("--config-dir", "-cd"), "config_dirs", "a directory of your own group options (and config files)", "DIR"),
    Flag(("--config-name", "-cn"), "config_name", "the config file NAME.yaml from the config directories", "NAME"),
    Flag(("-m", "--multirun"), "multirun", "a sweep: one run per combination (one Slurm job array)"),
    Flag(("--dry-run",), "dry_run", "resolved config, validation, preflight and sbatch script; submits nothing"),
    Flag(("--print-config",), "print_config", "only the resolved config, as YAML (a file --config reads)"),
    Flag(("--wait",), "wait", "on Slurm: wait for the job and exit with its outcome"),
    Flag(("--force",), "force", "submit although the preflight estimates that the job does not fit"),
    Flag(("--completion",), "completion", "print the shell completion script", "SHELL", ("bash", "zsh")),
    Flag(("--version",), "version", "print the version"),
    Flag(("-h", "--help"), "help", "this help; --help GROUP: the keys of a group or section"),
)
#: Hydra's flags -> what to use here; those in HYDRA_VALUE take a value
HYDRA_FLAGS = {
    "--cfg": "--print-config (the resolved config as YAML)",
    "-c": "--print-config (the resolved config as YAML); --config FILE reads one",
    "--config-path": "--config-dir DIR (a directory on disk) or --config FILE",
    "-cp": "--config-dir DIR (a directory on disk) or --config FILE",
    "--info": "--help (groups, options, search path)",
    "-i": "--help (groups, options, search path)",
    "--resolve": "--print-config (it prints the config resolved)",
    "--package": "--help GROUP (a group's keys)",
    "-p": "--help GROUP (a group's keys)",
    "--hydra-help": "--help",
    "--shell-completion": "--completion bash|zsh",
    "-sc": "--completion bash|zsh",
    "--run": "no flag (a single run is the default)",
    "-r": "no flag (a single run is the default)",
    "--experimental-rerun": "--config <run dir> (its saved config.yaml)",
}
HYDRA_VALUE = {
    "--cfg",
    "-c",
    "--config-path",
    "-cp",
    "--package",
    "-p",
    "--shell-completion",
    "-sc",
    "--experimental-rerun",
}
SECTIONS = ("train", "debug", "run")


@dataclass
class Args:
    command: Optional[str] = None  # a subcommand; `rest` are its arguments
    rest: List[str] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)
    config: Optional[str] = None
    config_dirs: List[str] = field(default_factory=list)
    config_name: Optional[str] = None
    multirun: bool = False
    dry_run: bool = False
    print_config: bool = False
    wait: bool = False
    force: bool = False
    completion: Optional[str] = None
    version: bool = False
    help: Optional[str] = None  # "" for --help, else its topic
    problems: List[str] = field(default_factory=list)
    sources: Sources = field(default_factory=Sources)


def commands() -> Dict[str, str]:
    """command -> its module, from tuneforge/commands/ (the one table of subcommands)."""
    from tuneforge.commands import COMMANDS

    return COMMANDS


def parse(argv: List[str]) -> Args:
    args = Args()
    if argv and argv[0] in commands():
        args.command, args.rest = argv[0], list(argv[1:])
        return args
    by_name = {name: f for f in FLAGS for name in f.names}
    i = 0
    while i < len(argv):
        word = argv[i]
        name, eq, inline = word.partition("=") if word.startswith("--") else (word, "", "")
        flag = by_name.get(name)
        if flag is not None and flag.metavar:
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
            i += 1 if eq else 2
            if value is None:
                args.problems.append(f"{name}: give a value ({name} {flag.metavar})")
            elif flag.choices and value not in flag.choices:
                args.problems.append(f"{name}: '{value}' is not one of {', '.join(flag.choices)}")
            elif flag.attr == "config_dirs":
                args.config_dirs.append(value)
            else:
                setattr(args, flag.attr, value)
            continue
        i += 1
        if flag is not None:
            if flag.attr == "help":  # --help GROUP
                topic = argv[i] if i < len(argv) and argv[i] in (*sources_mod.groups(), *SECTIONS) else ""
                args.help, i = topic, i + (1 if topic else 0)
            else:
                setattr(args, flag.attr, True)
        elif name in HYDRA_FLAGS:
            args.problems.append(f"{name}: a Hydra flag that tuneforge does not take; use {HYDRA_FLAGS[name]}")
            i += 1 if name in HYDRA_VALUE and not eq and i < len(argv) and not argv[i].startswith("-") else 0
        elif word.startswith("-"):
            args.problems.append(_unknown_option(name, by_name))
        elif "=" in word or word.startswith(("+", "~")):
            args.overrides.append(word)
        elif not args.overrides and not _is_key(word):
            args.problems.append(_unknown_word(word))
        else:
            args.overrides.append(word)  # composing says what is wrong with it
    args.sources, problems = _sources(args)
    args.problems += problems
    return args


def _sources(args: Args) -> Tuple[Sources, List[str]]:
    dirs = tuple(Path(d).expanduser() for d in args.config_dirs)
    problems = [f"--config-dir: {d} is not a directory" for d in dirs if not d.is_dir()]
    file = Path(args.config).expanduser() if args.config else None
    if args.config_name and args.config:
        problems.append("--config-name: give either --config FILE or --config-name NAME, not both")
    elif args.config_name and args.config_name not in ("train", "train.yaml"):  # train: the shipped primary
        file, problem = sources_mod.find_config(args.config_name, Sources(dirs))
        problems += [problem] if problem else []
    return Sources(dirs, file), problems


def _unknown_option(name: str, by_name) -> str:
    close = difflib.get_close_matches(name, list(by_name), n=1)
    return f"unknown option {name}" + (f"; did you mean {close[0]}?" if close else "; see tuneforge --help")


def _unknown_word(word: str) -> str:
    close = difflib.get_close_matches(word, list(commands()), n=1, cutoff=0.6)
    if close:
        return f"unknown command '{word}'; did you mean {close[0]}?"
    if word.endswith((".yaml", ".yml")) or Path(word, "config.yaml").is_file():
        return f"{word}: a config file? give it as --config {word}"
    return (
        f"unknown command '{word}'; commands: {', '.join(commands())}; or give key=value overrides (tuneforge --help)"
    )


def _is_key(word: str) -> bool:
    head = word.lstrip("+~").split(".")[0].split("=")[0]
    return head in (*sources_mod.groups(), *SECTIONS)


# ---------------------------------------------------------------------------------------- keys
def schemas(group: str) -> Dict[str, type]:
    """option (or the group itself) -> schema dataclass, for the groups and the sections."""
    from tuneforge.conf import schema

    if group in schema.BY_NAME:
        return dict(schema.BY_NAME[group])
    fields = {f.name: f.type for f in dataclasses.fields(schema.Config)}
    cls = getattr(schema, fields[group]) if isinstance(fields.get(group), str) else fields.get(group)
    return {group: cls} if cls is not None else {}


def keys(group: str) -> Dict[str, dataclasses.Field]:
    """Every key of a group or section over all its schemas: name -> its field (the first seen)."""
    out: Dict[str, dataclasses.Field] = {}
    for cls in schemas(group).values():
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, f)
    return out


def choices_of(f: dataclasses.Field) -> Tuple[str, ...]:
    if "choices" in f.metadata:
        return tuple(str(c) for c in f.metadata["choices"])
    return ("true", "false") if f.type in (bool, "bool") else ()


def field_docs(cls: type) -> Dict[str, str]:
    """field -> its comment in the schema's source (the trailing one, else the comment lines just above)."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
        lines = source.splitlines()
        for node in ast.parse(source).body[0].body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            text = comments.get(node.end_lineno, "")
            row = node.lineno - 1
            while not text and row > 0 and lines[row - 1].strip().startswith("#"):
                row -= 1
            if not text and row < node.lineno - 1:
                text = " ".join(comments[r] for r in range(row + 1, node.lineno))
            docs[node.target.id] = text or docs.get(node.target.id, "")
    return docs


# ---------------------------------------------------------------------------------------- help
EXAMPLES = (
    ("tuneforge", "the default run: a 2-layer Llama pretrained on the bundled corpus, 2 CPU processes"),
    ("tuneforge experiment=smoke --dry-run", "what a run would do: config, preflight; nothing submitted"),
    ("tuneforge --config my.yaml train.lr=3e-4", "a config file, changed on the command line"),
    ("tuneforge --config runs/default/<stamp>", "a run again, as it was (its saved config.yaml)"),
    ("tuneforge model=llama3_8b method=lora cluster=mysite data=chat_jsonl data.path=chats.jsonl", "a site profile"),
    ("tuneforge -m method=lora,dora train.lr=1e-4,3e-4 cluster=slurm", "a sweep: ONE Slurm job array"),
    ("tuneforge --print-config > full.yaml", "every key, resolved, as YAML"),
    ("tuneforge status", "the newest run, wherever it was written"),
    ('eval "$(tuneforge --completion bash)"', "tab completion of commands, groups, options and keys"),
)


def help_text(topic: str = "") -> str:
    if topic:
        return group_help(topic)
    width = max(len(", ".join(f.names) + (f" {f.metavar}" if f.metavar else "")) for f in FLAGS)
    out = [
        "usage: tuneforge [--config FILE] [group=option ...] [key=value ...] [--dry-run | --print-config] [--wait]",
        "       tuneforge -m key=a,b [key=x,y ...] [--dry-run]     a sweep",
        "       tuneforge <command> ...                              on submitted runs (tuneforge <command> --help)",
        "",
        "Composes a run from config groups, validates it, shows the preflight and submits it: processes on this",
        "machine (cluster=local, in the foreground) or a Slurm job (cluster=slurm, returns at once).",
        "",
        "commands:",
    ]
    summaries = command_summaries()
    cw = max(map(len, summaries))
    out += [f"  {name.ljust(cw)}  {text}" for name, text in summaries.items()]
    out += ["", "groups (group=option; * the default):"]
    defaults = sources_mod.defaults()
    gw = max(len(g) for g in sources_mod.groups())
    for group in sources_mod.groups():
        opts = [o + ("*" if o == defaults.get(group) else "") for o in sources_mod.options(group)]
        out.append(f"  {group.ljust(gw)}  {', '.join(opts) or '-'}")
    out.append(f"  sections: {', '.join(SECTIONS)}; `tuneforge --help GROUP` lists the keys of a group or section")
    out += ["", "options:"]
    for f in FLAGS:
        spec = ", ".join(f.names) + (f" {f.metavar}" if f.metavar else "")
        out.append(f"  {spec.ljust(width)}  {f.help}")
    out += ["", "examples:"]
    ew = max(len(c) for c, _ in EXAMPLES if len(c) <= 50)
    for command, text in EXAMPLES:
        out += (
            [f"  {command.ljust(ew)}  {text}"] if len(command) <= ew else [f"  {command}", f"  {''.ljust(ew)}  {text}"]
        )
    dirs = sources_mod.search_path()[0]
    out += [
        "",
        f"config search path (your own options, e.g. cluster/mysite.yaml): --config-dir DIR, "
        f"${sources_mod.PATH_VARIABLE}, {sources_mod.user_dir()}",
        f"  now: {', '.join(map(str, dirs)) or 'none'}",
    ]
    return "\n".join(out)


def command_summaries() -> Dict[str, str]:
    """command -> the one line its module's docstring starts with (read, not imported)."""
    out = {}
    for name, module in commands().items():
        spec = importlib.util.find_spec(f"tuneforge.commands.{module}")
        try:
            doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
        except (OSError, SyntaxError, AttributeError):
            doc = ""
        first = doc.strip().splitlines()[0] if doc.strip() else ""
        usage, _, text = first.partition("`: ")
        out[usage.strip("`").removeprefix("tuneforge ") if text else name] = text or first
    return out


def group_help(group: str) -> str:
    """The keys of a group or section: type, default, allowed values, and the schema's comment."""
    from tuneforge.conf.fields import describe

    if group == "experiment":
        return "\n".join(
            ["experiment=NAME: a delta over the config (# @package _global_)", *map(_about, _experiments())]
        )
    per_schema = schemas(group)
    if not per_schema:
        return f"{group}: not a group or section; groups: {', '.join(sources_mod.groups())}; sections: {', '.join(SECTIONS)}"
    lines = [f"{group}: options {', '.join(sources_mod.options(group))}" if group in sources_mod.groups() else group]
    seen: Dict[str, str] = {}
    for option, cls in per_schema.items():
        docs = field_docs(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "[]"
            rules = {k: v for k, v in f.metadata.items() if k != "choices"}
            allowed = " | ".join(choices_of(f)) if "choices" in f.metadata else (describe(rules) if rules else "")
            row = f"  {group}.{f.name}={default}" + (f"  ({allowed})" if allowed else "")
            if seen.get(f.name) == row:
                continue
            seen[f.name] = row
            rows.append(row + (f"  # {docs[f.name]}" if docs.get(f.name) else ""))
        if len(per_schema) > 1:
            lines.append(f"{group}={option}:" if rows else f"{group}={option}: (no keys of its own)")
        lines += rows
    return "\n".join(lines)


def _experiments() -> List[str]:
    return sources_mod.options("experiment")


def _about(option: str) -> str:
    """An option with the first line of its file's header comment."""
    path = sources_mod.option_file("experiment", option)
    lines = path.read_text().splitlines() if path else []
    header = [x[1:].strip() for x in lines if x.startswith("#") and "@package" not in x]
    comment = " ".join(header[: next((i for i, x in enumerate(header) if x.startswith("tuneforge")), len(header))])
    return f"  experiment={option}  # {comment}" if comment else f"  experiment={option}"
