"""The declared minimum versions (pyproject.toml) are true: each is at least the first release
with a feature the code uses, and the installed packages satisfy them."""
from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# feature (as written in genmodels/) -> (distribution, first version that has it, source)
FEATURES = {
    "safe_globals": ("torch", "2.5", "torch.serialization.safe_globals: pytorch#127939, merged 2024-07-12, "
                                     "after the 2.4 branch cut (pytorch#128514, 2024-06-12)"),
    "get_autocast_dtype": ("torch", "2.4", "torch.get_autocast_dtype(device_type): in main before the 2.4 cut "
                                           "(used by pytorch#125103, 2024-04)"),
    "mmap=True": ("torch", "2.1", "torch.load(mmap=...)"),
    "EMAWeightAveraging": ("lightning", "2.6", "Lightning CHANGELOG 2.6.0 (#21260)"),
    '"omegaconf+"': ("jsonargparse", "4.41", "jsonargparse CHANGELOG 4.41.0 (#765)"),
}


def as_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def declared_minimum(dist: str) -> str:
    m = re.search(rf'"{re.escape(dist)}(?:\[[^\]]*\])?>=([\d.]+)', (ROOT / "pyproject.toml").read_text())
    assert m, f"pyproject.toml declares no minimum for {dist}"
    return m[1]


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_declared_minimum_has_the_feature(feature):
    dist, first, source = FEATURES[feature]
    if not any(feature in p.read_text() for p in (ROOT / "genmodels").rglob("*.py")):
        pytest.skip(f"{feature} is no longer used")
    assert as_tuple(declared_minimum(dist)) >= as_tuple(first), (
        f"genmodels uses {feature}, which needs {dist}>={first} ({source}); "
        f"pyproject.toml declares {dist}>={declared_minimum(dist)}")


@pytest.mark.parametrize("dist", sorted({d for d, _, _ in FEATURES.values()}))
def test_installed_versions_satisfy_the_declared_minimum(dist):
    assert as_tuple(version(dist)) >= as_tuple(declared_minimum(dist))
