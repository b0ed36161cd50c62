"""The derived_sources rule on generated derived objects: the source series a SEG, a TID 1500
SR and an RT structure set name are read from their DICOM JSON metadata, and an object is held
exactly when one of them is not among the series Carina holds."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from carina.curation.rules import (
    DerivedSourcesSettings,
    GeometrySettings,
    RulesConfig,
    derived_sources,
    geometry,
    referenced_series,
    run_rules,
)
from tests.derived import build, rt_structure_set, two_segment_seg
from tests.factory import Phi, ct_series
from tests.test_rules import facts_of

ON = DerivedSourcesSettings()


def _derived() -> tuple[str, dict[str, Dataset]]:
    """The CT series UID and a SEG, an SR and an RT structure set made from it."""
    cts, seg, sr = build(Phi())
    return str(cts[0].SeriesInstanceUID), {"seg": seg, "sr": sr, "rt": rt_structure_set(cts)}


@pytest.mark.parametrize("kind", ["seg", "sr", "rt"])
def test_each_kind_names_its_ct_series_as_source(kind: str) -> None:
    ct_series, objects = _derived()
    [meta] = facts_of([objects[kind]]).metadata
    assert referenced_series(meta) == [ct_series]


@pytest.mark.parametrize("kind", ["seg", "sr", "rt"])
def test_held_only_while_the_source_series_is_not_held(kind: str) -> None:
    ct_series, objects = _derived()
    facts = facts_of([objects[kind]])
    [finding] = derived_sources(facts, ON, frozenset())
    assert (finding.code, finding.severity) == ("derived-source-missing", "hold")
    assert ct_series in finding.message
    assert finding.instances == (str(objects[kind].SOPInstanceUID),)
    assert derived_sources(facts, ON, frozenset({ct_series})) == []


def test_images_and_unlooked_up_sources_are_not_judged() -> None:
    cts, seg, _ = build(Phi())
    assert derived_sources(facts_of(cts), ON, frozenset()) == []
    assert derived_sources(facts_of([seg]), ON, None) == []


def test_run_rules_applies_it_by_default_and_not_when_disabled() -> None:
    _, seg, _ = build(Phi())
    facts = facts_of([seg])
    codes = {f.code for f in run_rules(facts, held_sources=frozenset())}
    assert "derived-source-missing" in codes
    off = RulesConfig(derived_sources=DerivedSourcesSettings(enabled=False))
    codes = {f.code for f in run_rules(facts, off, held_sources=frozenset())}
    assert "derived-source-missing" not in codes


def test_a_seg_with_two_segments_on_one_slice_is_not_held_for_geometry() -> None:
    cts = ct_series(Phi(), 4, rows=16, columns=16)
    facts = facts_of([two_segment_seg(cts, "BINARY")])
    assert not facts.geometry.positions_unique  # one frame per segment on the shared slice
    assert geometry(facts, GeometrySettings()) == []
    # The rule itself is on: a CT series missing a slice is held.
    del cts[1]
    assert "geometry-missing-slices" in {
        f.code for f in geometry(facts_of(cts), GeometrySettings())
    }
