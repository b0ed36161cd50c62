"""QIDO-RS matching beyond the indexed columns (PS3.18 8.3.4, PS3.4 C.2.2.2): any attribute
kept in the metadata, multi-valued attributes, sequence matching, fuzzy person names, and a
clean 400 for what cannot be matched."""

from __future__ import annotations

import pytest
from pydicom import Dataset, Sequence

from tests.conftest import Server
from tests.factory import Phi, ct_instance

pytestmark = pytest.mark.slow

ACCENTED = "MÜLLER-LÜDENSCHEIDT^José Ángel"


def region(code: str, meaning: str) -> Sequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "SCT", meaning
    return Sequence([item])


@pytest.fixture(scope="module")
def studies(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Study "ct" (2 axial CT images of the chest, from ACME) and study "mr" (a derived head
    image from OTHERCO), and study "named" in a collection whose mapping gives its patient an
    accented research name. Keyed by name: the study's UID."""
    mapping = tmp_path_factory.mktemp("cli") / "map.csv"
    mapping.write_text(
        f"original_id,research_id,research_name\nMRN-FZ-1,FZ-0001,{ACCENTED}\n", encoding="utf-8"
    )
    server.create_collection("FUZZY")
    server.cli(
        "collection",
        "mapping",
        "FUZZY",
        "--file",
        str(mapping),
        CARINA_SECRET_KEY=server.secret_key,
    )
    chest = Phi(patient_id="MRN-MA-1")
    ct = [ct_instance(chest, n, rows=16, columns=16) for n in (1, 2)]
    for ds in ct:
        ds.BodyPartExamined, ds.KVP = "CHEST", 120
        ds.AnatomicRegionSequence = region("51185008", "Chest")
    mr = ct_instance(Phi(patient_id="MRN-MA-2"), 1, rows=16, columns=16)
    mr.ImageType, mr.Manufacturer, mr.BodyPartExamined = ["DERIVED", "SECONDARY"], "OTHERCO", "HEAD"
    mr.SliceThickness = 5.0
    mr.AnatomicRegionSequence = region("69536005", "Head")
    named = ct_instance(Phi(patient_id="MRN-FZ-1"), 1, rows=16, columns=16)
    named.BodyPartExamined = "ABDOMEN"
    return {
        "ct": server.store(ct)[0],
        "mr": server.store([mr])[0],
        "named": server.store([named], collection="FUZZY")[0],
    }


def found(server: Server, path: str, tag: str = "0020000D", **params: object) -> set[str]:
    r = server.http.get(f"{server.dicomweb}{path}", params=params, timeout=30)
    assert r.status_code in (200, 204), r.text
    assert "warning" not in r.headers, r.headers["warning"]
    return {i[tag]["Value"][0] for i in r.json()} if r.status_code == 200 else set()


def test_any_attribute_kept_in_metadata_matches_at_every_level(
    server: Server, studies: dict[str, str]
) -> None:
    ct, mr = studies["ct"], studies["mr"]
    assert found(server, "/studies", Manufacturer="OTHER*") == {mr}
    assert found(server, "/studies", Manufacturer="ACME") == {ct, studies["named"]}
    assert found(server, "/series", BodyPartExamined="CHEST") == {ct}
    assert found(server, "/series", **{"00180015": "HEAD"}) == {mr}  # by tag
    assert len(found(server, "/instances", "00080018", KVP="120")) == 2
    assert len(found(server, "/instances", "00080018", SliceThickness="5")) == 1
    assert found(server, f"/studies/{ct}/instances", "00080018", KVP="121") == set()
    # Two keys are both applied; the matched attribute is returned.
    r = server.http.get(
        f"{server.dicomweb}/series", params={"BodyPartExamined": "CHEST", "KVP": "120"}
    )
    [series] = r.json()
    assert series["00180015"]["Value"] == ["CHEST"]


def test_multi_valued_attribute_matches_when_any_value_does(
    server: Server, studies: dict[str, str]
) -> None:
    ct, mr = studies["ct"], studies["mr"]
    assert found(server, "/studies", ImageType="AXIAL") == {ct, studies["named"]}
    assert found(server, "/studies", ImageType="SECONDARY") == {mr}
    assert found(server, "/studies", ImageType="SECOND*") == {mr}
    assert found(server, "/studies", ImageType="ORIGINAL") == {ct, studies["named"]}


def test_sequence_matching_on_item_attributes(server: Server, studies: dict[str, str]) -> None:
    ct, mr = studies["ct"], studies["mr"]
    assert found(server, "/studies", **{"AnatomicRegionSequence.CodeValue": "51185008"}) == {ct}
    assert found(server, "/series", **{"00082218.00080100": "69536005"}) == {mr}
    assert found(server, "/studies", **{"AnatomicRegionSequence.CodeMeaning": "H*"}) == {mr}
    # Every de-identified object records the Basic Profile (PS3.16 CID 7050, 113100).
    code = {"DeidentificationMethodCodeSequence.CodeValue": "113100"}
    assert found(server, "/studies", **code) == set(studies.values())


def test_fuzzy_person_name_matching_ignores_case_accents_and_order(
    server: Server, studies: dict[str, str]
) -> None:
    named = studies["named"]
    for value in ("muller", "lüdensch", "jose^muller", "ANGEL", "Ludenscheidt José", "mül*"):
        assert found(server, "/studies", PatientName=value, fuzzymatching="true") == {named}, value
    # Each word must start a word of the name; without fuzzymatching the match is literal.
    for value in ("ose", "muller^maria"):
        assert found(server, "/studies", PatientName=value, fuzzymatching="true") == set(), value
    assert found(server, "/studies", PatientName="muller", fuzzymatching="false") == set()


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/instances", {"SliceThickness": "thin"}),
        ("/instances", {"KVP": "1e"}),
        ("/instances", {"KVP": "nan"}),
        ("/instances", {"SliceThickness": "1e999"}),
        ("/studies", {"PatientID": "MRN\x00"}),
        ("/studies", {"Manufacturer": "ACME\x00"}),
        ("/studies", {"StudyInstanceUID": "1.2.x"}),
        ("/instances", {"ReferencedSOPInstanceUID": "1..2"}),
        ("/instances", {"AcquisitionDate": "2020-13"}),
        ("/instances", {"ContentTime": "1015xx"}),
        ("/studies", {"NoSuchSequence.CodeValue": "1"}),
        ("/studies", {"PatientName.CodeValue": "x"}),
        ("/studies", {"AnatomicRegionSequence": "x"}),
        ("/studies", {"fuzzymatching": "maybe"}),
        ("/studies", {"Rows": "16"}),
        ("/studies", {"BodyPartExamined": "CHEST"}),
        ("/series", {"InstanceNumber": "1"}),
    ],
)
def test_malformed_or_misplaced_matching_value_is_400_with_reason(
    server: Server, studies: dict[str, str], path: str, params: dict[str, str]
) -> None:
    r = server.http.get(f"{server.dicomweb}{path}", params=params, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]


def test_empty_value_matching_finds_absent_and_empty_attributes(
    server: Server, studies: dict[str, str]
) -> None:
    ct, mr, named = studies["ct"], studies["mr"], studies["named"]
    # KVP is set on the CT study's instances only.
    empty = {"emptyvaluematching": "true"}
    assert found(server, "/studies", KVP='""', **empty) == {mr, named}
    assert found(server, "/studies", KVP="120", **empty) == {ct, mr, named}
    assert found(server, "/studies", KVP="120") == {ct}
    # Without the parameter "" is a literal value, which a number cannot be.
    r = server.http.get(f"{server.dicomweb}/studies", params={"KVP": '""'}, timeout=30)
    assert r.status_code == 400
    assert len(found(server, "/instances", "00080018", KVP='""', **empty)) == 2
    # An indexed attribute: the studies whose Study ID de-identification emptied.
    listed = server.http.get(f"{server.dicomweb}/studies", timeout=30).json()
    no_id = {i["0020000D"]["Value"][0] for i in listed if not i.get("00200010", {}).get("Value")}
    assert found(server, "/studies", StudyID='""', **empty) == no_id


def test_multiple_value_matching_takes_any_of_the_values(
    server: Server, studies: dict[str, str]
) -> None:
    ct, mr = studies["ct"], studies["mr"]
    multiple = {"multiplevaluematching": "true"}
    assert found(server, "/series", BodyPartExamined="CHEST\\HEAD", **multiple) == {ct, mr}
    assert found(server, "/series", BodyPartExamined="CH*\\HEA?", **multiple) == {ct, mr}
    assert found(server, "/series", BodyPartExamined="CHEST\\HEAD") == set()
    listed = server.http.get(f"{server.dicomweb}/studies", timeout=30).json()
    pid = {i["0020000D"]["Value"][0]: i["00100020"]["Value"][0] for i in listed}
    both = f"{pid[ct]}\\{pid[mr]}"
    assert found(server, "/studies", PatientID=both, **multiple) == {ct, mr}
    assert found(server, "/studies", PatientID=both) == set()


@pytest.mark.parametrize("name", ["emptyvaluematching", "multiplevaluematching"])
def test_extended_matching_parameter_must_be_true_or_false(server: Server, name: str) -> None:
    r = server.http.get(f"{server.dicomweb}/studies", params={name: "yes"}, timeout=30)
    assert r.status_code == 400
    assert name in r.json()["error"]
