-- Access control (issue 7), continued.
--
-- shares.owner: the identity (token name) that made a share over HTTP (POST /api/shares); it
-- lists the share as its own and may add versions and link tokens. NULL for shares made with
-- `carina share`, which only admins manage.
ALTER TABLE shares ADD COLUMN owner text;
CREATE INDEX shares_owner ON shares (owner) WHERE owner IS NOT NULL;

-- A forgotten subject stays forgotten: intake refuses a later instance whose keyed digests
-- match an erasure of its collection, until an admin lifts that erasure
-- (`carina subject allow`), which is recorded here (who, when) and never undone.
ALTER TABLE subject_erasures
    ADD COLUMN lifted_at timestamptz,
    ADD COLUMN lifted_by text,
    ADD CHECK ((lifted_at IS NULL) = (lifted_by IS NULL));
CREATE INDEX subject_erasures_in_force ON subject_erasures USING gin (forgotten)
    WHERE lifted_at IS NULL;
