"""Batched inference on Ray Data (``hf``, ``vllm``, ``http`` engines) and the data pipelines.

- :func:`generate` answers prompts with any engine (evaluation reuses it with a given adapter).
- :func:`generate_dataset` makes attack, defense, benign and aligned data, cached by content hash.

Ray is imported only when an engine runs: prompts, parsing, row functions and the pipelines'
logic import without it.
"""

from ray_fedit.generation.engine import generate
from ray_fedit.generation.errors import GenerationError
from ray_fedit.generation.pipelines import (
    KINDS,
    GeneratedData,
    Kind,
    ShortfallWarning,
    generate_dataset,
)
from ray_fedit.generation.rows import SamplingParams, from_response, to_request

__all__ = ["KINDS", "GeneratedData", "GenerationError", "Kind", "SamplingParams",
           "ShortfallWarning", "from_response", "generate", "generate_dataset", "to_request"]
