"""Identified DICOM test data made in code, with planted PHI that tests prove is gone."""

from __future__ import annotations

from dataclasses import dataclass, field
from io import BytesIO

import numpy as np
from pydicom import Dataset, Sequence
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


@dataclass(frozen=True)
class Phi:
    """The identifying values planted in a generated study."""

    patient_name: str = "SMITHERSON^JOHANNA^Q"
    patient_id: str = "MRN-7734921"
    birth_date: str = "19580314"
    study_date: str = "20240117"
    accession: str = "ACC99812377"
    institution: str = "SAINT ELSEWHERE HOSPITAL"
    physician: str = "HOUSEMAN^GREGORY"
    address: str = "42 WALLABY WAY SYDNEY"
    other_id: str = "OTHER-5550199"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_uid: str = field(default_factory=generate_uid)

    def strings(self) -> list[str]:
        """Every planted identifying string (names also by their parts)."""
        parts = [p for p in self.patient_name.split("^") if len(p) > 2]
        return [
            self.patient_name,
            *parts,
            self.patient_id,
            self.birth_date,
            self.study_date,
            self.accession,
            self.institution,
            self.physician,
            self.address,
            self.other_id,
            self.study_uid,
            self.series_uid,
            self.frame_uid,
        ]


def ct_instance(
    phi: Phi,
    number: int,
    *,
    rows: int = 64,
    columns: int = 64,
    sop_uid: str | None = None,
    seed: int | None = None,
) -> Dataset:
    """One identified CT image of the study described by phi."""
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "SITE_PACS_01"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = phi.study_date
    ds.SeriesDate = phi.study_date
    ds.AcquisitionDate = phi.study_date
    ds.ContentDate = phi.study_date
    ds.StudyTime = "101500"
    ds.ContentTime = "101501"
    ds.AccessionNumber = phi.accession
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.InstitutionName = phi.institution
    ds.InstitutionAddress = phi.address
    ds.ReferringPhysicianName = phi.physician
    ds.OperatorsName = "TECH^TERRY"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "AXIAL 1mm"
    ds.PatientName = phi.patient_name
    ds.PatientID = phi.patient_id
    ds.PatientBirthDate = phi.birth_date
    ds.PatientSex = "F"
    ds.PatientAddress = phi.address
    ds.OtherPatientIDs = phi.other_id
    ds.ImageComments = f"follow-up for {phi.patient_name} ({phi.patient_id})"
    ds.StudyInstanceUID = phi.study_uid
    ds.SeriesInstanceUID = phi.series_uid
    ds.FrameOfReferenceUID = phi.frame_uid
    ds.StudyID = "S1"
    ds.SeriesNumber = 3
    ds.InstanceNumber = number
    req = Dataset()
    req.RequestedProcedureID = phi.accession
    req.ScheduledProcedureStepID = "SPS1"
    req.RequestingPhysician = phi.physician
    ds.RequestAttributesSequence = Sequence([req])
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    rng = np.random.default_rng(seed if seed is not None else number)
    ds.PixelData = rng.integers(-1024, 3000, size=(rows, columns), dtype=np.int16).tobytes()
    # A private block holding the name, as vendors do.
    block = ds.private_block(0x0029, "ACME PRIVATE", create=True)
    block.add_new(0x10, "LO", phi.patient_name)
    return ds


def ct_series(phi: Phi, count: int, **kwargs: object) -> list[Dataset]:
    """count identified CT images of one series."""
    return [ct_instance(phi, i + 1, **kwargs) for i in range(count)]  # type: ignore[arg-type]


def burned_in_series(count: int = 3) -> list[Dataset]:
    """A small CT series whose first image says BurnedInAnnotation YES: held for review."""
    sent = ct_series(Phi(), count, rows=16, columns=16)
    sent[0].BurnedInAnnotation = "YES"
    return sent


def to_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# Where text_series burns its "text": rows 4-11, columns 4-43 (y, x, height, width).
TEXT_REGION = (4, 4, 8, 40)


def text_series(
    count: int = 2, modality: str = "CT", rows: int = 64, columns: int = 64
) -> list[Dataset]:
    """A series whose images carry burned-in "text" (bright pixels in TEXT_REGION) and say so
    (BurnedInAnnotation YES): held for review, to be redacted."""
    sent = ct_series(Phi(), count, rows=rows, columns=columns)
    y, x, height, width = TEXT_REGION
    for ds in sent:
        ds.Modality = modality
        ds.BurnedInAnnotation = "YES"
        pixels = ds.pixel_array.copy()
        pixels[y : y + height, x : x + width : 2] = 2999  # strokes of "letters"
        ds.PixelData = pixels.tobytes()
    return sent
