"""The derived objects Carina stores and serves are valid DICOM: two SEGs (one segment; two
with a type modifier and an anatomic region) and three TID 1500 SRs (measurements; 3D
landmarks; IBSI shape features of a referenced segment), STOWed with their CT series and
retrieved over WADO-RS, pass dicom3tools' dciodvfy with no error, and the SRs pass PixelMed's
DicomSRValidator (IOD and TID 1500 template rules). (dciodvfy does not know the Label Map
Segmentation IOD of Sup 243 yet, so label-map SEGs are not checked here.)"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.derived import KEEP_STRUCTURED_CONTENT, build, landmark_sr, radiomics
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow
# Keep the SR content tree (ContentSequence is X under the Basic Profile).
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")  # Debian's libpixelmed-java
# Debian's DicomSRValidator script fails on Java 17+: its template XSLT has more XPath
# operators than the JDK's secure-processing limits allow; lifting the limits lets it run.
_JAVA_LIMITS = [
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]


@pytest.fixture(scope="module")
def retrieved(
    server_factory: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The stored SEG, SR and landmark SR as WADO-RS serves them, written to files."""
    server = server_factory(CARINA_DEID_OPTIONS=KEEP_STRUCTURED_CONTENT)
    cts, seg, sr = build(Phi())
    client = server.client()
    assert "FailedSOPSequence" not in client.store_instances(cts)
    tmp = tmp_path_factory.mktemp("stored")
    out = {}
    others = ct_series(Phi(), 4, rows=16, columns=16)
    assert "FailedSOPSequence" not in client.store_instances(others)
    radiomics_seg, radiomics_sr = radiomics(others)
    for name, ds in (
        ("seg", seg),
        ("sr", sr),
        ("landmarks", landmark_sr(cts)),
        ("radiomics_seg", radiomics_seg),  # two segments, a modifier, an anatomic region
        ("radiomics_sr", radiomics_sr),  # IBSI shape features of a referenced segment
    ):
        [item] = client.store_instances([ds]).ReferencedSOPSequence
        study, _, series, _, sop = str(item.RetrieveURL).split("/")[-5:]
        server.settled()
        out[name] = tmp / f"{name}.dcm"
        client.retrieve_instance(study, series, sop).save_as(out[name], enforce_file_format=True)
    return out


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("name", ["seg", "sr", "landmarks", "radiomics_seg", "radiomics_sr"])
def test_stored_derived_object_passes_dciodvfy(retrieved: dict[str, Path], name: str) -> None:
    assert shutil.which("dciodvfy"), "dicom3tools is installed by scripts/test"
    assert _dciodvfy_errors(retrieved[name]) == []


@pytest.fixture(scope="module")
def sr_validator(retrieved: dict[str, Path]) -> dict[str, tuple[int, str]]:
    """DicomSRValidator's exit status and output for each stored SR (run side by side: each
    run is a JVM start and a template compile, tens of seconds on a busy machine)."""
    assert shutil.which("java") and PIXELMED_JAR.exists(), "pixelmed-apps: scripts/test"
    runs = {
        name: subprocess.Popen(
            [
                "java",
                *_JAVA_LIMITS,
                "-cp",
                str(PIXELMED_JAR),
                "com.pixelmed.validate.DicomSRValidator",
                str(retrieved[name]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("sr", "landmarks", "radiomics_sr")
    }
    outputs = {name: run.communicate(timeout=600)[0] for name, run in runs.items()}
    return {name: (runs[name].returncode, output) for name, output in outputs.items()}


@pytest.mark.parametrize("name", ["sr", "landmarks", "radiomics_sr"])
def test_stored_sr_passes_pixelmed_sr_validator(
    sr_validator: dict[str, tuple[int, str]], name: str
) -> None:
    status, output = sr_validator[name]
    assert status == 0, output
    assert "Found Root Template TID_1500 (MeasurementReport)" in output
    assert "Root Template Validation Complete" in output
    assert "IOD validation complete" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == []
