"""Every time and ratio setting is a finite number. `float()` reads "nan" and "inf", and they
passed the bounds checks (a comparison with NaN is false): AQUILA_RETRAIN_GROWTH=inf made
every description of a trained collection fail (math.ceil of infinity), a NaN interval made
the loop that sleeps on it die at its first sleep under uvloop (no snapshots ever, with
AQUILA_SNAPSHOT_INTERVAL_S=nan), and AQUILA_TOMBSTONE_GRACE_S=inf (meant as "never purge")
failed every healer round at its anti-entropy step, before it healed anything."""

from __future__ import annotations

import dataclasses

import pytest

from aquila.node.config import ENV_NAMES, NodeConfig, load_config

FLOATS = [f.name for f in dataclasses.fields(NodeConfig) if str(f.type).startswith("float")]


def test_the_float_settings_are_known() -> None:
    assert {"retrain_growth", "snapshot_interval_s", "tombstone_grace_s"} <= set(FLOATS)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN", "Infinity"])
@pytest.mark.parametrize("name", FLOATS)
def test_a_float_setting_that_is_not_finite_is_refused(name: str, raw: str) -> None:
    with pytest.raises(ValueError, match=name):
        load_config(environ={ENV_NAMES[name]: raw})
    with pytest.raises(ValueError, match=name):
        load_config({name: float(raw)}, environ={})


def test_finite_floats_still_pass() -> None:
    config = load_config(environ={"AQUILA_RETRAIN_GROWTH": "1.5",
                                  "AQUILA_TOMBSTONE_GRACE_S": "0"})
    assert config.retrain_growth == 1.5 and config.tombstone_grace_s == 0.0
