-- Right to be forgotten and the curation audit: a forgotten subject's de-identified Series
-- Instance UIDs are pseudonymous identifiers, so an erasure replaces them in audit_log by the
-- erasure's id. That redaction is the one change the append-only audit accepts: series_uid set
-- to NULL together with erasure_id, every other column as it was.
ALTER TABLE audit_log ADD COLUMN erasure_id bigint REFERENCES subject_erasures (id);

CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
        AND OLD.series_uid IS NOT NULL AND NEW.series_uid IS NULL
        AND OLD.erasure_id IS NULL AND NEW.erasure_id IS NOT NULL
        AND (NEW.pk, NEW.at, NEW.actor, NEW.action, NEW.collection, NEW.reason, NEW.before,
             NEW.after)
            IS NOT DISTINCT FROM
            (OLD.pk, OLD.at, OLD.actor, OLD.action, OLD.collection, OLD.reason, OLD.before,
             OLD.after)
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
