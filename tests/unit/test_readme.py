"""The README's config reference is the one generated from the config tree."""

from __future__ import annotations

from ray_fedit.config_reference import BEGIN, END, block, reference
from tests.conftest import ROOT


def test_readme_config_reference_is_in_sync():
    text = (ROOT / "README.md").read_text()
    current = text[text.index(BEGIN): text.index(END) + len(END)]
    assert current == block(), "run: python -m ray_fedit.config_reference --write README.md"


def test_reference_lists_every_section_and_a_nested_key():
    ref = reference()
    for section in ("model", "lora", "data", "federation", "attack", "aggregator", "defense",
                    "generation", "evaluation", "resources", "output"):
        assert f"**`{section}`**" in ref
    assert "**`attack.update`**" in ref and "| `clients_per_round` |" in ref
