"""What a run shows on the terminal, and where everything else goes.

By default the terminal shows the experiment: stage lines, one progress line (or bar) per
federation round, the headline after each evaluation and the final table. Everything else goes
to the run directory's ``logs/``:

- ``logs/run.log``: this process's log records, with timestamps: ``ray_fedit`` at INFO, Ray's
  warnings (``ray.init``'s token notice, Ray Train's and Ray Data's notices) and the Python
  warnings the libraries raise;
- ``logs/ray``: a link to the Ray session's log directory (one file per worker and actor process,
  stdout and stderr), when Ray runs on this machine;
- ``logs/error.log``: the traceback of a failed stage.

``-v/--verbose`` (``RAY_FEDIT_VERBOSE=1``) brings the rest back: actor output is forwarded to the
terminal as Ray does by default, and library logs and warnings print there too. Errors are never
hidden: a failed stage ends with one line naming the cause and the log.

Round progress comes from ``rounds.jsonl`` (the driver actor appends one record per round; the
process that waits on the federation reads it), so it needs no log forwarding from actors. On a
terminal it is a ``tqdm`` bar; elsewhere (CI logs, ``ray job submit``) one plain line per round.
Long steps counted in items (:class:`ItemProgress`) come the same way to the waiting process:
generated answers as Ray Data's blocks or the resident actor's streamed batches arrive, defense
steps from the ``defense_progress.jsonl`` that the defense's rank 0 appends to.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

VERBOSE_ENV = "RAY_FEDIT_VERBOSE"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def verbose() -> bool:
    """Whether the terminal shows everything (``-v`` or ``RAY_FEDIT_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Set verbosity for this process and the Ray workers it starts (they inherit the env)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


class StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record comes (a test harness
    or a notebook swaps it), not to the stream of the moment it was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def show_project_logs(fmt: str = "%(asctime)s %(message)s", datefmt: str | None = "%H:%M:%S",
                      ) -> None:
    """Print ``ray_fedit``'s INFO records (progress, cache hits, resumes) on stderr, once per
    process: the CLI, a sweep's trial, the federation driver actor."""
    logger = logging.getLogger("ray_fedit")
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter(fmt, datefmt))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _TerminalErrors(StderrHandler):
    """Library errors on stderr (the rest goes to the run log once there is one)."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.ERROR)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


class _RunLog(logging.FileHandler):
    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8")
        self.setFormatter(logging.Formatter(_FORMAT))


# Libraries that give their logger a terminal handler of their own when imported.
_OWN_TERMINAL_HANDLERS = ("ray", "mlflow")


def quiet_libraries() -> None:
    """Library records (Ray's, Python warnings) go through the root logger, which prints only
    errors on the terminal (and everything from WARNING up to the run log, once there is one).

    Ray gives its logger a terminal handler of its own when imported and ``ray.init`` clears it
    (then Python's last-resort handler printed its notices); MLflow's logger has one too. Here
    their records propagate to the root instead. Call it again after importing Ray or MLflow.
    No-op when verbose.
    """
    if verbose():
        return
    logging.captureWarnings(True)
    for name in _OWN_TERMINAL_HANDLERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]:
            logger.removeHandler(handler)
        logger.propagate = True
    root = logging.getLogger()
    if not any(isinstance(h, _TerminalErrors) for h in root.handlers):
        root.addHandler(_TerminalErrors())


def log_to_run_dir(run_root: Path) -> Path:
    """Send this process's log records to ``run_root/logs/run.log``; return the path.

    ``ray_fedit`` records (INFO and up) go there as well as to the terminal; library records
    (WARNING and up, Python warnings included) only there unless verbose. Idempotent per path; a
    later run of the same process moves the file handler to its own directory.
    """
    path = (Path(run_root) / "logs" / "run.log").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    project, root = logging.getLogger("ray_fedit"), logging.getLogger()
    # The CLI's project logger prints and does not propagate; elsewhere the root's file gets it.
    for logger in ([project] if not project.propagate else []) + [root]:
        if any(isinstance(h, _RunLog) and Path(h.baseFilename) == path for h in logger.handlers):
            continue
        for old in [h for h in logger.handlers if isinstance(h, _RunLog)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(_RunLog(path))
    if project.getEffectiveLevel() > logging.INFO:
        project.setLevel(logging.INFO)  # progress records reach the run log
    return path


def _ray_session_logs() -> Path | None:
    """The log directory of this process's Ray session, or None (not connected, or a client)."""
    try:
        from ray._private.worker import global_worker

        return Path(global_worker.node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - not connected, or a client without a local node
        return None


def link_ray_logs(run_root: Path) -> Path | None:
    """Link ``run_root/logs/ray`` to the Ray session's log directory when it is on this machine.

    Returns the link, or None when the session's logs are elsewhere (a remote cluster).
    """
    logs = _ray_session_logs()
    if logs is None or not logs.is_dir():
        logging.getLogger("ray_fedit").info(
            "the Ray session's logs are not on this machine; %s/logs/ray is not linked (see the "
            "cluster's nodes, or the Ray dashboard)", run_root)
        return None
    link = Path(run_root) / "logs" / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(logs, target_is_directory=True)
    return link


# ------------------------------------------------------------------------------ round progress
def terminal_bar(stream: TextIO, total: int, label: str, unit: str, *, leave: bool) -> Any:
    """A ``tqdm`` bar on ``stream`` when it is a terminal, else None (the caller prints lines)."""
    if not getattr(stream, "isatty", lambda: False)():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"  {label}", unit=unit, file=stream, leave=leave,
                dynamic_ncols=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete records of a JSON-lines file another process appends to (none if absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line still being written
    return out


def round_line(record: dict[str, Any], label: str = "") -> str:
    """One round of ``rounds.jsonl`` as a progress line."""
    aggregated = record.get("aggregated") or []
    rejected, failed = record.get("rejected") or [], record.get("failed") or []
    retries = record.get("retries") or 0
    loss = record.get("mean_loss")
    parts = [f"round {record['round']}/{record['rounds']}",
             f"{len(aggregated)} clients" + (f", {len(rejected)} rejected" if rejected else "")
             + (f", {len(failed)} failed" if failed else "")
             + (f", {retries} retries" if retries else ""),
             f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "loss n/a",
             f"{record.get('seconds', 0.0):.1f} s"]
    return f"  {label + ': ' if label else ''}" + " | ".join(parts)


class RoundProgress:
    """Shows the rounds of one federation as they land in its ``rounds.jsonl``.

    :meth:`poll` reads the file and shows every round not shown yet (a resumed or restarted
    federation rewrites rounds it recomputes; each round shows once). A ``tqdm`` bar on a
    terminal, plain lines otherwise.

    Args:
        rounds_file: the federation's ``rounds.jsonl``.
        total: ``federation.rounds``.
        label: what the lines are about (``attacked``, ``no_attack``).
        stream: where to write (default stdout).
        on_record: called with each round's record once, when it is shown (the trackers).
    """

    def __init__(self, rounds_file: Path, total: int, label: str = "",
                 stream: TextIO | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = Path(rounds_file)
        self.total = total
        self.label = label
        self.stream = stream or sys.stdout
        self.on_record = on_record
        self.shown: set[int] = set()
        self.bar = terminal_bar(self.stream, total, label or "rounds", "round", leave=True)

    def poll(self) -> None:
        for record in read_jsonl(self.path):
            n = record.get("round")
            if not isinstance(n, int) or n in self.shown:
                continue
            self.shown.add(n)
            if self.bar is not None:
                loss = record.get("mean_loss")
                self.bar.set_postfix_str(
                    f"loss {loss:.4f}, {record.get('seconds', 0.0):.1f} s/round"
                    if isinstance(loss, (int, float)) else "", refresh=False)
                self.bar.update(1)
            else:
                print(round_line(record, self.label), file=self.stream, flush=True)
            if self.on_record is not None:
                self.on_record(record)

    def close(self) -> None:
        self.poll()
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------- item progress
class ItemProgress:
    """Progress of one long step counted in items (answers generated, prompts judged).

    A ``tqdm`` bar with rate and ETA on a terminal. Elsewhere (CI logs, ``ray job submit``) a plain
    line at most every ``every`` seconds, with the ETA from the rate so far, and one at the end
    when any was shown (a short step shows none: its caller's own line says it is done).

    Args:
        total: items the step will count.
        label: what they are (``attack data: answers``, ``evaluate attacked: responses``).
        unit: the items' name.
        stream: where to write (default stdout).
        every: seconds between plain lines.
    """

    def __init__(self, total: int, label: str, unit: str = "answers",
                 stream: TextIO | None = None, every: float = 30.0) -> None:
        import time

        self.total, self.label, self.unit, self.every = total, label, unit, every
        self.stream = stream or sys.stdout
        self.done = 0
        self.note = ""
        self.printed = False  # a partial count was shown (then the end is shown too)
        self._clock = time.perf_counter
        self.started = self.last = self._clock()
        self.bar = terminal_bar(self.stream, total, label, unit.removesuffix("s"), leave=False)

    def update(self, n: int, note: str = "") -> None:
        """Count ``n`` more items (never past ``total``); ``note`` (``loss 1.23``) is shown with
        the count until the next one."""
        n = max(0, min(n, self.total - self.done))
        self.done += n
        self.note = note or self.note
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
            return
        now = self._clock()
        if n and self.done < self.total and now - self.last >= self.every:
            self.last = now
            self.printed = True
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        spent = (now or self._clock()) - self.started
        text = f"  {self.label}: {self.done}/{self.total} {self.unit}, {spent:.0f} s"
        if 0 < self.done < self.total:
            text += f", ETA {spent * (self.total - self.done) / self.done:.0f} s"
        return text + (f", {self.note}" if self.note else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.printed:  # a step that showed no partial count needs no closing line
            print(self.line(), file=self.stream, flush=True)


@contextmanager
def watching(poll: Callable[[], None], every: float = 1.0) -> Iterator[None]:
    """Call ``poll`` every ``every`` seconds on a daemon thread while the block runs (a call that
    blocks, such as a Ray Train ``fit``), and once more after it."""
    import threading

    stop = threading.Event()

    def safe_poll() -> None:
        try:
            poll()
        except Exception:  # noqa: BLE001 - progress must never fail or hide the work's outcome
            logging.getLogger("ray_fedit").debug("progress poll failed", exc_info=True)

    def loop() -> None:
        while not stop.wait(every):
            safe_poll()

    thread = threading.Thread(target=loop, name="ray-fedit-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        safe_poll()
