-- Per-submission reports (issue #6): a submission is a C-STORE association (as in 002) or a
-- STOW-RS request. Each names its collection and its submitter (the AE title, or the token's
-- identity name) and is linked to the series it brought with how many instances of each, so
-- its submitter can read what became of them and curators can filter the queue by submitter.
-- Nothing here holds PHI: refusal reasons are Carina's own sentences, series are named by
-- their de-identified UIDs.

ALTER TABLE submissions
    ALTER COLUMN ae_title DROP NOT NULL,
    ADD COLUMN kind text NOT NULL DEFAULT 'dimse' CHECK (kind IN ('dimse', 'stow')),
    ADD COLUMN collection text,
    ADD COLUMN submitter text,
    -- the token a STOW-RS request was made with (its public id)
    ADD COLUMN token_id text;

UPDATE submissions s SET collection = a.collection FROM ae_titles a WHERE a.title = s.ae_title;
UPDATE submissions SET submitter = ae_title;
ALTER TABLE submissions ALTER COLUMN submitter SET NOT NULL;
ALTER TABLE submissions ADD CONSTRAINT submissions_dimse_has_ae
    CHECK (kind <> 'dimse' OR ae_title IS NOT NULL);

CREATE INDEX submissions_collection ON submissions (collection, started_at);
CREATE INDEX submissions_started ON submissions (started_at);

-- The series a submission brought. A series erased with its subject takes its links along.
CREATE TABLE submission_series (
    submission_id bigint NOT NULL REFERENCES submissions (id) ON DELETE CASCADE,
    series_uid    text NOT NULL REFERENCES series (series_uid) ON DELETE CASCADE,
    instances     integer NOT NULL CHECK (instances > 0),
    PRIMARY KEY (submission_id, series_uid)
);
CREATE INDEX submission_series_series ON submission_series (series_uid);
