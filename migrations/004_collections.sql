-- Collections: every instance belongs to one. A collection names its PS3.15 de-identification
-- profile and options (so its keys, pseudonyms and rules are its own) and whether it is
-- public or restricted. Names already in use become collections before the foreign keys.

CREATE TABLE collections (
    name         text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    visibility   text NOT NULL DEFAULT 'restricted'
                 CHECK (visibility IN ('public', 'restricted')),
    description  text NOT NULL DEFAULT '',
    license      text NOT NULL DEFAULT '',
    citation     text NOT NULL DEFAULT '',
    deid_profile text NOT NULL DEFAULT 'basic',
    deid_options jsonb NOT NULL DEFAULT '[]',
    created_at   timestamptz NOT NULL DEFAULT now()
);

INSERT INTO collections (name)
SELECT collection FROM patients
UNION SELECT collection FROM studies
UNION SELECT collection FROM ae_titles
UNION SELECT 'default'
ON CONFLICT DO NOTHING;

ALTER TABLE patients ADD FOREIGN KEY (collection) REFERENCES collections (name);
ALTER TABLE studies ADD FOREIGN KEY (collection) REFERENCES collections (name);
ALTER TABLE ae_titles ADD FOREIGN KEY (collection) REFERENCES collections (name);
