-- Derived objects as a whole, and the 3D landmarks of SR.
--
-- derived_objects: one row per SEG, SR, parametric map or RT structure set, with the problems
-- found while indexing it (what could not be read is flagged, never lost), and derived_sources:
-- the series each one was made from (PS3.3 C.12.2 Common Instance Reference, SR evidence,
-- C.8.8.5 RT Referenced Series), so a user can ask "what was derived from this series".
-- landmarks: every SCOORD3D content item of an SR (PS3.3 C.18.9), with the tracking
-- identifier, finding and finding site of its measurement group (PS3.16 TID 1500), as IDC
-- publishes body-part-regression landmarks.

CREATE TABLE derived_objects (
    sop_uid       text PRIMARY KEY REFERENCES instances (sop_uid) ON DELETE CASCADE,
    series_uid    text NOT NULL,
    study_uid     text NOT NULL,
    collection    text NOT NULL REFERENCES collections (name),
    sop_class_uid text NOT NULL,
    -- SEG | SR | PM (parametric map) | RTSTRUCT
    kind          text NOT NULL,
    -- Content Label, Structure Set Label or the SR document title
    label         text,
    -- sentences saying what could not be indexed: ["...", ...]
    problems      jsonb NOT NULL DEFAULT '[]'
);
CREATE INDEX derived_objects_kind ON derived_objects (kind);
CREATE INDEX derived_objects_collection ON derived_objects (collection);
CREATE INDEX derived_objects_study ON derived_objects (study_uid);
CREATE INDEX derived_objects_series ON derived_objects (series_uid);

CREATE TABLE derived_sources (
    sop_uid           text NOT NULL REFERENCES derived_objects (sop_uid) ON DELETE CASCADE,
    source_series_uid text NOT NULL,
    PRIMARY KEY (sop_uid, source_series_uid)
);
CREATE INDEX derived_sources_series ON derived_sources (source_series_uid);

-- One row per (object, source series); an object without a source has one row with none.
-- A source series the archive does not hold is a problem computed here, at query time, so it
-- clears itself when the series arrives after its derived object.
CREATE VIEW derived_object_sources AS
SELECT o.sop_uid, o.series_uid, o.study_uid, o.collection, o.sop_class_uid, o.kind, o.label,
       s.source_series_uid,
       o.problems || CASE
           WHEN s.source_series_uid IS NULL THEN
               jsonb_build_array('references no source series')
           WHEN NOT EXISTS (SELECT 1 FROM series x WHERE x.series_uid = s.source_series_uid) THEN
               jsonb_build_array('source series ' || s.source_series_uid || ' is not held')
           ELSE '[]'::jsonb
       END AS problems
FROM derived_objects o
LEFT JOIN derived_sources s ON s.sop_uid = o.sop_uid;

CREATE TABLE landmarks (
    pk                    bigserial PRIMARY KEY,
    sop_uid               text NOT NULL REFERENCES instances (sop_uid) ON DELETE CASCADE,
    series_uid            text NOT NULL,
    study_uid             text NOT NULL,
    collection            text NOT NULL REFERENCES collections (name),
    -- position of the SCOORD3D item in the content tree (depth first, 0-based)
    item_index            integer NOT NULL,
    concept_value         text,
    concept_scheme        text,
    concept_meaning       text,
    -- POINT | MULTIPOINT | POLYLINE | POLYGON | ELLIPSE | ELLIPSOID (PS3.3 C.18.9.1.2)
    graphic_type          text NOT NULL,
    -- [[x, y, z], ...] in mm, patient coordinates of frame_of_reference_uid
    coordinates           jsonb NOT NULL,
    frame_of_reference_uid text NOT NULL,
    fiducial_uid          text,
    -- the measurement group holding the item, when it is in one
    group_index           integer,
    tracking_id           text,
    tracking_uid          text,
    finding_value         text,
    finding_scheme        text,
    finding_meaning       text,
    finding_site_value    text,
    finding_site_scheme   text,
    finding_site_meaning  text,
    -- e.g. SCT 264217000 "Superior": which end of the structure a landmark marks
    finding_site_modifier_value   text,
    finding_site_modifier_scheme  text,
    finding_site_modifier_meaning text,
    source_series_uid     text
);
CREATE INDEX landmarks_sop ON landmarks (sop_uid);
CREATE INDEX landmarks_concept ON landmarks (concept_scheme, concept_value);
CREATE INDEX landmarks_finding ON landmarks (finding_scheme, finding_value);
CREATE INDEX landmarks_site ON landmarks (finding_site_scheme, finding_site_value);
CREATE INDEX landmarks_collection ON landmarks (collection);
CREATE INDEX landmarks_study ON landmarks (study_uid);
CREATE INDEX landmarks_source_series ON landmarks (source_series_uid);
