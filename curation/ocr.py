"""Burned-in text detection: OCR of a few rendered frames per series with Debian's tesseract.

The series worker (never the event loop) renders at most ``ocr_frames`` frames spread over the
series to 8-bit grey or RGB (the object's own window, else the frame's range; archive/render.py),
scales them towards ``ocr_size`` pixels on their longer side (tesseract reads text best some 20
to 30 pixels high; small images are enlarged at most twice, as more only makes letters of
noise), and reads them with ``tesseract stdin stdout tsv``. The tesseract command line is used
rather than pytesseract: pytesseract writes every image to a temporary file, and a frame with
burned-in text is PHI that must not land outside the store; through stdin and stdout nothing
is written anywhere. The words' text stays in this module: detections carry where the lines of
text are and how many words they hold, never what they say.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import re
import subprocess
import threading
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from cachetools import LRUCache
from PIL import Image

from carina.archive import render, retrieve
from carina.archive.errors import StorageError
from carina.archive.storage import ObjectStore

from .geometry import text, values
from .rules import (
    BurnedInSettings,
    ReadFirst,
    SeriesFacts,
    TextDetection,
    TextDetector,
    TextRegion,
)

log = logging.getLogger(__name__)

# A frame is enlarged at most this much (see the module's docstring).
MAX_ENLARGE = 2.0
# Frames smaller than this (pixels, either side) are not read: no legible text fits.
MIN_SIDE = 32
# Frames are read stacked in images at most this tall, GAP black rows apart.
MAX_STACK = 8192
GAP = 32
# Seconds one tesseract run may take before the series is reported as not read.
TIMEOUT = 60.0
# tesseract runs at this nice value (a reading of noisy frames can take seconds of CPU).
NICENESS = 10
# Text lines kept per series in a finding: enough to redact, bounded for the database.
MAX_REGIONS = 200
_ALNUM = re.compile(r"[^\W_]", re.UNICODE)


class Readings:
    """The latest OCR readings, by the frames they read (thread-safe, bounded), and the series
    whose frames a worker is reading now. The series worker reads a series' frames with no
    lock held and then decides the series with its row locked, finding the reading here
    (curation/lifecycle.py): instances arriving for the series meanwhile do not wait for
    tesseract. A reading is found only for the same frames of the same objects (object key and
    digest) read with the same settings, so a changed or re-sent instance is read again; one
    that could not run is found once (by the decision it was read for), then tried again."""

    def __init__(self, size: int = 64) -> None:
        self._lock = threading.Lock()
        self._done: LRUCache[Hashable, TextDetection] = LRUCache(size)
        self._reading: set[str] = set()

    def get(self, key: Hashable) -> TextDetection | None:
        with self._lock:
            found = self._done.get(key)
            if found is not None and not found.ran:
                del self._done[key]
            return found

    def put(self, key: Hashable, detection: TextDetection) -> None:
        with self._lock:
            self._done[key] = detection

    def start(self, series_uid: str) -> bool:
        """Mark the series as being read; False when some thread reads it already."""
        with self._lock:
            if series_uid in self._reading:
                return False
            self._reading.add(series_uid)
            return True

    def done(self, series_uid: str) -> None:
        with self._lock:
            self._reading.discard(series_uid)

    def being_read(self) -> list[str]:
        """The series whose frames some thread is reading now."""
        with self._lock:
            return sorted(self._reading)


@dataclass(frozen=True)
class OcrEnvironment:
    """What OCR needs from the process: the object store the frames are read from, the
    tesseract command (CARINA_TESSERACT) and the readings its series workers share."""

    store: ObjectStore
    command: str = "tesseract"
    readings: Readings = field(default_factory=Readings, compare=False)


class OcrUnavailable(Exception):
    """tesseract could not be run, or failed; the message says why (never pixel text)."""


@dataclass(frozen=True)
class Word:
    """One word tesseract read, with its line and box in the image it was given."""

    line: tuple[int, int, int]  # (block, paragraph, line) numbers
    left: int
    top: int
    width: int
    height: int
    confidence: float
    chars: int  # letters and digits in it


def detector(
    env: OcrEnvironment,
    object_keys: Mapping[str, str],
    settings: BurnedInSettings,
    defer: bool = False,
) -> TextDetector:
    """A detector for the burned-in rule reading frames of the series' stored objects
    (SOP Instance UID -> object key) with the collection's OCR settings. With defer, frames
    not read yet are not read in the call: it raises ReadFirst, whose read() reads them into
    env.readings, so that a caller holding locks can give them up for the reading."""

    def detect(facts: SeriesFacts) -> TextDetection:
        return read_series(env, object_keys, facts, settings, defer)

    return detect


def sample_frames(facts: SeriesFacts, count: int) -> list[tuple[str, int]]:
    """(SOP Instance UID, 1-based frame) of at most count frames spread evenly over the
    series' image frames in instance order, the first and the last included."""
    frames = [
        (i.sop_uid, n)
        for i in facts.instances
        if values(i.metadata, "Rows")
        for n in range(1, _frame_count(i.metadata) + 1)
    ]
    count = max(1, count)
    if len(frames) <= count:
        return frames
    if count == 1:
        return frames[:1]
    step = (len(frames) - 1) / (count - 1)
    return [frames[round(k * step)] for k in range(count)]


def _frame_count(meta: Mapping) -> int:
    try:
        return max(1, int(text(meta, "NumberOfFrames") or 1))
    except ValueError:
        return 1


def read_series(
    env: OcrEnvironment,
    object_keys: Mapping[str, str],
    facts: SeriesFacts,
    settings: BurnedInSettings,
    defer: bool = False,
) -> TextDetection:
    """OCR of a sample of the series' frames: the lines of text found, or why it could not
    run (a frame that cannot be rendered or read leaves the series not read). The frames are
    read stacked in as few tesseract runs as fit MAX_STACK pixels (one for the default 3),
    as starting tesseract costs more than reading a frame."""
    metas = {i.sop_uid: i.metadata for i in facts.instances}
    sample = [
        (sop, frame)
        for sop, frame in sample_frames(facts, settings.ocr_frames)
        # Nothing legible fits a frame this small; reading it would only find noise.
        if min(_dimensions(metas[sop])) >= MIN_SIDE
    ]
    digests = {i.sop_uid: i.sha256 for i in facts.instances}
    key = (
        facts.series_uid,
        tuple((sop, frame, object_keys.get(sop), digests[sop]) for sop, frame in sample),
        replace(settings, detector=None),
        env.command,
    )
    found = env.readings.get(key)
    if found is not None:
        return found
    if not sample:  # nothing to read: no need to give up any lock for it
        return _read_sample(env, object_keys, facts.series_uid, sample, settings)
    if not defer:
        return _read_into(env, key, object_keys, facts.series_uid, sample, settings)
    if not env.readings.start(facts.series_uid):
        raise ReadFirst(facts.series_uid, None)

    def read() -> None:
        try:
            _read_into(env, key, object_keys, facts.series_uid, sample, settings)
        except Exception as e:  # found by the decision, which says so, rather than read again
            env.readings.put(key, TextDetection(ran=False, reason=f"{type(e).__name__}"))
        finally:
            env.readings.done(facts.series_uid)

    raise ReadFirst(facts.series_uid, read)


def _read_into(
    env: OcrEnvironment,
    key: Hashable,
    object_keys: Mapping[str, str],
    series_uid: str,
    sample: Sequence[tuple[str, int]],
    settings: BurnedInSettings,
) -> TextDetection:
    found = _read_sample(env, object_keys, series_uid, sample, settings)
    env.readings.put(key, found)
    return found


def _read_sample(
    env: OcrEnvironment,
    object_keys: Mapping[str, str],
    series_uid: str,
    sample: Sequence[tuple[str, int]],
    settings: BurnedInSettings,
) -> TextDetection:
    """OCR of the sampled frames (read_series)."""
    frames: list[_Frame] = []
    for sop_uid, frame in sample:
        key = object_keys.get(sop_uid)
        if key is None:
            return TextDetection(ran=False, reason="an instance's object is not indexed")
        try:
            frames.append(_render(env.store, key, sop_uid, frame, settings.ocr_size))
        except (retrieve.NotRetrievable, retrieve.InvalidRequest, StorageError) as e:
            return TextDetection(ran=False, reason=f"a frame cannot be rendered: {e}")
    regions: list[TextRegion] = []
    try:
        for stack in _stacks(frames):
            regions += _read_stack(env.command, stack, settings)
    except OcrUnavailable as e:
        return TextDetection(ran=False, reason=str(e))
    found = tuple(dict.fromkeys(r.instance for r in regions))
    if regions:
        log.info(
            "OCR found %d line(s) of text in %d of %d frame(s) of series %s",
            len(regions),
            len({(r.instance, r.frame) for r in regions}),
            len(sample),
            series_uid,
        )
    return TextDetection(True, found, regions=tuple(regions[:MAX_REGIONS]), frames=len(sample))


@dataclass(frozen=True)
class _Frame:
    """One rendered frame: 8-bit grey, and the factor from its pixels back to the image's."""

    sop_uid: str
    number: int
    image: Image.Image
    scale: float


def _dimensions(meta: Mapping) -> tuple[int, int]:
    """(Rows, Columns) of an instance's metadata; 0 where absent."""
    return int(text(meta, "Rows") or 0), int(text(meta, "Columns") or 0)


def _render(store: ObjectStore, key: str, sop_uid: str, frame: int, size: int) -> _Frame:
    """One frame rendered by archive/render.py and scaled towards size pixels on its longer
    side (enlarged MAX_ENLARGE times at most)."""
    with retrieve.StoredObject(store, key) as obj:
        # The pixels themselves: no PNG encoded to be decoded again (both lossless).
        image = render.render_image(obj.file, frame).convert("L")
    longer = max(image.size)
    factor = min(MAX_ENLARGE, max(size, 16) / longer)
    target = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    if target != image.size:
        image = image.resize(target, Image.Resampling.LANCZOS)
    return _Frame(sop_uid, frame, image, 1 / factor)


def _stacks(frames: Sequence[_Frame]) -> list[list[_Frame]]:
    """The frames in groups whose stacked height (with GAP between) fits MAX_STACK."""
    stacks: list[list[_Frame]] = []
    height = 0
    for f in frames:
        if not stacks or height + GAP + f.image.height > MAX_STACK:
            stacks.append([])
            height = -GAP
        stacks[-1].append(f)
        height += GAP + f.image.height
    return stacks


def _read_stack(
    command: str, stack: Sequence[_Frame], settings: BurnedInSettings
) -> list[TextRegion]:
    """Read frames stacked one under the other (black bands between) in one tesseract run;
    the lines of confident words, each in its own frame's pixels."""
    width = max(f.image.width for f in stack)
    tops = []
    top = 0
    for f in stack:
        tops.append(top)
        top += f.image.height + GAP
    canvas = Image.new("L", (width, top - GAP), 0)
    for f, y in zip(stack, tops, strict=True):
        canvas.paste(f.image, (0, y))
    # Binary PGM (P5), which tesseract reads from stdin as it reads PNG (Leptonica), and the same
    # pixels: no zlib pass over them in this process, which serves requests meanwhile.
    out = io.BytesIO()
    canvas.save(out, "PPM")
    words = [
        w
        for w in run_tesseract(command, out.getvalue())
        if w.confidence >= settings.ocr_min_confidence and w.chars >= settings.ocr_min_chars
    ]
    regions = []
    for f, y in zip(stack, tops, strict=True):
        mine = [
            replace(w, top=w.top - y)
            for w in words
            if y <= w.top + w.height / 2 < y + f.image.height
        ]
        regions += lines(mine, f.sop_uid, f.number, f.scale)
    return regions


def run_tesseract(command: str, image: bytes) -> list[Word]:
    """The words tesseract reads in an encoded image (sparse text: overlays lie anywhere).
    The image goes through stdin and the words come back on stdout: no file is written."""
    try:
        proc = subprocess.Popen(
            [command, "stdin", "stdout", "--psm", "11", "-l", "eng", "tsv"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # One thread: the series worker shares the machine with intake and HTTP.
            env={**os.environ, "OMP_THREAD_LIMIT": "1"},
        )
    except FileNotFoundError:
        raise OcrUnavailable(f"tesseract not found ({os.path.basename(command)})") from None
    except PermissionError:
        raise OcrUnavailable("tesseract cannot be executed") from None
    with proc:
        # Background work: requests and intake come first (the reading takes the CPU they
        # leave).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, proc.pid, NICENESS)
        try:
            out, _ = proc.communicate(image, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise OcrUnavailable(f"tesseract took longer than {TIMEOUT:g} s") from None
    if proc.returncode != 0:
        # Its stderr is not passed on: it is tesseract's, and says nothing a curator needs.
        raise OcrUnavailable(f"tesseract failed (exit status {proc.returncode})")
    return parse_tsv(out.decode("utf-8", "replace"))


def parse_tsv(tsv: str) -> list[Word]:
    """The words (level 5 rows) of tesseract's TSV output."""
    words = []
    for row in csv.DictReader(io.StringIO(tsv), delimiter="\t", quoting=csv.QUOTE_NONE):
        if row.get("level") != "5" or not (row.get("text") or "").strip():
            continue
        try:
            words.append(
                Word(
                    (int(row["block_num"]), int(row["par_num"]), int(row["line_num"])),
                    int(row["left"]),
                    int(row["top"]),
                    int(row["width"]),
                    int(row["height"]),
                    float(row["conf"]),
                    len(_ALNUM.findall(row["text"])),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return words


def lines(words: Sequence[Word], sop_uid: str, frame: int, scale: float) -> list[TextRegion]:
    """Words grouped into their lines, each line's box in the image's own pixels."""
    grouped: dict[tuple[int, int, int], list[Word]] = defaultdict(list)
    for w in words:
        grouped[w.line].append(w)
    out = []
    for line in sorted(grouped):
        ws = grouped[line]
        left = min(w.left for w in ws)
        top = min(w.top for w in ws)
        right = max(w.left + w.width for w in ws)
        bottom = max(w.top + w.height for w in ws)
        x, y = int(left * scale), int(top * scale)
        out.append(
            TextRegion(
                sop_uid,
                frame,
                x,
                y,
                max(1, round(right * scale) - x),
                max(1, round(bottom * scale) - y),
                len(ws),
            )
        )
    return out
