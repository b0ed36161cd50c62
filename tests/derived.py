"""Derived objects made with highdicom from a generated identified CT series: a DICOM SEG
and a TID 1500 Comprehensive 3D SR that reference it (for reference-integrity tests)."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from tests.factory import Phi, ct_series


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
        series_instance_uid=hd.UID(),
        series_number=10,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ACME",
        manufacturer_model_name="Seg",
        software_versions="1",
        device_serial_number="SN-1",
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
