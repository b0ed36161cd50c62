-- Per-collection de-identification data beyond the profile and options.
--
-- pseudonym_mappings: a submitter's mapping file (original PatientID -> research PatientID and,
-- optionally, research PatientName), as TCIA sites provide one. Restricted: no HTTP route
-- reads it. The original ID is stored only as its keyed digest (HMAC-SHA256 with the
-- collection's key, curation/pseudonyms.py), so the table holds no identifier of its own;
-- key_check on the collection says which key the digests were made with.
-- collections.deid_lines: the collection's own deid recipe lines, applied after the profile.

CREATE TABLE pseudonym_mappings (
    collection     text NOT NULL REFERENCES collections (name),
    subject_digest bytea NOT NULL,
    research_id    text NOT NULL,
    research_name  text,
    PRIMARY KEY (collection, subject_digest),
    UNIQUE (collection, research_id)
);

ALTER TABLE collections
    ADD COLUMN mapping_version   bigint NOT NULL DEFAULT 0,
    ADD COLUMN mapping_key_check bytea,
    ADD COLUMN deid_lines        jsonb NOT NULL DEFAULT '[]';
