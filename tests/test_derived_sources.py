"""A derived object whose source series Carina does not hold is quarantined with that reason
(rule derived_sources), and evaluated again, then published, when the source arrives: highdicom
SEG and TID 1500 SR sent before their CT in separate requests, one naming a series never sent,
and the ordinary case of everything in one request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import pytest
from pydicom import Dataset

from tests.conftest import Server
from tests.derived import build
from tests.factory import Phi

pytestmark = pytest.mark.slow
# Keeps the SR content tree (the Basic Profile removes ContentSequence), as test_derived does.
COLLECTION = "DERIVED"
OPTIONS = ("retain_long_modified_dates", "clean_structured_content")


@dataclass(frozen=True)
class Sent:
    """What one study's objects became: state and hold findings per series, by role."""

    server: Server

    def series_of(self, datasets: list[Dataset]) -> str:
        """Store datasets in the collection; their de-identified series UID."""
        _, series, _ = self.server.store(datasets, COLLECTION)
        return series

    def state(self, series: str) -> str:
        return self.server.settled()[series]

    def holds(self, series: str) -> dict[str, str]:
        """code -> message of the series' hold findings."""
        with psycopg.connect(self.server.database_url) as conn:  # type: ignore[arg-type]
            rows = conn.execute(
                "SELECT code, message FROM series_findings"
                " WHERE series_uid = %s AND severity = 'hold'",
                (series,),
            ).fetchall()
        return dict(rows)


@pytest.fixture(scope="module")
def sent(server_factory: Callable[..., Server]) -> Sent:
    server = server_factory()
    server.create_collection(COLLECTION, *[arg for o in OPTIONS for arg in ("--option", o)])
    return Sent(server)


@pytest.mark.parametrize("role", ["seg", "sr"])
def test_derived_object_before_its_ct_is_held_then_published_when_the_ct_arrives(
    sent: Sent, role: str
) -> None:
    cts, seg, sr = build(Phi())
    derived_series = sent.series_of([seg if role == "seg" else sr])
    assert sent.state(derived_series) == "quarantined"
    [message] = sent.holds(derived_series).values()
    assert "derived-source-missing" in sent.holds(derived_series)

    ct_series = sent.series_of(cts)
    assert sent.state(ct_series) == "published"
    assert ct_series in message  # the reason named the (de-identified) series it waited for
    assert sent.state(derived_series) == "published"
    assert sent.holds(derived_series) == {}
    r = sent.server.http.get(
        f"{sent.server.url}/api/derived-objects", params={"series": derived_series}, timeout=30
    )
    assert [row["problems"] for row in r.json()] == [[]]


def test_seg_naming_a_series_never_sent_stays_held_with_the_reason(sent: Sent) -> None:
    _, seg, _ = build(Phi())
    seg_series = sent.series_of([seg])
    unrelated = sent.series_of(build(Phi())[0])  # another CT arriving rechecks nothing here
    assert sent.state(unrelated) == "published"
    assert sent.state(seg_series) == "quarantined"
    message = sent.holds(seg_series)["derived-source-missing"]
    assert "1 derived object(s) reference series that Carina does not hold" in message
    r = sent.server.http.get(
        f"{sent.server.dicomweb}/series", params={"SeriesInstanceUID": seg_series}, timeout=30
    )
    assert r.status_code == 204
    # Nor do the derived-object searches show what the held series holds.
    for search in ("segments", "derived-objects"):
        r = sent.server.http.get(
            f"{sent.server.url}/api/{search}", params={"series": seg_series}, timeout=30
        )
        assert r.status_code == 200 and r.json() == [], (search, r.text)


def test_derived_objects_sent_with_their_ct_are_published(sent: Sent) -> None:
    cts, seg, sr = build(Phi())
    client = sent.server.client(sent.server.root(COLLECTION))
    response = client.store_instances([*cts, seg, sr])
    states = sent.server.settled()
    stored = {str(item.RetrieveURL).split("/")[-3] for item in response.ReferencedSOPSequence}
    assert len(stored) == 3  # CT, SEG and SR series
    assert {states[series] for series in stored} == {"published"}


def test_the_rule_can_be_turned_off_per_collection(sent: Sent) -> None:
    sent.server.set_rules(COLLECTION, "derived_sources.enabled=false")
    try:
        _, seg, _ = build(Phi())
        assert sent.state(sent.series_of([seg])) == "published"
    finally:
        sent.server.set_rules(COLLECTION, "derived_sources.enabled=true")
