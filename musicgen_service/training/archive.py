"""Unpacking a training archive (zip, tar, tar.gz / .tgz, tar.bz2, tar.xz, recognised by content, not by
name) in one pass, each member checked as its header is read against the dataset's :class:`Limits`.

The first member past a rule stops the unpacking (the run's folder, with what was unpacked so far, is
removed by the run). Refused: an absolute path, a ``..`` component, a link or a device (nothing is ever
written outside the training folder), an empty or over-long name, a name that is both a file and a
folder or appears twice, an encrypted or oddly compressed zip member; the members' count and unpacked
size past the limits (a zip's count and directory size are read from its end record before zipfile
parses the directory; bytes are counted again while extracting, so a header that lies changes nothing).
``cancelled`` is checked at every member and every megabyte.

Tar archives are decompressed here (gzip, bzip2, xz) and read through :class:`BoundedReads`: tarfile
reads a GNU long-name or pax record whole, in one read of the size its header declares (a few bytes in
real archives; a crafted one declares gigabytes of zeros that compress to nothing), and
``tarfile.is_tarfile`` reads an archive's whole first member to answer, so :func:`is_tar` looks at the
first header block only.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import io
import lzma
import shutil
import stat
import tarfile
import typing as tp
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..core.errors import Cancelled, InputError

FIELD = "dataset"


@dataclass(frozen=True)
class Limits:
    """What an archive may hold (the dataset's rules: :mod:`.dataset`)."""

    files: int
    members: int  # files, folders and the rest
    unpacked_bytes: int
    name_bytes: int  # one path component
    path_bytes: int

    @property
    def zip_directory(self) -> int:
        """Bytes of a zip's central directory (zipfile parses it whole when it opens the file)."""
        return self.members * 1024


def _fail(rule: str) -> tp.NoReturn:
    raise InputError([(FIELD, rule)])


def unpack(dataset: Path, folder: Path, limits: Limits, cancelled: tp.Callable[[], bool] = lambda: False) -> Path:
    """Unpack ``dataset`` into ``folder`` (which must be empty or absent); returns the folder holding
    the files (for a single audio file: a folder with that file)."""
    dataset = Path(dataset)
    if not dataset.is_file():
        _fail(f"{dataset} is not a file")
    if dataset.stat().st_size == 0:
        _fail("the uploaded file is empty")
    folder.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(dataset):
        _unzip(dataset, _Writer(folder, limits, cancelled))
    elif is_tar(dataset):
        _untar(dataset, _Writer(folder, limits, cancelled))
    elif dataset.suffix.lower() in {".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz"}:
        _fail(f"{dataset.name} is not a readable zip or tar archive (damaged or of another format)")
    else:  # one audio file: decoded (and refused if it is not audio) with the others
        shutil.copyfile(dataset, folder / (dataset.name or "audio"))
    return folder


def _member_problem(name: str, limits: Limits) -> tp.Optional[str]:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        return "an absolute path"
    if ".." in path.parts:
        return "a '..' component"
    if not path.parts:
        return "an empty name"
    if "\x00" in name:
        return "a NUL character in its name"
    if len(name.encode(errors="surrogateescape")) > limits.path_bytes:
        return f"a name longer than {limits.path_bytes} bytes"
    if any(len(part.encode(errors="surrogateescape")) > limits.name_bytes for part in path.parts):
        return f"a name part longer than {limits.name_bytes} bytes"
    return None


class _Writer:
    """Writes checked members into the folder, one at a time as the archive is read; every rule is
    applied to each member as it comes (see the module docstring)."""

    def __init__(self, folder: Path, limits: Limits, cancelled: tp.Callable[[], bool]):
        self.folder = folder
        self.limits = limits
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
        if self.members > self.limits.members:
            _fail(f"the archive holds more than {self.limits.members} members; the limit is {self.limits.members}")
        problem = _member_problem(name, self.limits)
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
        if len(self.files) > self.limits.files:
            _fail(f"the archive holds more than {self.limits.files} files; the limit is {self.limits.files}")
        if self.written + size > self.limits.unpacked_bytes:
            _fail(
                f"the archive unpacks to more than {self.limits.unpacked_bytes / 1024**3:.0f} GB, the limit "
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
            if self.written > self.limits.unpacked_bytes:
                _fail(f"the archive unpacks to more than {self.limits.unpacked_bytes / 1024**3:.0f} GB, the limit")
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
        if count > writer.limits.members:
            _fail(f"the archive holds {count} files; the limit is {writer.limits.files}")
        if directory > writer.limits.zip_directory:  # zipfile parses entries by the directory's size, not the count
            _fail(
                f"the archive's directory is {directory / 2**20:.0f} MB: more than {writer.limits.members} members; "
                f"the limit is {writer.limits.files} files"
            )
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            files, size = sum(1 for i in infos if not i.is_dir()), sum(i.file_size for i in infos)
            if files > writer.limits.files:
                _fail(f"the archive holds {files} files; the limit is {writer.limits.files}")
            if size > writer.limits.unpacked_bytes:
                _fail(
                    f"the archive unpacks to {size / 1024**3:.1f} GB; the limit is "
                    f"{writer.limits.unpacked_bytes / 1024**3:.0f} GB"
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
        with bounded(path) as stream, tarfile.open(fileobj=stream, mode="r:") as t:
            for m in t:  # one header at a time (getmembers() would read every header first)
                kind = "link" if m.issym() or m.islnk() else "dir" if m.isdir() else "file" if m.isfile() else "special"
                writer.member(m.name, kind, m.size, lambda m=m: t.extractfile(m))
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
        _fail(f"{path.name} is a damaged tar archive ({exc})")


MAX_SINGLE_READ = 4 << 20  # one read of the decompressed stream: a header record, or a block of data


class BoundedReads(io.RawIOBase):
    """A decompressed tar stream whose single reads are bounded: tarfile reads a long-name or pax record
    whole, in one read of the size its header declares (a few bytes in real archives; a crafted one
    declares gigabytes of zeros that compress to nothing). Seeks go to the decompressed stream (forward
    only, in practice: every member is read in order)."""

    def __init__(self, raw: tp.Any):
        self.raw = raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > MAX_SINGLE_READ:
            raise InputError(
                [("dataset", f"a tar header declares a record of {n} bytes (names and metadata take a few): refused")]
            )
        return self.raw.read(n)

    def readinto(self, b: tp.Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def decompressed(path: Path) -> tp.Any:
    """The file, decompressed as it is read (gzip, bzip2, xz by their first bytes; else as it is)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb")
    if magic[:6] == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb")


def is_tar(path: Path) -> bool:
    """Whether ``path`` (maybe compressed) starts with a tar header. Only that first block is read:
    ``tarfile.is_tarfile`` reads the first member, long-name records included, whatever their size."""
    try:
        with decompressed(path) as raw:
            block = raw.read(tarfile.BLOCKSIZE)
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        return True
    except (OSError, EOFError, tarfile.TarError, lzma.LZMAError, zlib.error):
        return False


@contextlib.contextmanager
def bounded(path: Path) -> tp.Iterator[BoundedReads]:
    """``path`` decompressed, for ``tarfile.open(fileobj=..., mode="r:")``, with its reads bounded."""
    with decompressed(path) as raw:
        yield BoundedReads(raw)
