-- QIDO-RS matching on any attribute kept in an instance's metadata (PS3.18 8.3.4.1), not only
-- on the indexed columns: a GIN index over the metadata JSON answers single value, UID list
-- and sequence item matching as containment (`metadata @> '{"00180015": {"Value": ["CHEST"]}}'`),
-- which also matches a multi-valued attribute when any of its values matches.
-- jsonb_path_ops: smaller and faster than the default operator class, and `@>` is the only
-- operator the matching uses.
CREATE INDEX instances_metadata ON instances USING gin (metadata jsonb_path_ops);

-- fuzzymatching=true (PS3.18 8.3.4.2) folds person names to lower case without accents.
-- unaccent is a trusted extension (PostgreSQL 13+): the database owner may create it.
CREATE EXTENSION IF NOT EXISTS unaccent;
