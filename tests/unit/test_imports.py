"""Ray stays at the edges: the math and config modules import without Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

BLOCK_RAY = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is blocked in this test")
sys.meta_path.insert(0, _Block())
import importlib
importlib.import_module(sys.argv[1])
"""

RAY_FREE = ["ray_fedit.config", "ray_fedit.registry", "ray_fedit.models.codec",
            "ray_fedit.aggregators", "ray_fedit.attacks", "ray_fedit.data",
            "ray_fedit.data.partition", "ray_fedit.defenses.posthoc_math",
            "ray_fedit.federation.rule_state", "ray_fedit.federation.sharded",
            "ray_fedit.judges.probe", "ray_fedit.evaluation.summary", "ray_fedit.evaluation.paired"]


@pytest.mark.parametrize("module", RAY_FREE)
def test_imports_without_ray(module):
    res = subprocess.run([sys.executable, "-c", BLOCK_RAY, module], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_blocker_blocks():
    res = subprocess.run([sys.executable, "-c", BLOCK_RAY, "ray"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0 and "blocked" in res.stderr
