"""A training dataset: an uploaded archive (or one audio file) -> audio segments with captions.

1. **Unpacking** (:func:`unpack`): zip, tar, tar.gz / .tgz, tar.bz2, tar.xz (recognised by content,
   not by name), or one audio file, in one pass over the archive: each member is checked as its
   header is read, and the first one past a rule stops the unpacking (the run's folder, with what was
   unpacked so far, is removed by the run). Refused: an absolute path, a ``..`` component, a link or a
   device (nothing is ever written outside the training folder), an empty or over-long name, a name
   that is both a file and a folder or appears twice, an encrypted or oddly compressed zip member;
   the members' count and unpacked size must stay under :data:`MAX_FILES` / :data:`MAX_UNPACKED_BYTES`
   (a zip's count is read from its end record before its directory is parsed; bytes are counted again
   while extracting, so a header that lies changes nothing), and a tar's metadata records (long names,
   pax headers) are bounded before tarfile reads them. ``cancelled`` is checked at every member and
   every megabyte.
2. **Finding audio** (:func:`collect`): every file in nested folders, by extension, case-insensitive
   (:data:`AUDIO_EXTENSIONS`: what ``input_audio`` reads); macOS metadata (``__MACOSX/``, ``._*``)
   is ignored, other files are skipped and listed in the logs, and so is an audio file that does not
   decode. A caption is a same-name ``.txt`` beside the audio file (``song.mp3`` + ``song.txt``), its
   first :data:`CAPTION_MAX_BYTES` read; without one, the instance prompt (the ``caption`` input) applies.
3. **Segments** (:func:`segments`): each file is decoded piece by piece (PyAV, through
   :class:`..audio.input_audio.Decoding`) at the model's rate and channel count, and cut into windows of the
   model's segment length (30 s) as the pieces come; the remainder is kept if it is at least
   :data:`MIN_SEGMENT_SECONDS` long, as is a whole clip shorter than a window. Shorter segments are
   trained at their own length, never padded with silence (the loss masks the padding: :mod:`.loop`).
   A file's caption applies to each of its segments. Memory: one window and one decoded piece,
   whatever the length of a file or of the dataset; the dataset's total is bounded by
   :data:`MAX_DATASET_SECONDS` (time, not memory: each second is tokenized and trained on).

The run (:mod:`.run`) goes through the segments twice: once to check them and count them (:func:`plan`,
before the model loads: a dataset without usable audio is refused before any model work), and once
to tokenize them as they are decoded (:mod:`.tokens`), never holding the dataset's audio.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import Cancelled, InputError
from ..core.logs import get_logger
from . import archive
from .archive import FIELD

log = get_logger()

AUDIO_EXTENSIONS = {
    ".wav",
    ".wave",
    ".mp3",
    ".flac",
    ".ogg",
    ".oga",
    ".opus",
    ".m4a",
    ".aac",
    ".mp4",
    ".aif",
    ".aiff",
    ".webm",
}
CAPTION_EXTENSION = ".txt"
CAPTION_MAX_BYTES = 16 << 10  # more than a caption's 512 tokens take (tokens.fit_caption cuts to those)
MAX_FILES = 10_000
MAX_MEMBERS = 2 * MAX_FILES  # files, folders and the rest
MAX_UNPACKED_BYTES = 8 * 1024**3
MAX_FILE_BYTES = 2 * 1024**3
MAX_FILE_SECONDS = 3 * 3600.0
MAX_DATASET_SECONDS = 5 * 3600.0
MIN_SEGMENT_SECONDS = 2.0
MAX_NAME_BYTES = 255  # one path component (Linux's NAME_MAX)
MAX_PATH_BYTES = 1024


def _fail(rule: str) -> tp.NoReturn:
    raise InputError([(FIELD, rule)])


@dataclass
class Segment:
    source: str  # the file, relative to the dataset
    start: float  # seconds into the file
    wav: tp.Any  # torch.Tensor [channels, samples] at the model's rate
    caption: tp.Optional[str]  # None: the instance prompt

    def seconds(self, sample_rate: int) -> float:
        return self.wav.shape[-1] / sample_rate


@dataclass
class Collected:
    audio: tp.List[Path] = field(default_factory=list)
    captions: tp.Dict[Path, str] = field(default_factory=dict)
    skipped: tp.List[tp.Tuple[str, str]] = field(default_factory=list)  # (file, why)


# ------------------------------------------------------------------------------------------ unpacking


def unpack(dataset: Path, folder: Path, cancelled: tp.Callable[[], bool] = lambda: False) -> Path:
    """Unpack ``dataset`` into ``folder`` (which must be empty or absent) under this module's limits
    (:mod:`.archive`); returns the folder holding the files (for a single audio file: a folder with it)."""
    limits = archive.Limits(
        files=MAX_FILES,
        members=MAX_MEMBERS,
        unpacked_bytes=MAX_UNPACKED_BYTES,
        name_bytes=MAX_NAME_BYTES,
        path_bytes=MAX_PATH_BYTES,
    )  # (read now: tests lower them)
    return archive.unpack(dataset, folder, limits, cancelled)


# ------------------------------------------------------------------------------------------ finding audio


def collect(folder: Path) -> Collected:
    """Audio files and captions under ``folder`` (sorted, so the order is the same every run)."""
    found = Collected()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    texts = {p.with_suffix("").as_posix().lower(): p for p in files if p.suffix.lower() == CAPTION_EXTENSION}
    for p in files:
        rel = p.relative_to(folder).as_posix()
        if "__MACOSX" in p.relative_to(folder).parts or p.name.startswith("._") or p.name == ".DS_Store":
            continue
        suffix = p.suffix.lower()
        if suffix == CAPTION_EXTENSION:
            continue
        if suffix not in AUDIO_EXTENSIONS:
            found.skipped.append((rel, "not an audio file"))
            continue
        found.audio.append(p)
        caption_file = texts.get(p.with_suffix("").as_posix().lower())
        if caption_file is not None:
            text = read_caption(caption_file)
            if text:
                found.captions[p] = text
    return found


def read_caption(path: Path) -> str:
    """A caption file's text: its first :data:`CAPTION_MAX_BYTES` (a longer one is cut, logged)."""
    with open(path, "rb") as f:
        data = f.read(CAPTION_MAX_BYTES + 1)
    if len(data) > CAPTION_MAX_BYTES:
        log.info(
            "dataset: the caption %s is longer than %d KB: its beginning is used", path.name, CAPTION_MAX_BYTES >> 10
        )
        data = data[:CAPTION_MAX_BYTES]
    return data.decode(errors="replace").strip()


# ------------------------------------------------------------------------------------------ segments


def segments(
    folder: Path,
    found: Collected,
    sample_rate: int,
    channels: int,
    window_seconds: float,
    cancelled: tp.Callable[[], bool] = lambda: False,
) -> tp.Iterator[Segment]:
    """Decode every audio file and cut it into segments as it decodes (see the module docstring),
    yielding each. Files that do not decode are skipped and added to ``found.skipped`` (one that fails
    part way has given the segments before the failure: :func:`plan` leaves such files out)."""
    for path in found.audio:
        if cancelled():
            return
        rel = path.relative_to(folder).as_posix()
        count = 0
        try:
            for seg in _file_segments(path, rel, found.captions.get(path), sample_rate, channels, window_seconds):
                count += 1
                yield seg
        except InputError as exc:
            found.skipped.append((rel, exc.problems[0][1]))
            continue
        if not count:
            found.skipped.append((rel, f"shorter than {MIN_SEGMENT_SECONDS:g} s"))


def _file_segments(
    path: Path, rel: str, caption: tp.Optional[str], sample_rate: int, channels: int, window_seconds: float
) -> tp.Iterator[Segment]:
    """One file's segments as its pieces are decoded; InputError (``dataset``) when it does not decode."""
    import torch

    from ..audio import input_audio

    window = int(round(window_seconds * sample_rate))
    minimum = int(round(MIN_SEGMENT_SECONDS * sample_rate))
    decoding = input_audio.Decoding(
        path, sample_rate, channels, max_bytes=MAX_FILE_BYTES, max_seconds=MAX_FILE_SECONDS, field=FIELD
    )
    pending: tp.List[tp.Any] = []
    held = start = 0
    for piece in decoding:
        pending.append(piece)
        held += piece.shape[-1]
        while held >= window:
            joined = torch.cat(pending, dim=1)
            yield Segment(source=rel, start=start / sample_rate, wav=joined[:, :window].clone(), caption=caption)
            pending, held, start = [joined[:, window:]], held - window, start + window
    if held >= minimum:  # the remainder, or a whole clip shorter than a window
        yield Segment(source=rel, start=start / sample_rate, wav=torch.cat(pending, dim=1).clone(), caption=caption)


@dataclass
class Plan:
    """What :func:`plan` found: the files that give segments, and what the run reports of them."""

    usable: Collected
    summary: tp.Dict[str, tp.Any]


def plan(
    folder: Path,
    found: Collected,
    sample_rate: int,
    channels: int,
    window_seconds: float,
    cancelled: tp.Callable[[], bool] = lambda: False,
) -> Plan:
    """Go through every file's segments once, keeping none of their audio: which files give segments
    (the ones the run then tokenizes, a second time through :func:`segments`), how many and how long.
    A file that does not decode to its end is skipped whole; a dataset longer than
    :data:`MAX_DATASET_SECONDS` is refused."""
    usable = Collected()
    count = captioned = 0
    seconds = 0.0
    for path in found.audio:
        if cancelled():
            raise Cancelled("training cancelled while reading the dataset")
        rel = path.relative_to(folder).as_posix()
        caption = found.captions.get(path)
        file_count, file_seconds = 0, 0.0
        try:
            for seg in _file_segments(path, rel, caption, sample_rate, channels, window_seconds):
                file_count += 1
                file_seconds += seg.seconds(sample_rate)
                if seconds + file_seconds > MAX_DATASET_SECONDS:
                    raise _TooLong()
        except InputError as exc:
            found.skipped.append((rel, exc.problems[0][1]))
            continue
        except _TooLong:
            _fail(f"holds more than {MAX_DATASET_SECONDS / 3600:g} hours of audio, the limit")
        if not file_count:
            found.skipped.append((rel, f"shorter than {MIN_SEGMENT_SECONDS:g} s"))
            continue
        usable.audio.append(path)
        if caption is not None:
            usable.captions[path] = caption
        count += file_count
        captioned += file_count if caption is not None else 0
        seconds += file_seconds
    summary = {
        "audio_files": len(usable.audio),
        "segments": count,
        "seconds": round(seconds, 1),
        "captioned_segments": captioned,
        "skipped": [f"{name} ({why})" for name, why in found.skipped][:50],
    }
    return Plan(usable=usable, summary=summary)


class _TooLong(Exception):
    pass


def describe_skipped(found: Collected) -> None:
    for name, why in found.skipped:
        log.info("dataset: skipped %s: %s", name, why)
