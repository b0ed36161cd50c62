-- Every change that can take a grant away (a token revoked, expired, re-scoped or deleted; a
-- collection made restricted, renamed or dropped) notifies channel carina_auth when it commits,
-- whatever made it (API, CLI, SQL by hand). Each serving process keeps verified tokens and
-- readable collections in memory only while it listens on that channel, and forgets them on
-- every notification (archive/auth_cache.py): a revocation takes effect at once everywhere.
CREATE FUNCTION carina_auth_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('carina_auth', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER api_tokens_auth_changed
    AFTER UPDATE OR DELETE OR TRUNCATE ON api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION carina_auth_changed();

CREATE TRIGGER collections_auth_changed
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF name, visibility ON collections
    FOR EACH STATEMENT EXECUTE FUNCTION carina_auth_changed();
