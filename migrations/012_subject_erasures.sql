-- The right to be forgotten (issue 7): `carina subject forget` and its audit record.
--
-- subject_erasures: one row per erasure, with no identifier in it. `forgotten` holds keyed
-- digests (HMAC-SHA256 with the collection's key) of the identifiers that were forgotten, so
-- forgetting the same subject again answers "already forgotten" instead of "unknown"; without
-- the secret key they reveal nothing, as pseudonym_mappings' digests. `completed_at` is NULL
-- while stored objects of the erasure are still to be deleted.
-- erasure_objects: those objects, listed in the transaction that withdrew their index rows and
-- removed as they are deleted, so a rerun (or `carina fsck --repair`) finishes an erasure
-- that stopped midway; an object whose SOP Instance UID was stored again meanwhile is kept.
-- Empty once every erasure is complete.
-- access_audit: a forgotten study's audit rows keep who read, when and through which route,
-- but their Study Instance UID gives way to the erasure that removed it.

CREATE TABLE subject_erasures (
    id                bigserial PRIMARY KEY,
    at                timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz,
    actor             text NOT NULL,
    collection        text NOT NULL REFERENCES collections (name),
    -- what the admin gave: the original PatientID or a research ID (pseudonym or mapped)
    identifier_kind   text NOT NULL CHECK (identifier_kind IN ('original', 'research')),
    forgotten         bytea[] NOT NULL,
    -- what was removed: {"patients": n, "studies": n, "series": n, "instances": n, ...}
    counts            jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX subject_erasures_collection ON subject_erasures (collection);
CREATE INDEX subject_erasures_pending ON subject_erasures (id) WHERE completed_at IS NULL;

CREATE TABLE erasure_objects (
    erasure_id bigint NOT NULL REFERENCES subject_erasures (id),
    sop_uid    text NOT NULL,
    object_key text NOT NULL,
    PRIMARY KEY (erasure_id, sop_uid)
);

ALTER TABLE access_audit
    ALTER COLUMN study_uid DROP NOT NULL,
    ADD COLUMN erasure_id bigint REFERENCES subject_erasures (id),
    ADD CHECK ((study_uid IS NULL) = (erasure_id IS NOT NULL));
