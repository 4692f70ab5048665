"""Which private local Ray a run starts: the dashboard only for the defense stage."""

from __future__ import annotations

import pytest

from ray_fedit.pipeline import STAGES, wants_dashboard


@pytest.mark.parametrize(("stages", "env", "expected"), [
    (STAGES, None, True),                           # a whole run: the defense's Ray Train needs it
    (("prepare", "federate"), None, False),
    (("evaluate_defended", "report"), None, False),
    ((), None, False),                              # ray-fedit generate / evaluate
    (("prepare",), "1", True),                      # forced on
    (STAGES, "0", False),                           # forced off
])
def test_the_dashboard_starts_only_when_the_defense_runs(monkeypatch, stages, env, expected):
    if env is None:
        monkeypatch.delenv("RAY_FEDIT_DASHBOARD", raising=False)
    else:
        monkeypatch.setenv("RAY_FEDIT_DASHBOARD", env)
    assert wants_dashboard(stages) is expected
