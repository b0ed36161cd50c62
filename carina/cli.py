"""The `carina` command line."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from carina import __version__
from carina.settings import Settings

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool


# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest
_TRIM_THRESHOLD = 64 << 20


def _reuse_freed_buffers() -> None:
    """Have glibc keep freed large buffers for reuse. A retrieve reads each object into a
    fresh buffer of half a megabyte or more; by default glibc maps such buffers from the kernel
    and unmaps them when freed (or trims the heap), so every one is faulted in and zeroed again:
    more system time than the copy itself. Up to _TRIM_THRESHOLD of freed memory stays with
    the process instead. Nothing is done on other C libraries."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from carina.api.app import create_app
    from carina.api.http_protocol import Protocol

    _reuse_freed_buffers()
    uvicorn.run(
        create_app(settings),
        host=args.host or settings.host,
        port=args.port or settings.port,
        log_level=settings.log_level,
        # uvicorn's access log prints paths and query strings, which can carry identifying
        # values; api/access_log.py logs each request by its route instead.
        access_log=False,
        http=Protocol,  # a response's head leaves with its first body bytes
    )
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import db
    from carina.runtime import database_url

    settings.prepare_dirs()
    applied = db.migrate(database_url(settings))
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


def _dimse(settings: Settings, args: argparse.Namespace) -> int:
    import signal
    import threading

    from carina.api.dimse import DimseListener
    from carina.runtime import Runtime

    runtime = Runtime.start(settings)
    listener = DimseListener(runtime)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        listener.start()
        stop.wait()
    finally:
        listener.stop()
        runtime.close()
    return 0


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    import signal

    from carina.curation.lifecycle import Worker, start_workers, stop_workers
    from carina.curation.ocr import OcrEnvironment
    from carina.runtime import open_store

    with _ae_pool(settings, size=settings.series_workers + 1) as pool:
        ocr_env = OcrEnvironment(open_store(settings), settings.tesseract)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        workers = start_workers(
            settings.series_workers,
            lambda: Worker(pool, originals=settings.originals_area, ocr_env=ocr_env),
        )
        stop.wait()
        stop_workers(workers)
    return 0


def _ae_pool(settings: Settings, size: int = 1) -> ConnectionPool:
    from carina.archive import db
    from carina.runtime import database_url

    settings.prepare_dirs()
    url = database_url(settings)
    db.migrate(url)
    return db.open_pool(url, max_size=size)


def _ae_add(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import collections, peers

    with _ae_pool(settings) as pool:
        try:
            ae = peers.add_ae_title(
                pool, args.title, args.collection, host=args.host, port=args.port
            )
        except (peers.InvalidAeTitle, peers.AeTitleExists, collections.InvalidCollection) as e:
            print(f"carina: {e}", file=sys.stderr)
            return 1
    print(f"registered {ae.title} -> collection {ae.collection}")
    return 0


def _ae_list(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import peers

    with _ae_pool(settings) as pool:
        titles = peers.list_ae_titles(pool)
    for ae in titles:
        where = f"{ae.host or '*'}:{ae.port}" if ae.port else (ae.host or "*")
        print(f"{ae.title}\t{ae.collection}\t{where}")
    return 0


def _collection_create(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import collections
    from carina.curation.deid import load_profile
    from carina.curation.errors import ProfileError

    options = tuple(args.option or ())
    try:
        collections.check_name(args.name)
        load_profile(args.profile, options)  # refuse a profile that does not compile
    except (collections.InvalidCollection, ProfileError) as e:
        print(f"carina: {e}", file=sys.stderr)
        return 1
    with _ae_pool(settings) as pool:
        try:
            c = collections.create(
                pool,
                args.name,
                visibility=args.visibility,
                deid_profile=args.profile,
                deid_options=options,
                description=args.description,
                license=args.license,
                citation=args.citation,
            )
        except (collections.InvalidCollection, collections.CollectionExists) as e:
            print(f"carina: {e}", file=sys.stderr)
            return 1
    print(
        f"created {c.visibility} collection {c.name}: {c.deid_profile}"
        + "".join(f"+{o}" for o in c.deid_options)
    )
    return 0


def _collection_list(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import collections

    with _ae_pool(settings) as pool:
        for c in collections.list_all(pool):
            profile = c.deid_profile + "".join(f"+{o}" for o in c.deid_options)
            print(f"{c.name}\t{c.visibility}\t{profile}\t{c.description}")
    return 0


def _collection_mapping(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import collections, mappings
    from carina.archive.errors import NotFound
    from carina.curation.mapping_file import MappingFileError, read_mapping_file
    from carina.curation.pseudonyms import Pseudonymizer, collection_key

    # The digests are keyed like the collection's pseudonyms: the server must share this key.
    pseudo = Pseudonymizer(collection_key(settings.master_key, args.name))
    try:
        collections.check_name(args.name)
        with open(args.file, "rb") as f:
            subjects = read_mapping_file(f.read(), pseudo)
    except (OSError, collections.InvalidCollection, MappingFileError) as e:
        reason = f"cannot read {args.file}: {e.strerror}" if isinstance(e, OSError) else str(e)
        print(f"carina: {reason}", file=sys.stderr)
        return 1
    with _ae_pool(settings) as pool:
        try:
            version = mappings.replace(pool, args.name, pseudo.key_check(), subjects)
        except NotFound as e:
            print(f"carina: {e}", file=sys.stderr)
            return 1
    print(
        f"collection {args.name}: pseudonym mapping version {version} with {len(subjects)} "
        "subjects; instances received from now on use it"
    )
    return 0


_DURATION = re.compile(r"(\d+)([dhm])")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def _moment(text: str) -> datetime:
    """An ISO 8601 date or date-time, UTC unless it names a zone."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _when(text: str) -> datetime:
    """A future moment: a duration from now (30d, 12h, 45m) or an ISO 8601 date or time."""
    m = _DURATION.fullmatch(text)
    if m:
        return datetime.now(UTC) + timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    return _moment(text)


def _token_create(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import tokens

    with _ae_pool(settings) as pool:
        try:
            secret, token = tokens.create(
                pool,
                args.role,
                collection=args.collection,
                share_id=args.share,
                name=args.name,
                expires_at=args.expires,
            )
        except tokens.TokenRefused as e:
            print(f"carina: {e}", file=sys.stderr)
            return 1
    scope = f" of collection {token.collection}" if token.collection else ""
    scope += f" of share {token.share_id}" if token.share_id else ""
    until = f", expires {token.expires_at.isoformat()}" if token.expires_at else ""
    print(f"created token {token.id}: {token.role}{scope} for {token.name}{until}", file=sys.stderr)
    print("it is shown only now; send it as 'Authorization: Bearer <token>'", file=sys.stderr)
    print(secret)  # alone on stdout, so TOKEN=$(carina token create ...) works
    return 0


def _token_list(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import tokens

    now = datetime.now(UTC)
    with _ae_pool(settings) as pool:
        for t in tokens.list_all(pool):
            expires = t.expires_at.isoformat() if t.expires_at else "never"
            print(
                f"{t.id}\t{t.name}\t{t.role}\t{t.collection or '*'}\t{t.state(now)}"
                f"\texpires {expires}"
            )
    return 0


def _token_revoke(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import tokens

    with _ae_pool(settings) as pool:
        try:
            token = tokens.revoke(pool, args.id)
        except tokens.TokenRefused as e:
            print(f"carina: {e}", file=sys.stderr)
            return 1
    print(f"revoked token {token.id} ({token.name})")
    return 0


def _audit_export(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import audit
    from carina.curation import audit as curation_audit

    with _ae_pool(settings) as pool:
        if args.kind == "curation":
            collections = tuple(args.collection) if args.collection else None
            columns = curation_audit.EXPORT_COLUMNS
            rows = curation_audit.export_rows(pool, args.since, args.until, collections)
        elif args.collection:
            print("carina: --collection applies to --kind curation only", file=sys.stderr)
            return 2
        else:
            columns, rows = audit.COLUMNS, audit.access_rows(pool, args.since, args.until)
        if args.output:
            with open(args.output, "w", newline="") as out:
                n = audit.write(out, columns, rows, args.format)
        else:
            n = audit.write(sys.stdout, columns, rows, args.format)
    print(f"exported {n} {args.kind} rows", file=sys.stderr)
    return 0


def _collection_recipe(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import collections
    from carina.archive.errors import NotFound
    from carina.curation.deid import load_profile
    from carina.curation.errors import ProfileError

    try:
        if args.file:
            with open(args.file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        else:
            lines = [] if args.clear else list(args.line)
    except (OSError, UnicodeDecodeError) as e:
        print(f"carina: cannot read {args.file}: {e}", file=sys.stderr)
        return 1
    with _ae_pool(settings) as pool:
        try:
            found = collections.get(pool, args.name)
            # Validated as the intake will compile them: a bad line is refused now, with why.
            load_profile(found.deid_profile, found.options, tuple(lines))
            collections.set_deid_lines(pool, args.name, lines)
        except (NotFound, ProfileError) as e:
            print(f"carina: {e}", file=sys.stderr)
            return 1
    print(
        f"collection {args.name}: {len(lines)} recipe lines after the profile; instances "
        "received from now on use them"
    )
    return 0


def _collection_rules(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import collections
    from carina.archive.errors import NotFound
    from carina.curation.rule_settings import RuleSettingError, config_from, describe, set_value

    with _ae_pool(settings) as pool:
        try:
            overrides = collections.get(pool, args.name).rules
            for assignment in args.set or ():
                path, sep, raw = assignment.partition("=")
                if not sep:
                    raise RuleSettingError(f"{assignment}: write --set rule.setting=value")
                overrides = set_value(overrides, path, raw)
            for path in args.unset or ():
                overrides = set_value(overrides, path, None)
            if args.set or args.unset:
                collections.set_rules(pool, args.name, overrides)
        except (NotFound, RuleSettingError) as e:
            print(f"carina: {e}", file=sys.stderr)
            return 1
    changed = _override_paths(overrides)
    for path, value in describe(config_from(overrides)):
        print(f"{path}\t{json.dumps(value)}" + ("\t(collection)" if path in changed else ""))
    return 0


def _override_paths(node: dict, prefix: str = "") -> set[str]:
    """The dotted paths a collection overrides."""
    paths: set[str] = set()
    for key, value in node.items():
        if isinstance(value, dict):
            paths |= _override_paths(value, f"{prefix}{key}.")
        else:
            paths.add(f"{prefix}{key}")
    return paths


def _manifest_upload(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import collections
    from carina.archive.errors import NotFound
    from carina.curation.lifecycle import upload_manifest
    from carina.curation.rules import ManifestError

    try:
        text = args.file.read()
    finally:
        args.file.close()
    with _ae_pool(settings) as pool:
        try:
            collections.get(pool, args.collection)
            manifest = upload_manifest(pool, args.collection, text)
        except (NotFound, ManifestError) as e:
            print(f"carina: {e}", file=sys.stderr)
            return 1
    for row in manifest.rows:
        print(
            f"{args.collection}\t{row.modality}: {row.patients} patient(s), {row.studies} "
            f"study(ies), {row.series} series, {row.instances} instance(s)"
        )
    return 0


def _share_save(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import shares
    from carina.archive.errors import InvalidQuery, NotFound

    with _ae_pool(settings) as pool:
        try:
            studies = shares.chosen_studies(pool, args.study, args.query)
            if args.share_command == "create":
                made = shares.create(
                    pool, args.name, created_by="admin", studies=studies, series=args.series
                )
            else:
                made = shares.new_version(
                    pool, args.id, created_by="admin", studies=studies, series=args.series
                )
        except (shares.ShareRefused, NotFound, InvalidQuery) as e:
            print(f"carina: {e}", file=sys.stderr)
            return 1
    print(
        f"share {made.name} version {made.version}: {made.instances} instances from "
        f"{', '.join(made.collections)}; root /shares/{made.share_id}/dicomweb",
        file=sys.stderr,
    )
    print(made.share_id)
    return 0


def _share_list(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import shares

    with _ae_pool(settings) as pool:
        for s in shares.list_all(pool):
            print(
                f"{s.share_id}\t{s.name}\tversion {s.version}\t{s.instances} instances"
                f"\t{','.join(s.collections)}\towner {s.owner or '(admin)'}"
            )
    return 0


def _fsck(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import erasure, fsck, originals
    from carina.runtime import open_store

    with _ae_pool(settings) as pool:
        store = open_store(settings)
        # Erasures that stopped before deleting their objects: finished by a repair (before
        # the orphan sweep, so their lists are emptied too), else reported as problems.
        unfinished = erasure.pending(pool)
        if args.repair and unfinished:
            deleted = erasure.finish_pending(pool, store)
            print(f"finished {len(unfinished)} erasures: deleted {deleted} objects")
        report = fsck.check(
            pool,
            store,
            settings.staging_dir,
            checksums=args.checksums,
            repair=args.repair,
        )
        kept = originals.check(pool, settings.originals_area, repair=args.repair)
    print(f"checked {report.checked} indexed instances")
    for label, keys in (
        ("missing object", report.missing),
        ("wrong size", report.wrong_size),
        ("wrong checksum", report.wrong_checksum),
        ("orphan object (no index row)", report.orphans),
        ("stale staging file", report.stale_staging),
    ):
        for key in keys:
            print(f"{label}: {key}")
    print(f"checked {kept.kept} kept originals")
    for label, names in (
        ("kept original without its file", kept.missing),
        ("original file without an index row", kept.orphans),
    ):
        for name in names:
            print(f"{label}: {name}")
    if kept.due or kept.unowned:
        print(f"originals due for purging: {kept.due}; of instances no longer held: {kept.unowned}")
    if args.repair:
        print(f"removed {report.repaired} orphan or stale files")
        print(f"purged or removed {kept.repaired} originals")
    else:
        for erasure_id, objects in unfinished:
            print(f"unfinished erasure {erasure_id}: {objects} objects still to delete")
    # Orphans and stale files are gone after a repair; missing or damaged objects are not.
    unrepaired = report.problems - (report.repaired if args.repair else 0)
    unrepaired += 0 if args.repair else kept.problems
    return 1 if unrepaired or (unfinished and not args.repair) else 0


def _reindex_derived(settings: Settings, args: argparse.Namespace) -> int:
    from carina.archive import derived
    from carina.runtime import open_store

    with _ae_pool(settings) as pool:
        count = derived.reindex(pool, open_store(settings))
    print(f"indexed {count} derived objects")
    return 0


def _read_original_id() -> str:
    """The original PatientID from standard input, or typed at a prompt that does not echo
    it: never on the command line, where process lists and shell history would keep it."""
    import getpass

    if sys.stdin.isatty():
        return getpass.getpass("original PatientID (not shown): ").strip()
    return sys.stdin.readline().strip()


def _original_id(args: argparse.Namespace) -> str | None:
    """The original PatientID when --original-id names the subject (read from standard input);
    exits with status 1 when none is given there."""
    original = _read_original_id() if args.original_id else None
    if original is not None and not original:
        print("carina: no original PatientID given on standard input", file=sys.stderr)
        raise SystemExit(1)
    return original


def _subject_forget(settings: Settings, args: argparse.Namespace) -> int:
    import getpass

    from carina.archive.errors import NotFound, StorageError
    from carina.curation.forget import Forgetter, UnknownSubject, WrongKey
    from carina.runtime import open_store

    original = _original_id(args)
    with _ae_pool(settings) as pool:
        forgetter = Forgetter(
            pool=pool,
            store=open_store(settings),
            master_key=settings.master_key,
            staging_dir=settings.staging_dir,
            intake_dir=settings.intake_dir,
            originals=settings.originals_area,
        )
        try:
            report = forgetter.forget(
                args.collection,
                original_id=original,
                research_id=args.research_id,
                actor=args.by or getpass.getuser(),
                dry_run=args.dry_run,
            )
        except (NotFound, UnknownSubject, WrongKey) as e:
            print(f"carina: {e}", file=sys.stderr)
            return 1
        except StorageError as e:
            # The index rows are withdrawn (nothing is served); the objects are listed.
            print(
                f"carina: the subject is withdrawn but not every stored object is deleted yet "
                f"({e}); run the command again or `carina fsck --repair` to finish",
                file=sys.stderr,
            )
            return 1
    print("\n".join(report.lines()))
    return 0


def _subject_allow(settings: Settings, args: argparse.Namespace) -> int:
    import getpass

    from carina.archive import erasure
    from carina.archive.errors import NotFound
    from carina.curation.forget import WrongKey, resolve

    original = _original_id(args)
    with _ae_pool(settings) as pool:
        try:
            subject, _ = resolve(
                pool,
                settings.master_key,
                args.collection,
                original_id=original,
                research_id=args.research_id,
            )
        except (NotFound, WrongKey) as e:
            print(f"carina: {e}", file=sys.stderr)
            return 1
        lifted = erasure.lift(pool, subject, args.by or getpass.getuser())
    if not lifted:
        print(
            f"carina: collection {args.collection} has no erasure in force of that subject",
            file=sys.stderr,
        )
        return 1
    ids = ", ".join(str(i) for i in lifted)
    print(
        f"collection {args.collection}: erasure {ids} lifted; the subject's instances are "
        "taken in again"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="carina",
        description="Carina: a DICOMweb archive that de-identifies (PS3.15) what it receives.",
    )
    parser.add_argument("--version", action="version", version=f"carina {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run the HTTP server (DICOMweb at /dicomweb) and the DICOM listener"
    )
    serve.add_argument("--host", help="bind address (default CARINA_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default CARINA_PORT or 8080)")
    serve.set_defaults(func=_serve)
    migrate = sub.add_parser("migrate", help="apply database migrations and exit")
    migrate.set_defaults(func=_migrate)
    worker = sub.add_parser(
        "worker", help="evaluate settled series (the curation rules) until stopped"
    )
    worker.set_defaults(func=_worker)
    dimse = sub.add_parser("dimse", help="run the DICOM listener (C-ECHO, C-STORE) alone")
    dimse.set_defaults(func=_dimse)
    fsck_p = sub.add_parser("fsck", help="check that the index and the object store agree")
    fsck_p.add_argument("--checksums", action="store_true", help="also re-hash every object")
    fsck_p.add_argument(
        "--repair",
        action="store_true",
        help="remove objects no index row owns and stale staged files",
    )
    fsck_p.set_defaults(func=_fsck)
    reindex = sub.add_parser(
        "reindex-derived",
        help="index every stored SEG, SR, parametric map and RT structure set again",
    )
    reindex.set_defaults(func=_reindex_derived)
    coll = sub.add_parser("collection", help="collections: visibility and de-identification")
    coll_sub = coll.add_subparsers(dest="collection_command", required=True)
    create = coll_sub.add_parser("create", help="create a collection")
    create.add_argument("name", help="letters, digits, '.', '_', '-' (in URLs)")
    create.add_argument("--visibility", choices=["public", "restricted"], default="restricted")
    create.add_argument("--profile", default="basic", help="PS3.15 profile (default basic)")
    create.add_argument(
        "--option",
        action="append",
        metavar="OPTION",
        help="a PS3.15 option, repeatable: retain_long_modified_dates, retain_uids, ...",
    )
    create.add_argument("--description", default="")
    create.add_argument("--license", default="")
    create.add_argument("--citation", default="")
    create.set_defaults(func=_collection_create)
    coll_list = coll_sub.add_parser("list", help="list collections")
    coll_list.set_defaults(func=_collection_list)
    mapping = coll_sub.add_parser(
        "mapping",
        help="load a submitter's pseudonym mapping (original PatientID -> research ID)",
    )
    mapping.add_argument("name", help="the collection")
    mapping.add_argument(
        "--file",
        required=True,
        help="CSV with a header row: original_id,research_id[,research_name]; replaces the "
        "collection's mapping",
    )
    mapping.set_defaults(func=_collection_mapping)
    token = sub.add_parser("token", help="API tokens (sent as Authorization: Bearer)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    token_create = token_sub.add_parser("create", help="create a token and print it once")
    token_create.add_argument(
        "--role",
        required=True,
        choices=["admin", "curator", "submitter", "reader", "share"],
        help="admin: everything; curator, submitter, reader: of one --collection; "
        "share: a link token that opens one --share",
    )
    token_create.add_argument("--collection", help="the collection of a non-admin role")
    token_create.add_argument("--share", help="the share id of a share (link) token")
    token_create.add_argument("--name", help="who the token is for (shown in lists and audit)")
    token_create.add_argument(
        "--expires", type=_when, help="30d, 12h, 45m from now, or an ISO 8601 date (UTC)"
    )
    token_create.set_defaults(func=_token_create)
    token_list = token_sub.add_parser("list", help="list tokens (never their secrets)")
    token_list.set_defaults(func=_token_list)
    token_revoke = token_sub.add_parser("revoke", help="revoke a token by its id")
    token_revoke.add_argument("id", help="the token id (12 hex digits, from `carina token list`)")
    token_revoke.set_defaults(func=_token_revoke)
    audit_p = sub.add_parser(
        "audit", help="the audits: who read which study (access), every curation decision"
    )
    audit_sub = audit_p.add_subparsers(dest="audit_command", required=True)
    export = audit_sub.add_parser("export", help="write an audit as CSV or JSON")
    export.add_argument(
        "--kind",
        choices=("access", "curation"),
        default="access",
        help="access: who read which study; curation: every decision on a series",
    )
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument(
        "--collection", action="append", help="curation: only this collection (repeatable)"
    )
    export.add_argument("--since", type=_moment, help="from this moment (ISO 8601, UTC)")
    export.add_argument("--until", type=_moment, help="before this moment (ISO 8601, UTC)")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    export.set_defaults(func=_audit_export)
    recipe = coll_sub.add_parser(
        "recipe",
        help="set the collection's own deid recipe lines, applied after its PS3.15 profile",
    )
    recipe.add_argument("name", help="the collection")
    lines = recipe.add_mutually_exclusive_group(required=True)
    lines.add_argument(
        "--line",
        action="append",
        metavar="LINE",
        help="a recipe line, repeatable, e.g. 'REPLACE StationName CARINA', "
        "'KEEP SeriesDescription', 'KEEP (0019,\"SIEMENS MR HEADER\",0C)'",
    )
    lines.add_argument("--file", help="a file of recipe lines (# comments allowed)")
    lines.add_argument("--clear", action="store_true", help="remove the collection's lines")
    recipe.set_defaults(func=_collection_recipe)
    rules = coll_sub.add_parser(
        "rules", help="show or change a collection's curation rule settings"
    )
    rules.add_argument("name", help="the collection")
    rules.add_argument(
        "--set",
        action="append",
        metavar="RULE.SETTING=VALUE",
        help="e.g. geometry.max_slices=800 or burned_in.enabled=false (repeatable)",
    )
    rules.add_argument(
        "--unset", action="append", metavar="RULE.SETTING", help="back to the default"
    )
    rules.set_defaults(func=_collection_rules)
    manifest = sub.add_parser("manifest", help="submission manifests: expected counts")
    manifest_sub = manifest.add_subparsers(dest="manifest_command", required=True)
    upload = manifest_sub.add_parser(
        "upload", help="store a collection's manifest CSV (modality,patients,studies,...)"
    )
    upload.add_argument("collection", help="the collection it describes")
    upload.add_argument(
        "file",
        type=argparse.FileType("r", encoding="utf-8"),
        help="CSV with header modality,patients,studies,series,instances ('-' for stdin)",
    )
    upload.set_defaults(func=_manifest_upload)
    share = sub.add_parser("share", help="shared cohorts: versioned sets of studies and series")
    share_sub = share.add_subparsers(dest="share_command", required=True)
    share_create = share_sub.add_parser("create", help="make a share (version 1); prints its id")
    share_create.add_argument("name")
    share_update = share_sub.add_parser(
        "update", help="make the next version of a share, holding exactly what is given"
    )
    share_update.add_argument("id", help="the share id (16 hex digits)")
    for p in (share_create, share_update):
        p.add_argument("--study", action="append", default=[], help="a Study Instance UID")
        p.add_argument("--series", action="append", default=[], help="a Series Instance UID")
        p.add_argument(
            "--query",
            help="also every study a QIDO-RS study query matches, e.g. "
            "'ModalitiesInStudy=CT&StudyDate=20200101-20201231'",
        )
        p.set_defaults(func=_share_save)
    share_list = share_sub.add_parser("list", help="list shares (latest versions)")
    share_list.set_defaults(func=_share_list)
    subject = sub.add_parser("subject", help="subjects (patients) of a collection")
    subject_sub = subject.add_subparsers(dest="subject_command", required=True)
    forget = subject_sub.add_parser(
        "forget",
        help="remove one subject everywhere (right to be forgotten): instances, index rows, "
        "derived objects, pseudonym mapping, staged and intake files",
    )
    allow = subject_sub.add_parser(
        "allow",
        help="lift a subject's erasure: intake refuses a forgotten subject's instances until "
        "then (recorded with the erasure: who, when)",
    )
    for p in (forget, allow):
        p.add_argument("collection", help="the collection")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument(
            "--original-id",
            action="store_true",
            help="the subject is named by its original PatientID, read from standard input "
            "(or typed at a prompt that does not echo it), never from the command line",
        )
        who.add_argument(
            "--research-id", metavar="ID", help="the subject's research PatientID (as served)"
        )
        p.add_argument("--by", help="who asks (recorded; default: the user running it)")
    forget.add_argument(
        "--dry-run", action="store_true", help="report what would be removed; change nothing"
    )
    forget.set_defaults(func=_subject_forget)
    allow.set_defaults(func=_subject_allow)
    ae = sub.add_parser("ae", help="AE titles allowed to push by C-STORE")
    ae_sub = ae.add_subparsers(dest="ae_command", required=True)
    ae_add = ae_sub.add_parser("add", help="register an AE title for a collection")
    ae_add.add_argument("title", help="the calling AE title of the site")
    ae_add.add_argument("--collection", required=True, help="collection its instances go to")
    ae_add.add_argument("--host", help="only accept it from this host (address or name)")
    ae_add.add_argument("--port", type=int, help="port the AE listens on")
    ae_add.set_defaults(func=_ae_add)
    ae_list = ae_sub.add_parser("list", help="list the registered AE titles")
    ae_list.set_defaults(func=_ae_list)
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
