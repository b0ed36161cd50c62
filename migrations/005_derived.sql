-- Derived objects indexed for search: the segments of DICOM SEG instances (PS3.3 C.8.20.4
-- Segment Description) and the numeric measurements of TID 1500 Measurement Reports (PS3.16
-- TID 1500, groups TID 1410 / 1411 / 1501 and measurements TID 300). Rows are rebuilt from the
-- stored object (delete-then-insert per sop_uid) and go with their instance.
-- Codes are kept as (value, scheme, meaning) triples; searches match (scheme, value).

CREATE TABLE segments (
    sop_uid               text NOT NULL REFERENCES instances (sop_uid) ON DELETE CASCADE,
    series_uid            text NOT NULL,
    study_uid             text NOT NULL,
    collection            text NOT NULL REFERENCES collections (name),
    segment_number        integer NOT NULL,
    label                 text,
    category_value        text,
    category_scheme       text,
    category_meaning      text,
    type_value            text,
    type_scheme           text,
    type_meaning          text,
    -- [{"value", "scheme", "meaning"}, ...] (Segmented Property Type Modifier Code Sequence)
    type_modifiers        jsonb NOT NULL DEFAULT '[]',
    anatomic_region_value   text,
    anatomic_region_scheme  text,
    anatomic_region_meaning text,
    algorithm_type        text,
    algorithm_name        text,
    tracking_id           text,
    tracking_uid          text,
    referenced_series_uid text,
    frame_count           integer,
    PRIMARY KEY (sop_uid, segment_number)
);
CREATE INDEX segments_type ON segments (type_scheme, type_value);
CREATE INDEX segments_category ON segments (category_scheme, category_value);
CREATE INDEX segments_collection ON segments (collection);
CREATE INDEX segments_study ON segments (study_uid);
CREATE INDEX segments_referenced_series ON segments (referenced_series_uid);
CREATE INDEX segments_algorithm_name ON segments (algorithm_name);

CREATE TABLE measurements (
    pk                     bigserial PRIMARY KEY,
    sop_uid                text NOT NULL REFERENCES instances (sop_uid) ON DELETE CASCADE,
    series_uid             text NOT NULL,
    study_uid              text NOT NULL,
    collection             text NOT NULL REFERENCES collections (name),
    -- position of the measurement group in the report (0-based) and its template
    group_index            integer NOT NULL,
    group_template         text,
    tracking_id            text,
    tracking_uid           text,
    finding_value          text,
    finding_scheme         text,
    finding_meaning        text,
    finding_site_value     text,
    finding_site_scheme    text,
    finding_site_meaning   text,
    concept_value          text NOT NULL,
    concept_scheme         text NOT NULL,
    concept_meaning        text,
    value                  double precision,
    -- UCUM code (PS3.16 CID 82)
    unit_value             text,
    unit_meaning           text,
    derivation_value       text,
    derivation_scheme      text,
    derivation_meaning     text,
    method_value           text,
    method_scheme          text,
    method_meaning         text,
    referenced_seg_sop_uid text,
    referenced_segment_number integer,
    source_series_uid      text,
    -- the group's qualitative evaluations: [{"concept": {...}, "value": {...}}, ...]
    evaluations            jsonb NOT NULL DEFAULT '[]'
);
CREATE INDEX measurements_sop ON measurements (sop_uid);
CREATE INDEX measurements_concept_value ON measurements (concept_scheme, concept_value, value);
CREATE INDEX measurements_finding ON measurements (finding_scheme, finding_value);
CREATE INDEX measurements_site ON measurements
    (collection, finding_site_scheme, finding_site_value);
CREATE INDEX measurements_site_any ON measurements (finding_site_scheme, finding_site_value);
CREATE INDEX measurements_study ON measurements (study_uid);
CREATE INDEX measurements_source_series ON measurements (source_series_uid);
