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

import errno
import lzma
import shutil
import stat
import tarfile
import typing as tp
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..core.errors import Cancelled, InputError
from ..core.logs import get_logger
from . import tar_stream

log = get_logger()

FIELD = "dataset"
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
MAX_ZIP_DIRECTORY = MAX_MEMBERS * 1024  # bytes of a zip's central directory, parsed whole by zipfile


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
    """Unpack ``dataset`` into ``folder`` (which must be empty or absent); returns the folder holding
    the files (for a single audio file: a folder with that file)."""
    dataset = Path(dataset)
    if not dataset.is_file():
        _fail(f"{dataset} is not a file")
    if dataset.stat().st_size == 0:
        _fail("the uploaded file is empty")
    folder.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(dataset):
        _unzip(dataset, _Writer(folder, cancelled))
    elif tar_stream.is_tar(dataset):
        _untar(dataset, _Writer(folder, cancelled))
    elif dataset.suffix.lower() in {".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz"}:
        _fail(f"{dataset.name} is not a readable zip or tar archive (damaged or of another format)")
    else:  # one audio file: decoded (and refused if it is not audio) with the others
        shutil.copyfile(dataset, folder / (dataset.name or "audio"))
    return folder


def _member_problem(name: str) -> tp.Optional[str]:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        return "an absolute path"
    if ".." in path.parts:
        return "a '..' component"
    if not path.parts:
        return "an empty name"
    if "\x00" in name:
        return "a NUL character in its name"
    if len(name.encode(errors="surrogateescape")) > MAX_PATH_BYTES:
        return f"a name longer than {MAX_PATH_BYTES} bytes"
    if any(len(part.encode(errors="surrogateescape")) > MAX_NAME_BYTES for part in path.parts):
        return f"a name part longer than {MAX_NAME_BYTES} bytes"
    return None


class _Writer:
    """Writes checked members into the folder, one at a time as the archive is read; every rule is
    applied to each member as it comes (see the module docstring)."""

    def __init__(self, folder: Path, cancelled: tp.Callable[[], bool]):
        self.folder = folder
        self.cancelled = cancelled
        self.members = 0
        self.files: tp.Set[PurePosixPath] = set()
        self.dirs: tp.Set[PurePosixPath] = set()
        self.written = 0

    def member(self, name: str, kind: str, size: int, opener: tp.Callable[[], tp.Any]) -> None:
        """One member: ``kind`` is file, dir, link or special; ``size`` as its header declares it."""
        if self.cancelled():
            raise Cancelled("training cancelled while unpacking")
        self.members += 1
        if self.members > MAX_MEMBERS:
            _fail(f"the archive holds more than {MAX_MEMBERS} members; the limit is {MAX_MEMBERS}")
        problem = _member_problem(name)
        if problem:
            _fail(f"the archive member {name[:200]!r} has {problem}: refused")
        if kind in ("link", "special"):
            what = "a link" if kind == "link" else "not a regular file"
            _fail(f"the archive member {name!r} is {what}: refused")
        path = PurePosixPath(name.replace("\\", "/"))
        parents = set(path.parents) - {PurePosixPath(".")}
        clash = next((p for p in sorted(parents) if p in self.files), None)
        if clash is not None:
            _fail(f"the archive member {name!r} is inside {str(clash)!r}, which is a file: refused")
        if kind == "dir":
            if path in self.files:
                _fail(f"the archive member {name!r} is both a file and a folder: refused")
            self.dirs.add(path)
            self.dirs.update(parents)
            return
        if path in self.dirs:
            _fail(f"the archive member {name!r} is both a file and a folder: refused")
        if path in self.files:
            _fail(f"the archive member {name!r} appears twice: refused")
        self.files.add(path)
        self.dirs.update(parents)
        if len(self.files) > MAX_FILES:
            _fail(f"the archive holds more than {MAX_FILES} files; the limit is {MAX_FILES}")
        if self.written + size > MAX_UNPACKED_BYTES:
            _fail(
                f"the archive unpacks to more than {MAX_UNPACKED_BYTES / 1024**3:.0f} GB, the limit "
                f"(its member {name!r} alone declares {size / 1024**3:.1f} GB)"
            )
        target = self.folder / path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with opener() as src, open(target, "wb") as dst:
                self._copy(src, dst)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                _fail("does not fit on this machine's disk when unpacked")
            _fail(f"the archive member {name!r} cannot be unpacked ({exc.strerror or exc})")

    def _copy(self, src: tp.BinaryIO, dst: tp.BinaryIO) -> None:
        for block in iter(lambda: src.read(1 << 20), b""):
            self.written += len(block)
            if self.written > MAX_UNPACKED_BYTES:
                _fail(f"the archive unpacks to more than {MAX_UNPACKED_BYTES / 1024**3:.0f} GB, the limit")
            if self.cancelled():
                raise Cancelled("training cancelled while unpacking")
            dst.write(block)


def _unzip(path: Path, writer: _Writer) -> None:
    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # the end record: the entry count, before the directory is parsed
        if end is None:
            _fail(f"{path.name} is a damaged zip archive (no end record)")
        count, directory = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
        if count > MAX_MEMBERS:
            _fail(f"the archive holds {count} files; the limit is {MAX_FILES}")
        if directory > MAX_ZIP_DIRECTORY:  # zipfile parses entries by the directory's size, not the count
            _fail(
                f"the archive's directory is {directory / 2**20:.0f} MB: more than {MAX_MEMBERS} members; "
                f"the limit is {MAX_FILES} files"
            )
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if sum(1 for i in infos if not i.is_dir()) > MAX_FILES:
                _fail(f"the archive holds {sum(1 for i in infos if not i.is_dir())} files; the limit is {MAX_FILES}")
            if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
                _fail(
                    f"the archive unpacks to {sum(i.file_size for i in infos) / 1024**3:.1f} GB; the limit is "
                    f"{MAX_UNPACKED_BYTES / 1024**3:.0f} GB"
                )
            for i in infos:
                if i.flag_bits & 0x1:
                    _fail(f"the archive member {i.filename!r} is encrypted: refused (unpack it without a password)")
                if i.compress_type not in (
                    zipfile.ZIP_STORED,
                    zipfile.ZIP_DEFLATED,
                    zipfile.ZIP_BZIP2,
                    zipfile.ZIP_LZMA,
                ):
                    _fail(
                        f"the archive member {i.filename!r} uses a compression this service does not read "
                        f"(method {i.compress_type}): refused"
                    )
                kind = "link" if stat.S_ISLNK(i.external_attr >> 16) else "dir" if i.is_dir() else "file"
                writer.member(i.filename, kind, i.file_size, lambda i=i: z.open(i))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        _fail(f"{path.name} is a damaged zip archive ({exc})")
    except OSError as exc:  # (raised while reading members: a zip whose data is cut short)
        _fail(f"{path.name} is a damaged zip archive ({exc.strerror or exc})")


def _untar(path: Path, writer: _Writer) -> None:
    try:
        with tar_stream.bounded(path) as stream, tarfile.open(fileobj=stream, mode="r:") as t:
            for m in t:  # one header at a time (getmembers() would read every header first)
                kind = "link" if m.issym() or m.islnk() else "dir" if m.isdir() else "file" if m.isfile() else "special"
                writer.member(m.name, kind, m.size, lambda m=m: t.extractfile(m))
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
        _fail(f"{path.name} is a damaged tar archive ({exc})")


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
