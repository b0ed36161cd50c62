-- Carina index: patients / studies / series / instances.
-- Key attributes are columns (indexed for QIDO); each level keeps its own DICOM JSON attributes
-- (attrs) so QIDO answers come from here, and each instance keeps its whole DICOM JSON metadata
-- with bulk data left out (PS3.18 F.2).

CREATE TABLE patients (
    pk           bigserial PRIMARY KEY,
    collection   text NOT NULL,
    patient_id   text NOT NULL,
    patient_name text,
    birth_date   text,
    sex          text,
    attrs        jsonb NOT NULL DEFAULT '{}',
    UNIQUE (collection, patient_id)
);
CREATE INDEX patients_patient_id ON patients (patient_id text_pattern_ops);
CREATE INDEX patients_name ON patients (upper(patient_name) text_pattern_ops);

CREATE TABLE studies (
    study_uid                text PRIMARY KEY,
    patient_pk               bigint NOT NULL REFERENCES patients (pk),
    collection               text NOT NULL,
    study_date               text,
    study_time               text,
    accession_number         text,
    study_id                 text,
    referring_physician_name text,
    study_description        text,
    attrs                    jsonb NOT NULL DEFAULT '{}',
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX studies_patient ON studies (patient_pk);
CREATE INDEX studies_date ON studies (study_date, study_time);
CREATE INDEX studies_accession ON studies (accession_number text_pattern_ops);
CREATE INDEX studies_study_id ON studies (study_id);
CREATE INDEX studies_collection ON studies (collection);

CREATE TABLE series (
    series_uid         text PRIMARY KEY,
    study_uid          text NOT NULL REFERENCES studies (study_uid),
    modality           text,
    series_number      integer,
    series_description text,
    pps_start_date     text,
    pps_start_time     text,
    -- incoming | published | quarantined (the curation lifecycle decides)
    state              text NOT NULL DEFAULT 'published',
    attrs              jsonb NOT NULL DEFAULT '{}',
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX series_study ON series (study_uid, series_number);
CREATE INDEX series_modality ON series (modality);
CREATE INDEX series_state ON series (state);

CREATE TABLE instances (
    sop_uid             text PRIMARY KEY,
    series_uid          text NOT NULL REFERENCES series (series_uid),
    study_uid           text NOT NULL REFERENCES studies (study_uid),
    sop_class_uid       text NOT NULL,
    instance_number     integer,
    transfer_syntax_uid text NOT NULL,
    object_key          text NOT NULL,
    size                bigint NOT NULL,
    sha256              text NOT NULL,
    metadata            jsonb NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instances_series ON instances (series_uid, instance_number);
CREATE INDEX instances_study ON instances (study_uid);
CREATE INDEX instances_sop_class ON instances (sop_class_uid);
