"""Who may read and store what: principals, their role grants, and the collections they see.

Public collections are readable by anyone; a restricted collection only by its readers and
curators and by admins; a submitter stores into its collection without reading it back. The
rules take a Principal, whatever proved it (an API token today; a session or an OpenID Connect
token later carries the same identity and grants).
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg_pool import ConnectionPool

from .tokens import Token


@dataclass(frozen=True)
class Scope:
    """What one request may see: some collections (None: every one) and, through a share's
    root, only the instances of one share version (share id, version)."""

    collections: tuple[str, ...] | None = None
    share: tuple[str, int] | None = None

    def member(self, sop_column: str) -> tuple[str, list[object]]:
        """SQL (and its parameters) true for an instance, by its SOP Instance UID column, that
        the share holds; TRUE without a share."""
        if self.share is None:
            return "TRUE", []
        return (
            "EXISTS (SELECT 1 FROM share_instances si WHERE si.share_id = %s"
            f" AND si.version = %s AND si.sop_uid = {sop_column})",
            list(self.share),
        )


EVERYTHING = Scope()

#: Roles whose holders read their collection even when it is restricted.
READ_ROLES = frozenset({"reader", "curator"})


@dataclass(frozen=True)
class Grant:
    """One role, on one collection (None: every collection, for admin), or on one share."""

    role: str
    collection: str | None
    share_id: str | None = None


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: an identity name and its grants."""

    name: str
    token_id: str | None = None
    grants: frozenset[Grant] = frozenset()

    @classmethod
    def of_token(cls, token: Token) -> Principal:
        """The principal a verified token acts for."""
        grant = Grant(token.role, token.collection, token.share_id)
        return cls(token.name, token.id, frozenset({grant}))

    @property
    def is_admin(self) -> bool:
        """Whether the principal holds the admin role."""
        return any(g.role == "admin" for g in self.grants)

    def holds(self, roles: frozenset[str], collection: str) -> bool:
        """Whether one of roles is granted on collection (admin holds every role)."""
        return self.is_admin or any(
            g.role in roles and g.collection == collection for g in self.grants
        )

    def may_store(self, collection: str) -> bool:
        """Whether the principal may submit instances into collection."""
        return self.holds(frozenset({"submitter"}), collection)

    def may_read_share(
        self, share_id: str, collections: list[str], readable: list[str] | None
    ) -> bool:
        """Whether the principal may read a share drawing on collections: with its link
        token, as admin (readable is None), or because it may read every one of them."""
        if readable is None or any(g.share_id == share_id for g in self.grants):
            return True
        return set(collections) <= set(readable)


ANONYMOUS = Principal("anonymous")


def readable_collections(pool: ConnectionPool, principal: Principal) -> list[str] | None:
    """Names of the collections principal may read; None for every collection (admin)."""
    if principal.is_admin:
        return None
    granted = sorted(
        g.collection for g in principal.grants if g.role in READ_ROLES and g.collection
    )
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT name FROM collections WHERE visibility = 'public' OR name = ANY(%s)"
            " ORDER BY name",
            (granted,),
        ).fetchall()
    return [r[0] for r in rows]
