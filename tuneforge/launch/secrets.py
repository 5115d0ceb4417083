"""Credentials never reach a run's records, the sbatch script, or a message on the terminal.

Everything a user gives (command-line overrides, every string of the composed config: setup lines,
extra #SBATCH lines, paths, ids) is matched against the ways a credential is commonly spelled:

- a credential-named variable or key given a literal value: `export HF_TOKEN=hf_x`, `WANDB_API_KEY=x cmd`,
  `env AWS_SECRET_ACCESS_KEY=x`, `setenv GITHUB_TOKEN x`, an override `logger.api_key=x`;
- a credential-named command-line flag: `--token x`, `--api-key=x`, `--password x`, `wandb login <key>`;
- the shape of a known token: `hf_...`, `ghp_...`/`github_pat_...`, `glpat-...`, `sk-...`, `xox?-...`,
  `AKIA...`, `AIza...`, a JWT, a PEM private key;
- `Authorization: Bearer ...` / `Bearer <token>`, and a URL with a password (`https://user:pw@host`).

A reference (`$HF_TOKEN`, `${HF_TOKEN}`, `$(cat ~/.token)`) is not a credential: it is read where the job
runs. A finding names the key and the kind and masks the value; `redact` masks the same spans in any
text before it is printed, so a refusal never echoes what it refuses.

Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

#: a name (variable, flag, config key) that holds a credential: TOKEN, API_KEY, ... as a whole part of
#: it (HF_TOKEN, api-key; not TOKENIZERS_PARALLELISM), or PASSWORD/PASSWD/SECRET anywhere (PGPASSWORD)
_NAME = (
    r"(?:[A-Za-z0-9]+[_-])*?(?:(?:API|ACCESS|AUTH|PRIVATE|SECRET|SESSION|CLIENT)[_-]?KEY|TOKEN|AUTH|CREDENTIALS?"
    r"|[A-Za-z0-9]*(?:PASSWORD|PASSWD|PASSPHRASE|SECRET))(?:[_-][A-Za-z0-9]+)*"
)
#: a literal value (not a $reference, not empty)
_VALUE = r"""(?!\*)(?:"(?!\$)[^"\s]+"|'[^'\s]+'|(?![$"'])[^\s;&|'"()\[\],]+)"""

PATTERNS: List[Tuple[str, "re.Pattern[str]"]] = [
    ("a credential assigned", re.compile(rf"(?<![\w$-])(?P<name>{_NAME})\s*=\s*(?P<value>{_VALUE})", re.I)),
    ("a credential exported", re.compile(rf"\b(?:setenv|set\s+-g?x)\s+(?P<name>{_NAME})\s+(?P<value>{_VALUE})", re.I)),
    ("a credential flag", re.compile(rf"(?<![\w-])--?(?P<name>{_NAME})(?:=|\s+)(?P<value>{_VALUE})", re.I)),
    ("a W&B key", re.compile(rf"\bwandb\s+login\s+(?:--?[\w-]+\s+)*(?P<value>{_VALUE})", re.I)),
    (
        "an Authorization header",
        re.compile(
            r"\bauthorization\s*[:=]\s*(?:(?:bearer|basic|token|digest)\s+)?"
            r"(?P<value>(?!\$|(?:bearer|basic|token|digest)\b)[^\s'\"]+)",
            re.I,
        ),
    ),
    ("a bearer token", re.compile(r"\bbearer\s+(?P<value>[A-Za-z0-9._~+/=-]{8,})", re.I)),
    ("a password in a URL", re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:(?P<value>(?!\$)[^/\s@]+)@", re.I)),
    ("a private key", re.compile(r"(?P<value>-----BEGIN [A-Z ]*PRIVATE KEY-----)")),
    (
        "a token",
        re.compile(
            r"(?<![A-Za-z0-9])(?P<value>(?:hf_|api_org_)[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
            r"|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_-]{20,}|sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"
            r"|xox[abprs]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}"
            r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"
        ),
    ),
]
#: a config key (override or schema path) whose last part names a credential
KEY_NAME = re.compile(rf"(?:^|\.)(?P<name>{_NAME})$", re.I)

HOW = (
    "export it in your shell before submitting (Slurm passes the environment on) and refer to it as "
    "$NAME, or keep it in a file the job reads"
)


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int
    masked: str


def find(text: str) -> List[Finding]:
    """The credentials in `text`, each with its span and a masked rendering."""
    found: List[Finding] = []
    for kind, pattern in PATTERNS:
        for m in pattern.finditer(text):
            start, end = m.span("value")
            if any(f.start <= start < f.end for f in found):
                continue
            found.append(Finding(kind, start, end, _mask(m, text)))
    return sorted(found, key=lambda f: f.start)


def _mask(m: "re.Match[str]", text: str) -> str:
    value = m.group("value")
    name = m.groupdict().get("name")
    prefix = re.match(r"(hf_|api_org_|gh[pousr]_|github_pat_|glpat-|sk-|xox[abprs]-|AKIA|ASIA|AIza|eyJ)", value)
    shown = (prefix.group(1) if prefix else "") + "****"
    return f"{name}={shown}" if name else shown


def redact(text: str, escape: bool = True) -> str:
    """`text` with every credential masked; `escape`: every control character shown escaped too (a
    message of one line stays one line on the terminal)."""
    out, last = [], 0
    for f in find(text):
        out += [text[last : f.start], "****"]
        last = f.end
    out.append(text[last:])
    joined = "".join(out)
    if not escape:
        return joined
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in joined)


def problem(text: str, where: str) -> Optional[str]:
    """One refusal: the kind of credential and its masked value; None when `text` holds none."""
    found = find(text)
    if not found:
        return None
    f = found[0]
    return f"looks like {f.kind} ({f.masked}); it would be written into {where}: {HOW}"


def in_overrides(overrides: Sequence[str]) -> List[str]:
    """`key: problem` for each command-line override whose value holds a credential or whose key
    names one (`logger.api_key=...`): checked before composing, whose errors echo values. A list
    value is checked element by element, each named by its index."""
    out = []
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep:
            continue
        for name, text in _elements(key, value):
            found = problem(text, "the run's records (config.yaml, submit.json)")
            if found:
                out.append(f"{name}: {found}")
        if value and not value.startswith("$") and KEY_NAME.search(key):
            out.append(f"{key}: names a credential ({key.rsplit('.', 1)[-1]}=****); {HOW}")
    return out


def _elements(key: str, value: str) -> List[Tuple[str, str]]:
    """[(key[i], element)] of a list override (Hydra's grammar), else [(key, value)]."""
    if not value.lstrip().startswith("["):
        return [(key, value)]
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        items = OverridesParser.create().parse_override(f"{key}={value}").value()
    except Exception:  # noqa: BLE001 - not parsable: checked as one string (compose then names the syntax error)
        return [(key, value)]
    if not isinstance(items, list):
        return [(key, value)]
    return [(f"{key}[{i}]", str(item)) for i, item in enumerate(items)]


#: strings that are templates, not values: a Jinja `{% set eos_token = ... %}` is no credential
NOT_SCANNED = {"data.chat_template"}


def in_config(cfg: Any, prefix: str = "") -> Iterator[Tuple[str, str]]:
    """(dotted key, problem) for every string of a composed config that holds a credential."""
    for f in fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if key in NOT_SCANNED:
            continue
        if is_dataclass(value):
            yield from in_config(value, key + ".")
        elif isinstance(value, str):
            text = problem(value, _where(key))
            if text:
                yield key, text
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                text = problem(str(item), _where(key))
                if text:
                    yield f"{key}[{i}]", text


def _where(key: str) -> str:
    if key.startswith("cluster.") and key.split(".")[1].split("[")[0] in ("setup", "extra_sbatch"):
        return "the sbatch script and the run's records"
    return "the run's records (config.yaml, submit.json, W&B)"
