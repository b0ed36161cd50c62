"""Per-collection rule settings: dotted paths typed by the rules' own settings dataclasses."""

from __future__ import annotations

import pytest

from carina.curation.rule_settings import RuleSettingError, config_from, describe, set_value


def test_settings_are_typed_nested_and_pruned_when_unset() -> None:
    overrides = set_value({}, "geometry.max_slices", "500")
    overrides = set_value(overrides, "burned_in.enabled", "off")
    overrides = set_value(overrides, "geometry.tolerances.orientation", "0.01")
    overrides = set_value(overrides, "burned_in.modalities", "US, XA")
    assert overrides == {
        "geometry": {"max_slices": 500, "tolerances": {"orientation": 0.01}},
        "burned_in": {"enabled": False, "modalities": ["US", "XA"]},
    }
    config = config_from(overrides)
    assert config.geometry.max_slices == 500
    assert config.geometry.tolerances.orientation == 0.01
    assert config.burned_in.modalities == frozenset({"US", "XA"})
    assert not config.burned_in.enabled
    assert set_value(overrides, "geometry.max_slices", "none")["geometry"]["max_slices"] is None
    back = set_value(set_value(overrides, "geometry.max_slices", None), "burned_in.enabled", None)
    back = set_value(
        set_value(back, "burned_in.modalities", None), "geometry.tolerances.orientation", None
    )
    assert back == {}


def test_describe_lists_every_settable_setting_and_no_callables() -> None:
    paths = dict(describe(config_from({})))
    assert paths["geometry.max_slices"] is None
    assert paths["residual_phi.pattern_severity"] == "hold"
    assert "burned_in.detector" not in paths
    assert "private.safe" not in paths


@pytest.mark.parametrize(
    ("path", "raw", "message"),
    [
        ("geometry.max_slice", "3", "no such setting"),
        ("nothing.enabled", "true", "no such setting"),
        ("geometry.max_slices", "many", "is a number"),
        ("geometry.max_slices", "-1", "cannot be negative"),
        ("geometry.enabled", "maybe", "true or false"),
        ("residual_phi.pattern_severity", "loud", "one of hold, warn, info"),
        ("burned_in.detector", "ocr", "cannot be set"),
        ("geometry", "3", "name a rule and a setting"),
        ("geometry.max_slices.x", "3", "no settings under it"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(path: str, raw: str, message: str) -> None:
    with pytest.raises(RuleSettingError, match=message):
        set_value({}, path, raw)


def test_stored_settings_that_no_longer_exist_are_refused_when_read() -> None:
    with pytest.raises(RuleSettingError, match="no such setting"):
        config_from({"geometry": {"retired": 1}})
