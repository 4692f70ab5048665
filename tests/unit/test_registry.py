"""Strict registries: duplicates and unknown names are errors that say what is known."""

from __future__ import annotations

import pytest

from ray_fedit.registry import DATASETS, Registry, RegistryError


def test_register_get_and_meta():
    reg: Registry[object] = Registry("widget")

    @reg.register("round_one", exempt=("fixed_point",))
    def f():
        return 1

    assert reg.get("round_one") is f
    assert reg.meta("round_one") == {"exempt": ("fixed_point",)}
    assert reg.names() == ["round_one"] and "round_one" in reg


def test_duplicate_name_raises():
    reg: Registry[object] = Registry("widget")
    reg.register("a")(object())
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a")(object())


def test_unknown_name_lists_known_names():
    reg: Registry[object] = Registry("widget")
    reg.register("krum")(object())
    reg.register("median")(object())
    with pytest.raises(RegistryError, match=r"unknown widget 'medain'; known: krum, median"):
        reg.get("medain")


@pytest.mark.parametrize("bad", ["Krum", "krum_", "2x", "with-dash", ""])
def test_names_must_be_lower_snake_case(bad):
    with pytest.raises(RegistryError, match="lower_snake_case"):
        Registry("widget").register(bad)


def test_package_registry_fills_itself_on_first_lookup():
    assert {"advbench", "harmbench", "donotanswer", "strongreject"} <= set(DATASETS.names())
