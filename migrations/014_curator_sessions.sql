-- Curator web sessions (issue 6): a curator pastes an API token once; the browser then holds
-- only an opaque session id in an HttpOnly cookie. Only the SHA-256 of that id is kept, with
-- the token it acts for (so revoking or expiring the token ends its sessions at once) and the
-- session's CSRF token, which every form post of the page must echo.
CREATE TABLE curator_sessions (
    id_hash     bytea PRIMARY KEY,
    token_id    text NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    csrf        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX curator_sessions_expires ON curator_sessions (expires_at);
