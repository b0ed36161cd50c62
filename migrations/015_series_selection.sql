-- Series selection by QC figures (issue #8, GET /api/series): published series by modality,
-- then their series_qc figures. The partial index holds published series only, in the order
-- the selection answers them, so a page of "CT, published" is read in order without a sort;
-- the series_qc index serves slice count and thickness ranges together.
CREATE INDEX series_published_modality ON series (modality, series_uid)
    WHERE state = 'published';
CREATE INDEX series_qc_selection
    ON series_qc (slice_count, slice_thickness_min, slice_thickness_max);
