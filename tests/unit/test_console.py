"""The terminal shows the experiment; library noise goes to RUN_DIR/logs/."""

from __future__ import annotations

import io
import json
import logging
import warnings

import pytest

from ray_fedit import console


@pytest.fixture
def clean_logging(monkeypatch):
    """Restore the loggers console touches (handlers, propagation, warning capture)."""
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    names = ("ray_fedit", "ray", "py.warnings", "")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate,
                 logging.getLogger(n).level) for n in names}
    yield
    for n, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(n)
        for h in logger.handlers:
            if h not in handlers:
                h.close()
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.setLevel(level)
    logging.captureWarnings(False)


def _record(n: int, **kw) -> dict:
    return {"round": n, "rounds": 3, "aggregated": [0, 1, 2], "rejected": [], "failed": [],
            "retries": 0, "mean_loss": 1.5 + n / 100, "seconds": 2.0 * n, **kw}


def test_round_line_names_the_round_clients_loss_and_time():
    assert console.round_line(_record(2)) == "  round 2/3 | 3 clients | loss 1.5200 | 4.0 s"
    rec = _record(1, rejected=[{"client": 4}], failed=[{"client": 5}], retries=2, mean_loss=None)
    assert console.round_line(rec, "no_attack") == \
        "  no_attack: round 1/3 | 3 clients, 1 rejected, 1 failed, 2 retries | loss n/a | 2.0 s"


def test_round_progress_shows_each_round_once_as_plain_lines_off_a_terminal(tmp_path):
    path = tmp_path / "rounds.jsonl"
    out = io.StringIO()  # not a TTY: plain lines
    progress = console.RoundProgress(path, 3, "attacked", stream=out)
    progress.poll()  # no file yet
    assert out.getvalue() == ""
    path.write_text(json.dumps(_record(1)) + "\n" + json.dumps(_record(2)) + "\n{\"rou")
    progress.poll()  # the half-written third line waits
    # a restarted driver rewrites round 2 after round 1's checkpoint: shown once
    path.write_text("\n".join(json.dumps(_record(n)) for n in (1, 2, 2, 3)) + "\n")
    progress.close()
    assert out.getvalue().splitlines() == [console.round_line(_record(n), "attacked")
                                           for n in (1, 2, 3)]


def test_library_warnings_and_ray_notices_go_to_the_run_log_not_the_terminal(tmp_path, capsys,
                                                                           clean_logging):
    logging.captureWarnings(False)  # pytest records warnings itself; capture them afresh
    path = console.log_to_run_dir(tmp_path)
    assert path == tmp_path / "logs" / "run.log"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library deprecation", FutureWarning, stacklevel=1)
    logging.getLogger("ray._private.authentication").warning("token notice")
    logging.getLogger("ray_fedit.federation").info("round 1/3")
    logging.getLogger("ray.train").error("a real error")
    err = capsys.readouterr().err
    assert "deprecation" not in err and "token notice" not in err
    assert "a real error" in err  # errors are never hidden
    text = path.read_text()
    for line in ("a library deprecation", "token notice", "round 1/3", "a real error"):
        assert line in text
    assert console.log_to_run_dir(tmp_path) == path  # idempotent: one handler, one copy
    logging.getLogger("ray").warning("once")
    assert path.read_text().count("once") == 1


def test_verbose_leaves_the_libraries_alone(monkeypatch, clean_logging):
    console.set_verbose(True)
    assert console.verbose()
    ray_logger = logging.getLogger("ray")
    before = (list(ray_logger.handlers), ray_logger.propagate)
    console.quiet_libraries()
    assert (list(ray_logger.handlers), ray_logger.propagate) == before  # Ray prints as it does
    console.set_verbose(False)
    assert not console.verbose()


@pytest.mark.parametrize("argv", [["-v", "ls", "defenses"], ["ls", "defenses", "-v"],
                                  ["ls", "defenses", "--verbose"]])
def test_verbose_flag_before_or_after_the_command(argv, capsys, clean_logging):
    from ray_fedit.cli import main

    assert main(argv) == 0
    assert console.verbose()
    assert "posthoc" in capsys.readouterr().out
    console.set_verbose(False)


@pytest.mark.parametrize("session_logs", [None, "elsewhere"], ids=["no-session", "remote-node"])
def test_ray_logs_not_on_this_machine_are_said_not_linked(session_logs, tmp_path, caplog,
                                                          clean_logging, monkeypatch):
    """Without a local Ray session, or with one whose logs live on another machine, there is
    nothing to link, and the run log says so instead of leaving logs/ray missing without a word.
    (The session is faked: a test session may hold a real local Ray from an earlier tier.)"""
    logs = None if session_logs is None else tmp_path / "remote" / "session_1" / "logs"
    monkeypatch.setattr(console, "_ray_session_logs", lambda: logs)
    with caplog.at_level(logging.INFO, logger="ray_fedit"):
        logging.getLogger("ray_fedit").propagate = True
        assert console.link_ray_logs(tmp_path / "run") is None
    assert not (tmp_path / "run" / "logs" / "ray").exists()
    assert "logs/ray is not linked" in caplog.text


def test_ray_logs_on_this_machine_are_linked(tmp_path, clean_logging, monkeypatch):
    logs = tmp_path / "session_1" / "logs"
    logs.mkdir(parents=True)
    monkeypatch.setattr(console, "_ray_session_logs", lambda: logs)
    link = console.link_ray_logs(tmp_path / "run")
    assert link == tmp_path / "run" / "logs" / "ray" and link.resolve() == logs.resolve()
    assert console.link_ray_logs(tmp_path / "run") == link  # linking again replaces the link


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_item_progress_plain_lines_with_eta(monkeypatch):
    """Off a terminal: a line at most every `every` seconds, with the ETA from the rate so far,
    and a closing line for a step that took longer than that."""
    out = io.StringIO()
    progress = console.ItemProgress(100, "attack data: answers", stream=out, every=10.0)
    clock = _Clock()
    progress._clock, progress.started, progress.last = clock, 100.0, 100.0
    clock.now = 105.0
    progress.update(10)  # 5 s since the start: no line yet
    clock.now = 120.0
    progress.update(15)  # 25 of 100 in 20 s: 60 s to go
    clock.now = 125.0
    progress.update(25)  # 5 s since the last line
    clock.now = 140.0
    progress.update(80)  # past the total: counted up to it
    progress.close()
    assert out.getvalue().splitlines() == [
        "  attack data: answers: 25/100 answers, 20 s, ETA 60 s",
        "  attack data: answers: 100/100 answers, 40 s",
    ]
    assert progress.done == 100


def test_item_progress_of_a_short_step_prints_nothing():
    out = io.StringIO()
    progress = console.ItemProgress(3, "held-out benign", stream=out, every=30.0)
    progress.update(3)
    progress.close()
    assert out.getvalue() == ""


def test_watching_polls_while_the_block_runs_and_once_after():
    import threading

    calls: list[str] = []
    release = threading.Event()

    def poll() -> None:
        calls.append("poll")
        if len(calls) >= 2:
            release.set()

    with console.watching(poll, every=0.01):
        assert release.wait(5)  # polled while the block still ran
        calls.append("block ends")
    assert calls[-1] == "poll" and "block ends" in calls


def test_item_progress_notes_ride_with_the_count():
    out = io.StringIO()
    progress = console.ItemProgress(24, "defense", unit="steps", stream=out, every=10.0)
    clock = _Clock()
    progress._clock, progress.started, progress.last = clock, 100.0, 100.0
    clock.now = 112.0
    progress.update(8, note="loss 1.2500")
    assert out.getvalue() == "  defense: 8/24 steps, 12 s, ETA 24 s, loss 1.2500\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_a_log_gets_none():
    bar = console.terminal_bar(_Terminal(), 24, "defense", "step", leave=False)
    assert bar.total == 24 and bar.unit == "step" and bar.desc == "  defense"
    bar.close()
    assert console.terminal_bar(io.StringIO(), 24, "defense", "step", leave=False) is None
    progress = console.ItemProgress(3, "answers", stream=_Terminal())
    progress.update(2, note="loss 1.0")
    assert progress.bar.n == 2 and progress.bar.unit == "answer"
    progress.close()
