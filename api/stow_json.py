"""STOW-RS of metadata and bulk data (PS3.18 10.5.1.2): a multipart/related body of
type="application/dicom+json" whose first part is a DICOM JSON array of instances, or of
type="application/dicom+xml" whose first parts are one Native DICOM Model document per instance
(PS3.19 A.1), and whose further parts hold their bulk data, each under the Content-Location its
BulkDataURI names.

Instances are made into PS3.10 files (curation/dicom_json) as soon as every part they reference
has arrived, so a request is streamed as a Part 10 one is: bulk parts wait in the intake area's
sinks only until their instance is complete."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

from carina.curation import dicom_json
from carina.curation.errors import InstanceRefused
from carina.curation.intake import CANNOT_UNDERSTAND, PartSink, Refusal

from .dicomxml import DICOM_XML, read_native_xml
from .multipart import MultipartError, PartReader, parse_media_type

DICOM_JSON = "application/dicom+json"
OCTET = "application/octet-stream"
# PS3.18 Table 8.7.3-5: the default transfer syntax of each compressed bulk data media type
# (a transfer-syntax parameter names another).
COMPRESSED = {
    "image/jpeg": "1.2.840.10008.1.2.4.70",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
}


class _LocatedSink:
    """A part's sink that also keeps the part's Content-Location, resolved."""

    def __init__(self, sink: PartSink, location: str) -> None:
        self.sink = sink
        self.location = location
        self.write = sink.write
        self.discard = sink.discard

    def finish(self) -> bytes | str:
        """The part: its bytes, or the path of the spooled file."""
        return self.sink.finish()


class _Pending:
    """An instance of the metadata waiting for its bulk data parts."""

    def __init__(self, instance: object, uris: dict[str, str]) -> None:
        self.instance = instance
        self.uris = uris  # BulkDataURI as written -> resolved against the request URL

    def refusal(self, code: int, reason: str) -> Refusal:
        """A Refusal naming the instance's SOP Class and Instance UIDs, where it has them."""
        return Refusal(
            code, reason, _uid(self.instance, "00080016"), _uid(self.instance, "00080018")
        )


def _uid(instance: object, tag: str) -> str:
    try:
        value = instance[tag]["Value"][0]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return ""
    return value if isinstance(value, str) else ""


def _json_instances(text: bytes) -> list[dict]:
    """The instances of a DICOM JSON metadata part (PS3.18 F.2: an array of objects)."""
    try:
        instances = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("metadata part is not JSON") from None
    if not isinstance(instances, list) or not instances:
        raise ValueError("metadata is not a DICOM JSON array of instances")
    return instances


def _xml_instances(text: bytes) -> list[dict]:
    """The instance of an XML metadata part: one NativeDicomModel document (PS3.19 A.1)."""
    return [read_native_xml(text)]


@dataclass(frozen=True)
class MetadataForm:
    """How a request's metadata parts are written: their media type, whether each part holds
    one instance (XML, so every part of that type before the first bulk data part is metadata)
    or the first part holds them all (JSON), and the reader of a part's instances (ValueError
    with the reason if it cannot be read)."""

    media_type: str
    part_per_instance: bool
    read: Callable[[bytes], list[dict]]


JSON_METADATA = MetadataForm(DICOM_JSON, False, _json_instances)
XML_METADATA = MetadataForm(DICOM_XML, True, _xml_instances)


class MetadataAndBulkData:
    """Reads one such body; payloads() yields PS3.10 files (or Refusals) for the intake.
    `unreadable` says why when nothing could be read (400); `seen` counts the parts."""

    def __init__(
        self,
        boundary: str,
        new_sink: Callable[[], PartSink],
        url: str,
        form: MetadataForm = JSON_METADATA,
    ) -> None:
        self._url = url
        self._form = form
        self._new_sink = new_sink
        self._reader = PartReader(boundary, self._sink, accept=lambda _: True)
        self._pending: list[_Pending] = []
        self._parts: dict[str, list[tuple[str, bytes | str]]] = {}
        self._last: str | None = None
        self.seen = 0
        self.unreadable: str | None = None

    def _sink(self) -> _LocatedSink:
        location = urljoin(self._url, self._reader.headers.get("content-location", ""))
        return _LocatedSink(self._new_sink(), location)

    async def payloads(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes | Refusal]:
        """Every instance of the body, in the order of the metadata, as it becomes complete."""
        try:
            async for ctype, sink in self._reader.parts(chunks):
                self.seen += 1
                assert isinstance(sink, _LocatedSink)
                payload = sink.finish()
                if self.seen == 1 or self._more_metadata(ctype):
                    for refusal in self._metadata(ctype, payload):
                        yield refusal
                    continue
                location = sink.location
                if location != self._last:  # the parts under the last location are complete
                    async for out in self._complete():
                        yield out
                self._parts.setdefault(location, []).append((ctype, payload))
                self._last = location
            malformed = None
            if not self._reader.ended or self._reader.open_part:
                malformed = (
                    f"multipart body ended without its closing boundary after part {self.seen}"
                )
        except MultipartError as e:
            malformed = f"malformed multipart body after part {self.seen}: {e}"
        if not self.seen:
            self.unreadable = malformed or "multipart body has no parts"
            return
        if malformed is None:
            async for out in self._complete():
                yield out
        for pending in self._pending:
            missing = malformed or _missing(pending, self._parts)
            yield pending.refusal(CANNOT_UNDERSTAND, missing)
        self._discard(list(self._parts))

    def _more_metadata(self, ctype: str) -> bool:
        """Whether a part after the first is metadata too: XML parts before any bulk data."""
        return (
            self._form.part_per_instance
            and not self._parts
            and parse_media_type(ctype)[0] == self._form.media_type
        )

    def _metadata(self, ctype: str, payload: bytes | str) -> list[Refusal]:
        """Read a metadata part into pending instances; Refusals for what cannot be read."""
        media_type = self._form.media_type
        if parse_media_type(ctype)[0] not in ("", media_type):
            _remove(payload)
            return [
                Refusal(CANNOT_UNDERSTAND, f"first part is {ctype!r}, not {media_type} metadata")
            ]
        try:
            instances = self._form.read(_read(payload))
        except ValueError as e:
            return [Refusal(CANNOT_UNDERSTAND, str(e))]
        finally:
            _remove(payload)
        for instance in instances:
            uris = {u: urljoin(self._url, u) for u in dicom_json.bulk_data_uris(instance)}
            self._pending.append(_Pending(instance, uris))
        return []

    async def _complete(self) -> AsyncIterator[bytes | Refusal]:
        """The pending instances whose every bulk data part has arrived, made into files."""
        ready = [p for p in self._pending if all(r in self._parts for r in p.uris.values())]
        for pending in ready:
            self._pending.remove(pending)
            yield await asyncio.to_thread(self._build, pending)
        wanted = {r for p in self._pending for r in p.uris.values()}
        self._discard([loc for loc in self._parts if loc not in wanted and loc != self._last])

    def _build(self, pending: _Pending) -> bytes | Refusal:
        bulk = {}
        for uri, resolved in pending.uris.items():
            parts = self._parts[resolved]
            try:
                syntax = _transfer_syntax(parts[0][0])
            except InstanceRefused as r:
                return pending.refusal(r.code, r.reason)
            values = tuple(_read(payload) for _, payload in parts)
            bulk[uri] = dicom_json.BulkData(values, syntax)
        try:
            return dicom_json.part10(pending.instance, bulk)
        except InstanceRefused as r:
            return pending.refusal(r.code, r.reason)

    def _discard(self, locations: list[str]) -> None:
        for location in locations:
            for _, payload in self._parts.pop(location, []):
                _remove(payload)


def _transfer_syntax(ctype: str) -> str | None:
    """The transfer syntax a bulk data part's media type names (PS3.18 8.7.3.3): None for
    native data (application/octet-stream without a transfer-syntax parameter)."""
    mtype, params = parse_media_type(ctype)
    if "transfer-syntax" in params:
        return params["transfer-syntax"].strip()
    if mtype in ("", OCTET):
        return None
    if mtype in COMPRESSED:
        return COMPRESSED[mtype]
    raise InstanceRefused(CANNOT_UNDERSTAND, f"bulk data of media type {mtype!r} is not supported")


def _missing(pending: _Pending, parts: dict[str, object]) -> str:
    absent = [uri for uri, resolved in pending.uris.items() if resolved not in parts]
    return f"{len(absent)} BulkDataURI(s) have no part with that Content-Location"


def _read(payload: bytes | str) -> bytes:
    return bytes(payload) if not isinstance(payload, str) else Path(payload).read_bytes()


def _remove(payload: bytes | str) -> None:
    """Drop a part spooled to the intake area (one held in memory just goes)."""
    if isinstance(payload, str):
        Path(payload).unlink(missing_ok=True)
