-- Identified originals kept for curation (issue #6): one row per encrypted file in the
-- originals area (archive/originals.py), written in the intake transaction that indexes its
-- de-identified instance. No identifier here: the file name is random, the UIDs are the
-- de-identified ones.
CREATE TABLE originals (
    name text PRIMARY KEY,          -- file name in the originals area
    sop_uid text NOT NULL,          -- the de-identified instance it is the original of
    series_uid text NOT NULL,
    collection text NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now(),
    -- Set by the decision that ends its use: the time a series was published (the retention
    -- period counts from it), or '-infinity' when it was rejected or its subject forgotten
    -- (purged at once). NULL while its series is undecided or held.
    purge_after timestamptz
);
CREATE INDEX originals_series ON originals (series_uid);
CREATE INDEX originals_sop ON originals (sop_uid);
CREATE INDEX originals_due ON originals (purge_after) WHERE purge_after IS NOT NULL;
