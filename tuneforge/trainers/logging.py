"""Rank 0's metric sink: ``<run_dir>/metrics.jsonl`` always, W&B on top when ``logger.name == "wandb"``.

metrics.jsonl is the record of truth, W&B best effort: any W&B failure is reported once on stderr and
turns W&B off for the rest of the process; training goes on. Compute nodes often have no internet and
no terminal, so W&B never prompts: "auto" goes online only with a key and a route, else offline."""

import contextlib
import json
import netrc
import os
import pathlib
import secrets
import socket
import sys
from urllib.parse import urlparse

from tuneforge import fsutil
from tuneforge.compat.wandb import flush_settings
from tuneforge.conf.schema import LoggerConfig
from tuneforge.trainers.samples import SAMPLES

_DEFAULT_BASE_URL = "https://api.wandb.ai"


def _say(message: str) -> None:
    print(f"tuneforge: {message}", file=sys.stderr, flush=True)


def _jsonable(value):
    # torch / numpy scalars reach us from the trainer; anything else is kept as text rather than lost.
    return value.item() if hasattr(value, "item") else str(value)


def _lines_up_to(path: pathlib.Path, step: int) -> str:
    """The JSON lines of `path` whose step is at most `step` (a line torn by a killed job is dropped)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return "".join(kept)


def have_api_key(base_url: str) -> bool:
    """A W&B key in WANDB_API_KEY, or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(base_url).hostname) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def can_reach(base_url: str, timeout_s: float = 2.0) -> bool:
    """Whether a TCP connection to the W&B host (or the HTTPS proxy, when one is set) opens in time."""
    url = urlparse(base_url)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy and url.scheme == "https":  # nodes that reach W&B at all often do so through a proxy
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def resolve_mode(requested: str) -> tuple[str, str]:
    """The W&B mode to run in, and why. Unknown values pass through, so wandb itself rejects them."""
    base_url = os.environ.get("WANDB_BASE_URL") or _DEFAULT_BASE_URL
    if requested == "auto" and os.environ.get("WANDB_MODE"):  # the shell's explicit choice wins
        requested = os.environ["WANDB_MODE"]
    if requested not in ("auto", "online"):
        return requested, "requested"
    if not have_api_key(base_url):
        # Online without a key makes wandb ask for one on a terminal (or fail without one): never that.
        return "offline", "no W&B API key (WANDB_API_KEY or netrc)"
    if requested == "online":
        return "online", "requested"
    if not can_reach(base_url):
        return "offline", f"{urlparse(base_url).hostname} unreachable"
    return "online", "API key and route to W&B found"


class RunLogger:
    """Rank 0's metric sink: <run_dir>/metrics.jsonl always, plus W&B when logger_cfg.name == 'wandb'.

    enabled=False (ranks != 0): no-ops."""

    def __init__(self, logger_cfg: LoggerConfig, run_dir: pathlib.Path, run_config: dict, enabled: bool):
        self.enabled, self.run_dir = enabled, pathlib.Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.mode = self.mode_reason = None  # the W&B mode chosen (None: W&B not used), and why
        self._file = self._run = self._wandb = self._url_or_id = None  # _run: None once W&B is off
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if logger_cfg.name == "wandb":
            self._start_wandb(logger_cfg, run_config)

    def _run_id(self) -> str:
        # Made once per run dir: every requeue (a new process, same dir) continues the same W&B run.
        path = self.run_dir / "wandb_id"
        run_id = path.read_text().strip() if path.exists() else ""
        if not run_id:
            run_id = secrets.token_hex(4)  # 8 chars of [0-9a-f]: a valid W&B run id
            fsutil.write_text(path, run_id + "\n")
        return run_id

    def _start_wandb(self, cfg: LoggerConfig, run_config: dict) -> None:
        self.mode, self.mode_reason = resolve_mode(cfg.mode)
        if self.mode == "disabled":
            return
        try:
            # A WANDB_SERVICE token inherited from a parent that used wandb (a launcher, a test harness)
            # points at the parent's wandb-core, which may be gone or may exit mid-run: start our own.
            os.environ.pop("WANDB_SERVICE", None)
            import wandb  # lazy: costs ~1 s and is needed only on rank 0 with logger=wandb

            self._wandb = wandb
            extra = flush_settings(wandb)  # a killed job keeps what was logged up to ~2 s before
            # silent: no banner or prompts (we print one line below); console off: Slurm keeps stdout.
            settings = wandb.Settings(silent=True, console="off", **extra)
            self._run = wandb.init(
                id=self._run_id(),
                resume="allow",
                dir=str(self.run_dir),
                mode=self.mode,
                project=cfg.project,
                entity=cfg.entity,
                group=cfg.group,
                tags=list(cfg.tags or []),
                config=run_config,  # at init, so a run killed midway still has its config
                reinit="create_new",
                settings=settings,  # never hand back some other live run
            )
            self._url_or_id = (self._run.url if self.mode == "online" else None) or self._run.id
            _say(f"W&B {self.mode} ({self.mode_reason}): run {self._url_or_id}, in {self.run_dir}/wandb")
        except Exception as exc:  # noqa: BLE001 - any wandb failure must not stop training
            self._disable("init", exc)

    def _disable(self, where: str, exc: BaseException) -> None:
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        _say(
            f"W&B {where} failed ({type(exc).__name__}: {first_line}); W&B is off for the rest of "
            f"this run, metrics still go to {self.metrics_path}"
        )
        run, self._run = self._run, None
        if run is not None:
            with contextlib.suppress(Exception):  # what was written so far is still worth syncing
                run.finish(exit_code=1)
        with contextlib.suppress(Exception):  # stop wandb-core; this also drops WANDB_SERVICE
            self._wandb.teardown()

    def _wandb_call(self, where: str, call) -> None:
        if self._run is not None:
            try:
                call(self._run)
            except Exception as exc:  # noqa: BLE001 - a W&B failure must not stop training
                self._disable(where, exc)

    def log(self, metrics: dict, step: int) -> None:
        """One JSON line ``{"step": step, **metrics}`` (flushed, so a killed job keeps it), then W&B."""
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.metrics_path, "a", encoding="utf-8")
        self._file.write(json.dumps({"step": step, **metrics}, default=_jsonable) + "\n")
        self._file.flush()
        self._wandb_call("log", lambda run: run.log(metrics, step=step))

    def summary(self, values: dict) -> None:
        """Run-level values (final loss, tokens/s), merged into summary.json (older keys stay) and W&B."""
        if not self.enabled:
            return
        path = self.run_dir / "summary.json"
        current = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        current.update(values)
        fsutil.write_text(path, json.dumps(current, indent=2, default=_jsonable) + "\n")
        self._wandb_call("summary", lambda run: run.summary.update(values))

    def samples(self, step: int, rows: list) -> None:
        """The model's answers at ``step``: one samples.jsonl line per prompt (flushed), and a W&B Table."""
        if not self.enabled or not rows:
            return
        with open(self.run_dir / SAMPLES, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"step": step, **row}, default=_jsonable) + "\n" for row in rows))
        columns = ["step", *rows[0]]
        self._wandb_call(
            "log",
            lambda run: run.log(
                {"samples": self._wandb.Table(columns=columns, data=[[step, *r.values()] for r in rows])}, step=step
            ),
        )

    def table(self, name: str, columns: list, rows: list) -> None:
        """A W&B Table logged once (the before/after answers at the end of a run); nothing on disk."""
        if not self.enabled or not rows:
            return
        self._wandb_call("log", lambda run: run.log({name: self._wandb.Table(columns=columns, data=rows)}))

    def truncate_after(self, step: int) -> None:
        """Drop metrics.jsonl and samples.jsonl records past ``step`` (the checkpoint a resumed run restarts
        from; -1 when there is none: even step 0's evaluation is taken again)."""
        if not self.enabled:
            return
        if self.metrics_path.exists():
            self._close_file()  # the file gets replaced: log() reopens it
            fsutil.write_text(self.metrics_path, _lines_up_to(self.metrics_path, step))
            self._catch_up_wandb(step)
        if (self.run_dir / SAMPLES).exists():
            fsutil.write_text(self.run_dir / SAMPLES, _lines_up_to(self.run_dir / SAMPLES, step))

    def _catch_up_wandb(self, step: int) -> None:
        """On resume (offline): give W&B the steps up to ``step`` that metrics.jsonl has and the offline
        files of earlier allocations lack. A SIGTERM (preemption, scancel, `scontrol requeue`) kills
        wandb-core at once, losing what it had not flushed; USR2 (the time-limit warning) does not.
        Steps past ``step`` are replayed by the trainer and logged again as they come."""
        if self._run is None or self.mode != "offline":
            return
        from tuneforge.trainers.wandb_offline import read_history

        try:
            has = max((int(row.get("_step", 0)) for row in read_history(self.run_dir)), default=0)
            rows = [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines()]
        except Exception as exc:  # noqa: BLE001 - unreadable files: W&B keeps a gap, training goes on
            _say(f"W&B catch-up skipped ({type(exc).__name__}: {exc})")
            return
        for row in rows:
            row_step = row.pop("step")
            if has < row_step <= step:
                self._wandb_call("log", lambda run: run.log(row, step=row_step))

    def close(self) -> None:
        """Flush and close metrics.jsonl; finish the W&B run. Safe to call twice."""
        self._close_file()
        # teardown stops wandb-core, so the .wandb file is complete on return (right after finish()
        # a reader can still see it empty). It would finish other live runs too: the trainer has none.
        self._wandb_call("finish", lambda run: (run.finish(), self._wandb.teardown()))
        self._run = None

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    @property
    def wandb_url_or_id(self) -> str | None:
        """The W&B run URL when online, else its id; None when W&B was never started."""
        return self._url_or_id
