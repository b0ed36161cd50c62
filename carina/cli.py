"""The `carina` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from carina import __version__
from carina.settings import Settings


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from carina.api.app import create_app

    uvicorn.run(
        create_app(settings),
        host=args.host or settings.host,
        port=args.port or settings.port,
        log_level=settings.log_level,
        # Logs name requests by path; DICOMweb paths carry de-identified UIDs only.
        access_log=True,
    )
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import db
    from carina.runtime import database_url

    settings.prepare_dirs()
    applied = db.migrate(database_url(settings))
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="carina",
        description="Carina: a DICOMweb archive that de-identifies (PS3.15) what it receives.",
    )
    parser.add_argument("--version", action="version", version=f"carina {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server (DICOMweb at /dicomweb)")
    serve.add_argument("--host", help="bind address (default CARINA_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default CARINA_PORT or 8080)")
    serve.set_defaults(func=_serve)
    migrate = sub.add_parser("migrate", help="apply database migrations and exit")
    migrate.set_defaults(func=_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `carina` console script."""
    args = build_parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    return int(args.func(settings, args))


if __name__ == "__main__":
    sys.exit(main())
