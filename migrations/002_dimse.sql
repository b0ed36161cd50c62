-- DIMSE: the AE titles allowed to push (each mapped to the collection its instances go to),
-- one row per accepted association (a submission) and an audit of refused associations.
-- Nothing here holds PHI: reasons are Carina's own sentences and counts.

CREATE TABLE ae_titles (
    title      text PRIMARY KEY,
    collection text NOT NULL,
    -- when set, the AE may only call from this host (address or name)
    host       text,
    -- where the AE listens (for C-MOVE destinations later)
    port       integer,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE submissions (
    id         bigserial PRIMARY KEY,
    ae_title   text NOT NULL,
    peer_host  text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at   timestamptz,
    accepted   integer NOT NULL DEFAULT 0,
    refused    integer NOT NULL DEFAULT 0,
    -- refusal reason -> count
    reasons    jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX submissions_ae_title ON submissions (ae_title, started_at);

CREATE TABLE association_rejects (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    calling_ae text NOT NULL,
    peer_host  text NOT NULL,
    reason     text NOT NULL
);
CREATE INDEX association_rejects_at ON association_rejects (at);
