"""Judges of (instruction, response) pairs, registered by name in ``JUDGES``; no Ray, no engines."""

import ray_fedit.judges.judge_model  # noqa: F401
import ray_fedit.judges.llm_http  # noqa: F401
import ray_fedit.judges.probe  # noqa: F401
import ray_fedit.judges.reward_model  # noqa: F401
from ray_fedit.judges import rule  # noqa: F401
