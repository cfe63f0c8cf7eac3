"""Reading a (compressed) tar archive with bounded reads: the decompressed stream one record at a time.

tarfile reads a GNU long-name or pax record whole, in one read of the size its header declares (a few
bytes in real archives; a crafted one declares gigabytes of zeros that compress to nothing), and
``tarfile.is_tarfile`` reads an archive's whole first member to answer. So the archive is decompressed
here (gzip, bzip2 or xz, recognised by content) and handed to tarfile through :class:`BoundedReads`,
and :func:`is_tar` looks at the first header block only.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import tarfile
import typing as tp
import zlib
from pathlib import Path

from ..core.errors import InputError

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
