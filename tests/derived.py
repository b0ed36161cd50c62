"""Derived objects made from a generated identified CT series: a DICOM SEG, a TID 1500
Comprehensive 3D SR with measurements, one with 3D landmarks, a parametric map (all with
highdicom) and an RT structure set (pydicom), each referencing the CT series."""

from __future__ import annotations

import copy
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from tests.factory import Phi, ct_series

# CARINA_DEID_OPTIONS of a server that indexes what these objects say: PS3.15 ContentSequence
# is X under the Basic Profile, kept (cleaned) with clean_structured_content.
KEEP_STRUCTURED_CONTENT = '["retain_long_modified_dates","clean_structured_content"]'


def new_instance(series_number: int, model: str, serial: str) -> dict[str, Any]:
    """The identity and equipment arguments of a highdicom SEG or parametric map: a new
    series of one instance, made by an ACME device."""
    return {
        "series_instance_uid": hd.UID(),
        "series_number": series_number,
        "sop_instance_uid": hd.UID(),
        "instance_number": 1,
        "manufacturer": "ACME",
        "manufacturer_model_name": model,
        "software_versions": "1",
        "device_serial_number": serial,
    }


def build(phi: Phi) -> tuple[list[Dataset], Dataset, Dataset]:
    """(CT series of 3, SEG of one segment on the middle slice, SR with one measurement)."""
    cts = ct_series(phi, 3, rows=16, columns=16)
    for ds in cts:  # complete the CT IOD so the validator has nothing to say of the input
        ds.PatientPosition = "HFS"
        ds.Laterality = ""
        ds.PositionReferenceIndicator = ""
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
    mask = np.zeros((3, 16, 16), dtype=bool)
    mask[1, 4:10, 4:10] = True
    desc = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lesion 1",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=cts,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc],
        **new_instance(10, "Seg", "SN-1"),
    )
    tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="lesion 1")
    volume = hd.sr.Measurement(name=codes.SCT.Volume, value=1.5, unit=codes.UCUM.CubicMillimeter)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.array([[1.0, 1], [3, 1], [3, 3], [1.0, 1]]),
            source_image=hd.sr.SourceImageForRegion.from_source_image(cts[1]),
        ),
        finding_type=codes.SCT.Neoplasm,
        measurements=[volume],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Person,
                observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                    name="Reader^Rita"
                ),
            )
        ),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=cts,
        content=report,
        series_number=11,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ACME",
    )
    return cts, seg, sr


def landmark_sr(cts: list[Dataset]) -> Dataset:
    """A Comprehensive 3D SR (TID 1500) with SCOORD3D landmarks as IDC publishes body-part
    regression ones: a POINT at the top of the kidney and one at the top of the liver (finding
    site with a topographical modifier), and a POLYGON region of the lung."""
    frame = str(cts[0].FrameOfReferenceUID)

    def group(
        tracking: str, site: Any, graphic_type: str, points: list[list[float]]
    ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=tracking),
            referenced_region=hd.sr.ImageRegion3D(
                graphic_type=graphic_type,
                graphic_data=np.array(points),
                frame_of_reference_uid=frame,
            ),
            finding_type=codes.SCT.AnatomicalStructure,
            finding_sites=[
                hd.sr.FindingSite(site, topographical_modifier=codes.SCT.Superior),
            ],
        )

    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[
            group("kidney top", codes.SCT.Kidney, "POINT", [[10.5, -20.25, 3.0]]),
            group("liver top", codes.SCT.Liver, "POINT", [[-12.0, 8.0, 6.5]]),
            group(
                "lung region",
                codes.SCT.Lung,
                "POLYGON",
                [[0.0, 0, 3], [5, 0, 3], [5, 5, 3], [0.0, 0, 3]],
            ),
        ],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=cts,
        content=report,
        series_number=12,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ACME",
    )


def parametric_map(cts: list[Dataset]) -> Dataset:
    """A highdicom Parametric Map (floating-point values, one frame per CT slice)."""
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ADC",
        lut_explanation="apparent diffusion coefficient",
        unit=codes.UCUM.SquareMillimeterPerSecond,
        value_range=(0.0, 1.0),
        intercept=0,
        slope=1,
    )
    return hd.pm.ParametricMap(
        source_images=cts,
        pixel_array=np.linspace(0, 1, 3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16),
        **new_instance(13, "Maps", "SN-2"),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="ADC_MAP",
    )


def rt_structure_set(cts: list[Dataset]) -> Dataset:
    """An RT Structure Set (PS3.3 A.19) with one closed-planar ROI on the middle CT slice.
    highdicom (0.28) writes no RTSTRUCT, so it is built here with pydicom."""
    ct = cts[1]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, keyword, ct.get(keyword, ""))
    ds.FrameOfReferenceUID = ct.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ""
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 14
    ds.OperatorsName = ""
    ds.Manufacturer = "ACME"
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "TUMOUR_RS"
    ds.StructureSetDate = ct.StudyDate
    ds.StructureSetTime = "120000"
    contour_image = Dataset()
    contour_image.ReferencedSOPClassUID = ct.SOPClassUID
    contour_image.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ct.SeriesInstanceUID
    series.ContourImageSequence = [copy.deepcopy(im) for im in _image_refs(cts)]
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    study.ReferencedSOPInstanceUID = ct.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = ct.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = ct.FrameOfReferenceUID
    roi.ROIName = "GTV"
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = [roi]
    z = float(ct.ImagePositionPatient[2])
    contour = Dataset()
    contour.ContourImageSequence = [contour_image]
    contour.ContourGeometricType = "CLOSED_PLANAR"
    contour.NumberOfContourPoints = 4
    contour.ContourData = [0.0, 0.0, z, 5.0, 0.0, z, 5.0, 5.0, z, 0.0, 5.0, z]
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = [255, 0, 0]
    roi_contour.ContourSequence = [contour]
    ds.ROIContourSequence = [roi_contour]
    observation = Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = 1
    observation.RTROIInterpretedType = "GTV"
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence = [observation]
    return ds


def _image_refs(cts: list[Dataset]) -> list[Dataset]:
    refs = []
    for ct in cts:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ct.SOPClassUID
        ref.ReferencedSOPInstanceUID = ct.SOPInstanceUID
        refs.append(ref)
    return refs


# Where the two segments of two_segment_seg lie: 0-based CT slice indices of a 4-slice series.
# They share slice 2 (side by side, so a LABELMAP can hold both) and occupy different frames.
SEGMENT_SLICES = {1: (1, 2), 2: (2, 3)}


def two_segment_seg(
    cts: list[Dataset], segmentation_type: str, *, omit_empty_frames: bool = True
) -> Dataset:
    """A highdicom SEG of the given type (BINARY, FRACTIONAL or LABELMAP) with two
    SNOMED-coded segments on the slices SEGMENT_SLICES names; with omit_empty_frames=False a
    BINARY or FRACTIONAL SEG also carries every all-zero frame."""
    rows, columns = int(cts[0].Rows), int(cts[0].Columns)
    mask = np.zeros((len(cts), rows, columns, 2), dtype=np.float32)
    for slices in SEGMENT_SLICES[1]:
        mask[slices, 2:6, 2:6, 0] = 1.0
    for slices in SEGMENT_SLICES[2]:
        mask[slices, 9:14, 9:14, 1] = 1.0
    if segmentation_type != "FRACTIONAL":
        mask = mask.astype(bool)  # type: ignore[assignment]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="Segmenter", family=codes.DCM.ArtificialIntelligence, version="1"
            ),
        )
        for number, label, kind in ((1, "Liver", codes.SCT.Liver), (2, "Kidney", codes.SCT.Kidney))
    ]
    return hd.seg.Segmentation(
        source_images=cts,
        pixel_array=mask,
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        **new_instance(20, "Seg", "SN-3"),
        omit_empty_frames=omit_empty_frames,
    )


# IBSI shape features as PS3.16 CID 7477 codes them, with their UCUM units and values.
IBSI = [
    ("RNU0", "Volume of Mesh", "mm3", "cubic millimeter", 4188.79),
    ("C0JK", "Surface Area of Mesh", "mm2", "square millimeter", 1256.64),
    ("2PR5", "Surface to Volume Ratio", "/mm", "per millimeter", 0.3),
    ("QCFX", "Sphericity", "1", "no units", 0.98),
    ("SKGS", "Compactness 1", "1", "no units", 0.0398),
    ("L0JK", "Maximum 3D Diameter of a Mesh", "mm", "millimeter", 20.1),
    ("TDIC", "Major Axis in 3D Length", "mm", "millimeter", 19.5),
    ("Q3CK", "Elongation", "1", "no units", 0.97),
    ("N17B", "Flatness", "1", "no units", 0.95),
]
MARGIN = hd.sr.CodedConcept("RID5972", "RADLEX", "Margin")
SPICULATED = hd.sr.CodedConcept("112136", "DCM", "Spiculated")
VOXEL_SUM = hd.sr.CodedConcept("126030", "DCM", "Sum of segmented voxel volumes")


def radiomics(cts: list[Dataset]) -> tuple[Dataset, Dataset]:
    """(SEG, SR) as IDC publishes radiomics: two_segment_seg, its first segment with a type
    modifier, an anatomic region and a tracking identifier, and a TID 1500 report whose
    volumetric group references that segment and its source series and holds the IBSI shape
    features with a derivation, a method, a finding site with laterality and a qualitative
    evaluation."""
    seg = two_segment_seg(cts, "BINARY")
    first = seg.SegmentSequence[0]
    first.TrackingID = "nodule 1"
    first.TrackingUID = hd.UID()
    first.AnatomicRegionSequence = [hd.sr.CodedConcept.from_code(codes.SCT.Lung)]
    first.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.SCT.Right)
    ]
    measurements = [
        hd.sr.Measurement(
            name=hd.sr.CodedConcept(code, "IBSI", meaning),
            value=value,
            unit=hd.sr.CodedConcept(unit, "UCUM", unit_meaning),
            method=VOXEL_SUM if code == "RNU0" else None,
            derivation=codes.SCT.Maximum if code == "L0JK" else None,
        )
        for code, meaning, unit, unit_meaning, value in IBSI
    ]
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=first.TrackingUID, identifier=first.TrackingID
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(cts[0].SeriesInstanceUID),
        ),
        finding_type=codes.SCT.Neoplasm,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung, laterality=codes.SCT.Right)],
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(MARGIN, SPICULATED)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*cts, seg],
        content=report,
        series_number=30,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ACME",
    )
    return seg, sr
