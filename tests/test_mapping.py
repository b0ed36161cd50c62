"""Pseudonym mapping files: loaded per collection from the CLI, applied at intake, never served."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from pydicom import Dataset

from carina.curation.mapping_file import MappingFileError, read_mapping_file
from carina.curation.pseudonyms import Pseudonymizer, collection_key
from tests.conftest import Server, run_cli
from tests.factory import Phi, ct_instance, to_bytes

pytestmark = pytest.mark.slow

MAPPED = Phi(patient_id="MRN-5550101", patient_name="DOE^JANE^MAPPED")
UNMAPPED = Phi(patient_id="MRN-5550202", patient_name="ROE^RICHARD^UNMAPPED")
MAPPING = "original_id,research_id,research_name\nMRN-5550101,LDCT-0001,LDCT-0001^SUBJECT\n"


def stow(server: Server, url: str, *datasets: Dataset) -> requests.Response:
    """One STOW-RS request with the datasets as its parts (plain HTTP, to see the raw answer),
    sent with the server's admin token."""
    boundary = "MAPPINGTEST"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_bytes(ds) + b"\r\n"
        for ds in datasets
    )
    answer = server.http.post(
        url + "/studies",
        data=body + f"--{boundary}--\r\n".encode(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
        timeout=120,
    )
    server.settled()
    return answer


def _stow(server: Server, url: str, *phis: Phi) -> requests.Response:
    """One STOW-RS request with one small instance of each patient."""
    return stow(server, url, *(ct_instance(phi, 1, rows=16, columns=16) for phi in phis))


@pytest.fixture(scope="module")
def mapped(server: Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Server, list[str]]:
    """Collection MAPPED with a mapping for one patient, loaded with the server's key."""
    mapping = tmp_path_factory.mktemp("cli") / "map.csv"
    mapping.write_text(MAPPING)
    outputs = []
    for args in (
        ("collection", "create", "MAPPED"),
        ("collection", "mapping", "MAPPED", "--file", str(mapping)),
    ):
        done = server.run_cli(*args, CARINA_SECRET_KEY=server.secret_key)
        assert done.returncode == 0, done.stderr
        outputs += [done.stdout, done.stderr]
    return server, outputs


def _patients(server: Server, url: str) -> dict[str, str]:
    """PatientID -> PatientName of every study in a DICOMweb root."""
    found = server.http.get(url + "/studies", params={"includefield": "00100010"}, timeout=30)
    found.raise_for_status()
    return {
        s["00100020"]["Value"][0]: s["00100010"]["Value"][0]["Alphabetic"] for s in found.json()
    }


def test_mapped_and_unmapped_patients_in_one_stow(mapped: tuple[Server, list[str]]) -> None:
    server, cli_output = mapped
    root = server.url + "/collections/MAPPED/dicomweb"
    answer = _stow(server, root, MAPPED, UNMAPPED)
    assert answer.status_code == 202, answer.text  # all stored, coerced
    patients = _patients(server, root)
    keyed = Pseudonymizer(collection_key(server.secret_key.encode(), "MAPPED"))
    assert patients == {
        "LDCT-0001": "LDCT-0001^SUBJECT",  # the submitter's research ID and name
        keyed.patient_id(UNMAPPED.patient_id): keyed.patient_id(UNMAPPED.patient_id),
    }
    # Nothing that links an original to its research ID is served or logged anywhere.
    study = next(iter(server.http.get(root + "/studies", timeout=30).json()))
    metadata = server.http.get(
        root + f"/studies/{study['0020000D']['Value'][0]}/metadata", timeout=30
    ).text
    seen = [answer.text, metadata, server.log.read_text(), *cli_output]
    for phi in (MAPPED, UNMAPPED):
        assert not [text for text in seen if phi.patient_id in text or phi.patient_name in text]


def test_mapping_loaded_with_another_key_refuses_instances(
    mapped: tuple[Server, list[str]], database_url: str, tmp_path: Path
) -> None:
    server, _ = mapped
    (tmp_path / "map.csv").write_text(MAPPING)
    for args in (
        ("collection", "create", "OTHERKEY"),
        ("collection", "mapping", "OTHERKEY", "--file", str(tmp_path / "map.csv")),
    ):
        done = run_cli(database_url, tmp_path, *args, CARINA_SECRET_KEY="not-the-server-key")
        assert done.returncode == 0, done.stderr
    answer = _stow(server, server.url + "/collections/OTHERKEY/dicomweb", MAPPED)
    assert answer.status_code == 409, answer.text
    assert "another secret key" in answer.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("patient,research\nMRN-1,R-1\n", "first line must name the columns"),
        ("original_id,research_id\n", "no subjects"),
        ("original_id,research_id\nMRN-1,\n", "line 2: research_id is empty"),
        ("original_id,research_id\n,R-1\n", "line 2: original_id is empty"),
        ("original_id,research_id\nMRN-1,R-1\nMRN-1,R-2\n", "line 3: the same original_id"),
        ("original_id,research_id\nMRN-1,R-1\nMRN-2,R-1\n", "line 3: the same research_id"),
        ("original_id,research_id\nMRN-1,R\\1\n", "not a valid PatientID"),
        ("original_id,research_id\nMRN-1," + "R" * 65 + "\n", "not a valid PatientID"),
        ("original_id,research_id,research_name\nMRN-1,R-1,A\\B\n", "not a valid PatientName"),
        ("original_id,research_id\nMRN-1,R-1,extra\n", "more cells than columns"),
    ],
)
def test_bad_mapping_file_is_refused_with_a_reason_that_quotes_no_id(
    content: str, message: str
) -> None:
    with pytest.raises(MappingFileError) as refused:
        read_mapping_file(content.encode(), Pseudonymizer(b"k" * 32))
    assert message in str(refused.value)
    assert "MRN-" not in str(refused.value)


def test_cli_refuses_a_mapping_for_an_unknown_collection(
    mapped: tuple[Server, list[str]], database_url: str, tmp_path: Path
) -> None:
    (tmp_path / "map.csv").write_text(MAPPING)
    done = run_cli(
        database_url,
        tmp_path,
        "collection",
        "mapping",
        "NOSUCH",
        "--file",
        str(tmp_path / "map.csv"),
    )
    assert done.returncode == 1
    assert "no collection NOSUCH" in done.stderr
    assert "MRN-" not in done.stderr + done.stdout
