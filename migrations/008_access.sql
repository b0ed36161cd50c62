-- Access control (issue 7): API tokens and the access audit.
-- A token is shown once, at creation; only the SHA-256 of its secret part is kept. Its public
-- id (also inside the token) names it in `carina token list`, `revoke` and the audit.
-- Each token carries one role: admin (no collection), or curator, submitter or reader of one
-- collection, for the identity `name` it acts for.

CREATE TABLE api_tokens (
    id          text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{12}$'),
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('admin', 'curator', 'submitter', 'reader')),
    collection  text REFERENCES collections (name),
    secret_hash bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz,
    CHECK ((role = 'admin') = (collection IS NULL))
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
