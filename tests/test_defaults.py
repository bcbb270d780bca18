"""The paper's values live in one place, ``Aand``'s signature: the configs and the documentation table agree with it."""

import re
from pathlib import Path

import pytest
import yaml

from anomalib_aand import Aand
from anomalib_aand.components.settings import VALID_RANGES, paper_defaults

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ("mvtec_ad", "visa", "mvtec3d", "folder")
# The method's settings (what the paper fixes); the rest (data, cache, anomalib parts) may differ per config.
METHOD = (
    "backbone",
    "layers",
    "stage1_epochs",
    "stage2_epochs",
    "learning_rate",
    "num_keys",
    "gate_temperature",
    "focal_alpha",
    "focal_gamma",
    "amplification_weight",
    "amplification_margin",
    "hkd_top_k",
    "distillation_loss",
    "anomaly_probability",
)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_hold_the_signature_defaults(name: str) -> None:
    arguments = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["model"]["init_args"]
    defaults = paper_defaults(Aand)
    differing = {key: arguments[key] for key in METHOD if _normal(arguments.get(key)) != _normal(defaults[key])}
    assert differing == {}


def test_every_range_checked_setting_has_a_default() -> None:
    assert set(VALID_RANGES) <= set(paper_defaults(Aand))


def _normal(value: object) -> object:
    return list(value) if isinstance(value, tuple | list) else value


def _documented_defaults() -> dict[str, str]:
    """``argument -> default`` from the hyper-parameter table of docs/configuration.md (``a``, ``b`` | x, y rows)."""
    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_0-9]+)`", cells[0])
        values = [v.strip().strip("`") for v in re.split(r",\s*(?![^()]*\))", cells[1])]
        if len(names) == len(values):
            rows.update(zip(names, values, strict=True))
    return rows


def _as_text(value: object) -> str:
    if isinstance(value, tuple | list):
        return "(" + ", ".join(map(str, value)) + ")"
    return str(value)


def test_documented_defaults_are_the_signature_defaults() -> None:
    documented = _documented_defaults()
    defaults = paper_defaults(Aand)
    assert set(METHOD) <= set(documented), sorted(set(METHOD) - set(documented))
    wrong = {
        name: (documented[name], _as_text(default))
        for name, default in defaults.items()
        if name in documented and documented[name] != _as_text(default)
    }
    assert wrong == {}
