"""A training dataset: an uploaded archive (or one audio file) -> audio segments with captions.

1. **Unpacking** (:func:`unpack`): zip, tar, tar.gz / .tgz, tar.bz2, tar.xz (recognised by content,
   not by name), or one audio file. Before anything is written, every member is checked: an
   absolute path, a ``..`` component, a link or a device is refused (nothing is ever written outside
   the training folder), and the members' count and unpacked size must stay under
   :data:`MAX_FILES` / :data:`MAX_UNPACKED_BYTES`; bytes are counted again while extracting, so a
   header that lies changes nothing. A damaged archive is refused with a message.
2. **Finding audio** (:func:`collect`): every file in nested folders, by extension, case-insensitive
   (:data:`AUDIO_EXTENSIONS`: what ``input_audio`` reads); macOS metadata (``__MACOSX/``, ``._*``)
   is ignored, other files are skipped and listed in the logs, and so is an audio file that does not
   decode. A caption is a same-name ``.txt`` beside the audio file (``song.mp3`` + ``song.txt``);
   without one, the instance prompt (the ``caption`` input) applies.
3. **Segments** (:func:`segments`): each file is decoded (PyAV, through :mod:`..audio_in`) at the
   model's rate and channel count, and cut into windows of the model's segment length (30 s); the
   remainder is kept if it is at least :data:`MIN_SEGMENT_SECONDS` long, as is a whole clip shorter
   than a window. Shorter segments are trained at their own length, never padded with silence (the
   loss masks the padding: :mod:`.loop`). A file's caption applies to each of its segments.
"""
from __future__ import annotations

import functools
import shutil
import stat
import tarfile
import typing as tp
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import InputError
from ..logs import get_logger

log = get_logger()

FIELD = "dataset"
AUDIO_EXTENSIONS = {".wav", ".wave", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".mp4",
                    ".aif", ".aiff", ".webm"}
CAPTION_EXTENSION = ".txt"
MAX_FILES = 10_000
MAX_UNPACKED_BYTES = 8 * 1024**3
MAX_FILE_BYTES = 2 * 1024**3
MAX_FILE_SECONDS = 3 * 3600.0
MIN_SEGMENT_SECONDS = 2.0


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

def _member_problem(name: str) -> tp.Optional[str]:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        return "an absolute path"
    if ".." in path.parts:
        return "a '..' component"
    return None


def unpack(dataset: Path, folder: Path) -> Path:
    """Unpack ``dataset`` into ``folder`` (which must be empty or absent); returns the folder holding
    the files (for a single audio file: a folder with that file)."""
    dataset = Path(dataset)
    if not dataset.is_file():
        _fail(f"{dataset} is not a file")
    if dataset.stat().st_size == 0:
        _fail("the uploaded file is empty")
    folder.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(dataset):
        _unzip(dataset, folder)
    elif _is_tar(dataset):
        _untar(dataset, folder)
    elif dataset.suffix.lower() in {".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz"}:
        _fail(f"{dataset.name} is not a readable zip or tar archive (damaged or of another format)")
    else:  # one audio file: decoded (and refused if it is not audio) with the others
        shutil.copyfile(dataset, folder / (dataset.name or "audio"))
    return folder


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError):
        return False


def _check_totals(count: int, size: int) -> None:
    if count > MAX_FILES:
        _fail(f"the archive holds {count} files; the limit is {MAX_FILES}")
    if size > MAX_UNPACKED_BYTES:
        _fail(f"the archive unpacks to {size / 1024**3:.1f} GB; the limit is {MAX_UNPACKED_BYTES / 1024**3:.0f} GB")


@dataclass
class _Member:
    """An archive member, whatever the archive's format."""
    name: str
    kind: str  # file, dir, link or special
    size: int
    open: tp.Callable[[], tp.Any]


def _extract(members: tp.Sequence[_Member], folder: Path) -> None:
    """Check every member, then the totals, then write the files (bytes counted as they are)."""
    for m in members:
        problem = _member_problem(m.name)
        if problem:
            _fail(f"the archive member {m.name!r} has {problem}: refused, nothing was unpacked")
        if m.kind in ("link", "special"):
            what = "a link" if m.kind == "link" else "not a regular file"
            _fail(f"the archive member {m.name!r} is {what}: refused, nothing was unpacked")
    files = [m for m in members if m.kind == "file"]
    _check_totals(len(files), sum(m.size for m in files))
    written = 0
    for m in files:
        target = folder / PurePosixPath(m.name.replace("\\", "/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with m.open() as src, open(target, "wb") as dst:
            written = _copy_counted(src, dst, written)


def _unzip(path: Path, folder: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            _extract([_Member(i.filename, "link" if stat.S_ISLNK(i.external_attr >> 16) else
                              "dir" if i.is_dir() else "file", i.file_size, functools.partial(z.open, i))
                      for i in z.infolist()], folder)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        _fail(f"{path.name} is a damaged zip archive ({exc})")


def _untar(path: Path, folder: Path) -> None:
    try:
        with tarfile.open(path) as t:
            _extract([_Member(m.name, "link" if m.issym() or m.islnk() else "dir" if m.isdir() else
                              "file" if m.isfile() else "special", m.size, functools.partial(t.extractfile, m))
                      for m in t.getmembers()], folder)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        _fail(f"{path.name} is a damaged tar archive ({exc})")


def _copy_counted(src: tp.BinaryIO, dst: tp.BinaryIO, written: int) -> int:
    for block in iter(lambda: src.read(1 << 20), b""):
        written += len(block)
        if written > MAX_UNPACKED_BYTES:
            _fail(f"the archive unpacks to more than {MAX_UNPACKED_BYTES / 1024**3:.0f} GB, the limit")
        dst.write(block)
    return written


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
            text = caption_file.read_text(errors="replace").strip()
            if text:
                found.captions[p] = text
    return found


# ------------------------------------------------------------------------------------------ segments

def segments(folder: Path, found: Collected, sample_rate: int, channels: int, window_seconds: float,
             cancelled: tp.Callable[[], bool] = lambda: False) -> tp.List[Segment]:
    """Decode every audio file and cut it into segments (see the module docstring). Files that do
    not decode are skipped and added to ``found.skipped``."""
    from .. import audio_in

    window = int(round(window_seconds * sample_rate))
    minimum = int(round(MIN_SEGMENT_SECONDS * sample_rate))
    out: tp.List[Segment] = []
    too_short = 0
    for path in found.audio:
        if cancelled():
            break
        rel = path.relative_to(folder).as_posix()
        try:
            clip = audio_in.load(path, sample_rate, channels, max_bytes=MAX_FILE_BYTES,
                                 max_seconds=MAX_FILE_SECONDS, field=FIELD)
        except InputError as exc:
            found.skipped.append((rel, exc.problems[0][1]))
            continue
        wav, caption = clip.wav, found.captions.get(path)
        kept = 0
        for start in range(0, wav.shape[-1], window):
            piece = wav[:, start:start + window]
            if piece.shape[-1] < minimum:
                continue
            out.append(Segment(source=rel, start=start / sample_rate, wav=piece.clone(), caption=caption))
            kept += 1
        if not kept:
            too_short += 1
            found.skipped.append((rel, f"shorter than {MIN_SEGMENT_SECONDS:g} s"))
    return out


def summary(found: Collected, segs: tp.Sequence[Segment], sample_rate: int) -> tp.Dict[str, tp.Any]:
    return {"audio_files": len({s.source for s in segs}), "segments": len(segs), "seconds": round(sum(s.seconds(sample_rate) for s in segs), 1),
            "captioned_segments": sum(1 for s in segs if s.caption is not None),
            "skipped": [f"{name} ({why})" for name, why in found.skipped][:50]}


def describe_skipped(found: Collected) -> None:
    for name, why in found.skipped:
        log.info("dataset: skipped %s: %s", name, why)
