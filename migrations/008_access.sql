-- Access control (issue 7): shared cohorts, API tokens and the access audit.

-- A share: a named cohort with a stable id (in its DICOMweb root /shares/{id}/dicomweb).
-- Each version records its instances as they were when it was made (collection, size,
-- SHA-256): a version never changes, a change makes the next version.
CREATE TABLE shares (
    id          text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{16}$'),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE share_versions (
    share_id    text NOT NULL REFERENCES shares (id),
    version     integer NOT NULL CHECK (version >= 1),
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (share_id, version)
);
CREATE TABLE share_instances (
    share_id    text NOT NULL,
    version     integer NOT NULL,
    sop_uid     text NOT NULL,
    series_uid  text NOT NULL,
    study_uid   text NOT NULL,
    collection  text NOT NULL,
    size        bigint NOT NULL,
    sha256      text NOT NULL,
    PRIMARY KEY (share_id, version, sop_uid),
    FOREIGN KEY (share_id, version) REFERENCES share_versions (share_id, version)
);
CREATE INDEX share_instances_series ON share_instances (share_id, version, series_uid);
CREATE INDEX share_instances_study ON share_instances (share_id, version, study_uid);

-- A token is shown once, at creation; only the SHA-256 of its secret part is kept. Its public
-- id (also inside the token) names it in `carina token list`, `revoke` and the audit.
-- Each token carries one role: admin (no collection), or curator, submitter or reader of one
-- collection, or share (a link token: it opens one share's root and nothing else), for the
-- identity `name` it acts for.
CREATE TABLE api_tokens (
    id          text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{12}$'),
    name        text NOT NULL,
    role        text NOT NULL
                CHECK (role IN ('admin', 'curator', 'submitter', 'reader', 'share')),
    collection  text REFERENCES collections (name),
    share_id    text REFERENCES shares (id),
    secret_hash bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz,
    CHECK (CASE role
           WHEN 'admin' THEN collection IS NULL AND share_id IS NULL
           WHEN 'share' THEN collection IS NULL AND share_id IS NOT NULL
           ELSE collection IS NOT NULL AND share_id IS NULL END)
);

-- Who read which study, when, through which route: one row per study per request. No query
-- values or paths are kept (they can carry identifying values), only the route template.
CREATE TABLE access_audit (
    pk          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    identity    text NOT NULL,
    token_id    text,
    client      text,
    method      text NOT NULL,
    route       text NOT NULL,
    study_uid   text NOT NULL,
    collection  text
);
CREATE INDEX access_audit_at ON access_audit (at);
CREATE INDEX access_audit_study ON access_audit (study_uid);
