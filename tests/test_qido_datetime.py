"""QIDO-RS DateTime (DT) matching with UTC offsets (PS3.4 C.2.2.2.5, PS3.18 8.3.4.1): stored
values and query values are compared as instants, each in its own offset, a query value
without one in the query's TimezoneOffsetFromUTC (else UTC)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import Server
from tests.factory import Phi, ct_instance

pytestmark = pytest.mark.slow
# Acquisitions an hour apart in UTC, written in different offsets, one in none (UTC) and one
# in the instance's TimezoneOffsetFromUTC (PS3.3 C.12.1.1.8).
SENT = (
    ("20200101120000+0100", None),
    ("20200101070000-0500", None),
    ("20200101130000", None),
    ("20200101150000", "+0100"),
)


@pytest.fixture(scope="module")
def stored(server: Server) -> dict[str, datetime]:
    """SOP Instance UID -> acquisition instant (UTC) of each stored instance, read back."""
    phi = Phi()
    sent = []
    for n, (value, zone) in enumerate(SENT, 1):
        ds = ct_instance(phi, n, rows=8, columns=8)
        ds.AcquisitionDateTime = value
        if zone:
            ds.TimezoneOffsetFromUTC = zone
        sent.append(ds)
    server.store(sent)
    r = server.http.get(
        f"{server.dicomweb}/instances",
        params={"includefield": "AcquisitionDateTime,TimezoneOffsetFromUTC"},
    )
    out = {}
    for item in r.json():
        value = item["0008002A"]["Value"][0]
        zone = item.get("00080201", {}).get("Value", ["+0000"])[0]
        out[item["00080018"]["Value"][0]] = instant(value, zone)
    return out


def instant(value: str, zone: str) -> datetime:
    """A full-precision DT value as an aware datetime; in zone when it has no offset."""
    if value[-5] not in "+-":
        value += zone
    return datetime.strptime(value, "%Y%m%d%H%M%S%z")


def dt(at: datetime, offset: str) -> str:
    """at written as a DT value in offset (+HHMM/-HHMM), with the offset."""
    sign = -1 if offset[0] == "-" else 1
    zone = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:])) * sign
    return (at.astimezone(UTC) + zone).strftime("%Y%m%d%H%M%S") + offset


def found(server: Server, **params: str) -> set[str]:
    r = server.http.get(f"{server.dicomweb}/instances", params=params, timeout=30)
    assert r.status_code in (200, 204), r.text
    return {i["00080018"]["Value"][0] for i in r.json()} if r.status_code == 200 else set()


def test_stored_instants_are_distinct(stored: dict[str, datetime]) -> None:
    assert len(set(stored.values())) == len(SENT)


@pytest.mark.parametrize("offset", ["+0000", "+0530", "-0800"])
def test_single_value_in_any_offset_matches_the_same_instant(
    server: Server, stored: dict[str, datetime], offset: str
) -> None:
    for sop, at in stored.items():
        assert found(server, AcquisitionDateTime=dt(at, offset)) == {sop}


def test_range_with_offsets_selects_by_instant(server: Server, stored: dict[str, datetime]) -> None:
    first, *_ = ordered = sorted(stored, key=stored.get)  # type: ignore[arg-type]
    lo = dt(stored[ordered[0]], "+0900")
    hi = dt(stored[ordered[1]], "-0300")
    assert found(server, AcquisitionDateTime=f"{lo}-{hi}") == set(ordered[:2])
    assert found(server, AcquisitionDateTime=f"-{lo}") == {first}
    assert found(server, AcquisitionDateTime=f"{hi}-") == set(ordered[1:])


def test_timezone_offset_from_utc_applies_to_values_without_offset(
    server: Server, stored: dict[str, datetime]
) -> None:
    for sop, at in stored.items():
        local = dt(at, "+0200")[:-5]
        query = {"AcquisitionDateTime": local, "TimezoneOffsetFromUTC": "+0200"}
        assert found(server, **query) == {sop}
        assert found(server, **{"AcquisitionDateTime": local, "00080201": "+0200"}) == {sop}


@pytest.mark.parametrize(
    "params",
    [
        {"AcquisitionDateTime": "20200101+2500"},
        {"AcquisitionDateTime": "20201301"},
        {"AcquisitionDateTime": "2020010112-x"},
        {"AcquisitionDateTime": "-"},
        {"AcquisitionDateTime": "2020", "TimezoneOffsetFromUTC": "0100"},
        {"AcquisitionDateTime": "2020", "TimezoneOffsetFromUTC": "+1500"},
        {"AcquisitionDateTime": "2020", "TimezoneOffsetFromUTC": "-1300"},
        {"AcquisitionDateTime": "2020", "TimezoneOffsetFromUTC": "+0160"},
    ],
)
def test_malformed_date_times_and_offsets_are_400(
    server: Server, stored: dict[str, datetime], params: dict[str, str]
) -> None:
    r = server.http.get(f"{server.dicomweb}/instances", params=params, timeout=30)
    assert r.status_code == 400, params
    assert r.json()["error"]
