"""``cellseg bench train`` measures the step of the Makefile's real-data recipe, not a look-alike."""

from __future__ import annotations

import re

import yaml

from cellseg.bench.train import RECIPE, RECIPE_SPEED
from conftest import ROOT


def test_the_bench_recipe_is_the_makefiles() -> None:
    makefile = (ROOT / "Makefile").read_text()
    block = re.search(r"^REAL_CPU = (.*?)\n\n", makefile, re.S | re.M).group(1)
    overrides = dict(re.findall(r"-S ([a-z0-9_.]+)=([^ '\\\n]+)", block))
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in RECIPE_SPEED:
        assert key in overrides, f"{key}: the bench's new step sets it, the recipe does not"
    for key, value in {**RECIPE, **RECIPE_SPEED}.items():
        section, name = key.split(".")
        expected = yaml.safe_load(overrides[key]) if key in overrides else defaults[section][name]
        assert value == expected, f"{key}: bench {value!r}, recipe {expected!r}"
