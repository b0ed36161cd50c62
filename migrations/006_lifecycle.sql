-- The curation lifecycle (issue #6): a series arrives as incoming, settles, is evaluated by the
-- series rules on a PostgreSQL queue, and becomes published or quarantined; a curator may
-- release or reject it. Nothing here holds PHI: findings are Carina's own sentences, the QC
-- figures are numbers, the audit names series by their de-identified UIDs.

-- Rows already present were published before the lifecycle existed and stay published; new
-- series arrive as incoming (archive/index.py writes the state explicitly as well).
ALTER TABLE series ALTER COLUMN state SET DEFAULT 'incoming';
ALTER TABLE series ADD CONSTRAINT series_state_known
    CHECK (state IN ('incoming', 'published', 'quarantined', 'rejected'));
ALTER TABLE series ADD COLUMN decided_at timestamptz;

-- What the intake worker found per instance with the original identifiers in hand (residual
-- PHI): Carina's findings only, never the identifiers. NULL: the instance was not checked.
ALTER TABLE instances ADD COLUMN intake_findings jsonb;

-- Rule settings per collection, over the defaults in code (curation/rule_settings.py):
-- {"geometry": {"max_slices": 500}, "burned_in": {"enabled": false}, ...}
ALTER TABLE collections ADD COLUMN rules jsonb NOT NULL DEFAULT '{}';

-- The queue: one row per series waiting to be evaluated. A worker takes a due row with
-- SELECT ... FOR UPDATE SKIP LOCKED and deletes it in the transaction that decides the series,
-- so a worker that dies leaves the row (unlocked by its rollback) for another.
CREATE TABLE series_jobs (
    series_uid text PRIMARY KEY REFERENCES series (series_uid) ON DELETE CASCADE,
    due_at     timestamptz NOT NULL,
    attempts   integer NOT NULL DEFAULT 0,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX series_jobs_due ON series_jobs (due_at);

-- Why a series was held (or what was noted about it), from the latest evaluation.
CREATE TABLE series_findings (
    pk         bigserial PRIMARY KEY,
    series_uid text NOT NULL REFERENCES series (series_uid) ON DELETE CASCADE,
    rule       text NOT NULL,
    code       text NOT NULL,
    severity   text NOT NULL CHECK (severity IN ('hold', 'warn', 'info')),
    message    text NOT NULL,
    -- {"attribute": keyword or private tag label, "instances": [de-identified SOP UIDs]}
    details    jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX series_findings_series ON series_findings (series_uid);
CREATE INDEX series_findings_code ON series_findings (code, severity);

-- Geometry and QC figures per series (curation/geometry.py), as IDC selects series by them.
CREATE TABLE series_qc (
    series_uid               text PRIMARY KEY REFERENCES series (series_uid) ON DELETE CASCADE,
    instance_count           integer NOT NULL,
    frame_count              integer NOT NULL,
    slice_count              integer NOT NULL,
    has_geometry             boolean NOT NULL,
    multiframe               boolean NOT NULL,
    localizer_count          integer NOT NULL,
    has_localizer            boolean NOT NULL,
    orientation_consistent   boolean NOT NULL,
    orientation_deviation    double precision NOT NULL,
    pixel_spacing_consistent boolean NOT NULL,
    dimensions_consistent    boolean NOT NULL,
    positions_unique         boolean NOT NULL,
    duplicate_positions      integer NOT NULL,
    slice_thickness_min      double precision,
    slice_thickness_max      double precision,
    spacing_min              double precision,
    spacing_max              double precision,
    spacing_mean             double precision,
    spacing_uniform          boolean NOT NULL,
    missing_slices           integer NOT NULL,
    tilt_degrees             double precision,
    tilted                   boolean NOT NULL,
    notes                    jsonb NOT NULL DEFAULT '[]',
    computed_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX series_qc_slice_count ON series_qc (slice_count);
CREATE INDEX series_qc_thickness ON series_qc (slice_thickness_min, slice_thickness_max);
CREATE INDEX series_qc_spacing ON series_qc (spacing_mean);

-- Submission manifests: the counts a submitter expects per modality; the latest per collection
-- applies. A mismatch holds the collection's series being evaluated.
CREATE TABLE manifests (
    pk          bigserial PRIMARY KEY,
    collection  text NOT NULL REFERENCES collections (name),
    -- [{"modality", "patients", "studies", "series", "instances"}, ...]
    rows        jsonb NOT NULL,
    uploaded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX manifests_collection ON manifests (collection, pk);

-- Every decision, append-only: who, when, what, on which series, why, before and after.
-- series_uid is not a foreign key: the record outlives a rejected series.
CREATE TABLE audit_log (
    pk         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor      text NOT NULL,
    action     text NOT NULL,
    series_uid text,
    collection text,
    reason     text NOT NULL DEFAULT '',
    before     jsonb NOT NULL DEFAULT '{}',
    after      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_series ON audit_log (series_uid, at);
CREATE INDEX audit_log_at ON audit_log (at);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
