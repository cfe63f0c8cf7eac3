"""Fuzzing ``input_audio``'s decoder: malformed files of every accepted format through
``musicgen_service.audio.input_audio.load``, each in its own forked child, counting what a damaged or hostile
upload does to the worker.

Why: audio is decoded by FFmpeg (PyAV) inside the Cog worker process. A Python exception there is a
failed request, but a crash of FFmpeg's C code (a signal: SIGSEGV, SIGABRT, SIGBUS, SIGFPE...) takes
the whole worker down, and with it every prediction running concurrently; a hang holds a slot forever;
a header that makes FFmpeg allocate without bound can take the machine's memory. So each input is
decoded in a child of one parent that imported torch, PyAV and ``audio_in`` once (``os.fork``: cheap,
and the child runs exactly the service's code), and the parent records how each child ended:

- decoded: ``load`` returned audio (a mutation FFmpeg tolerated);
- refused: ``load`` raised ``InputError`` (the expected answer to a damaged file);
- other exception: any other Python exception (a bug in ``audio_in``: its type, message and where);
- crash: the child was killed by a signal (the input is kept under ``<work>/fuzz-crashes/`` with its
  mutation and the child's Python stack from ``faulthandler``);
- hang: still running after ``--timeout`` seconds, then killed (kept too, with the stack dumped just
  before the kill).

Per input, the wall time from fork to reap, the child's CPU time, and the memory decoding added: the
child's peak resident set (``ru_maxrss`` from ``os.wait4``) less its resident set right after the fork
(which the child reports before decoding; a forked child maps fewer pages than its parent until it
touches them, so the parent's resident set would overstate the baseline). Children run under an
address-space limit (the parent's size plus ``--mem-headroom-mb``) so one allocation bomb cannot take
the shared machine's memory: such a child ends with MemoryError or a refusal, and its peak shows.

Inputs: real files written by ``tests/audio_helpers.py`` (wav, mp3, flac, ogg vorbis, ogg opus, m4a,
ADTS aac, aiff, webm; mono, stereo and 5.1, several rates, 1-5 s), mutated with a seeded generator
(input ``i`` depends only on ``--seed`` and ``i``: ``--replay i`` rebuilds and decodes it alone).
Mutations, one to three per input: bit flips, random byte overwrites, truncation, chunk duplication,
deletion and shuffling, header fields set to edge values (0, 1, all ones, the sign bit, off by one...)
in each format's own structures (RIFF/WAVE fmt and data, AIFF COMM/SSND, FLAC STREAMINFO and frame
headers, MP4 boxes, sample tables and esds, Ogg pages with Vorbis/Opus headers, MPEG frame headers and
Xing, ADTS headers, EBML element sizes and track fields), huge length fields, codec swaps (another
codec tag in the same container: wav format tags, MP4 sample entries, Matroska codec ids, AIFF
turned AIFC with a compression type, so FFmpeg's other decoders see this data), and splices of two
files. The first bytes (the signature ``audio_in.container`` reads) are mostly left alone: a broken
signature is refused before FFmpeg and tests nothing. Ogg pages get their CRC recomputed after most
mutations, since FFmpeg drops a page whose CRC is wrong before its decoder sees it.

    PYTHONPATH=. python bench/fuzz_audio.py                   # the full run: bench/results/fuzz.{md,json}
    PYTHONPATH=. python bench/fuzz_audio.py --quick 40 --out /tmp/fuzz   # smoke run
    PYTHONPATH=. python bench/fuzz_audio.py --seed 28 --count 6000 --out bench/results/fuzz-seed28   # a second sample
    PYTHONPATH=. python bench/fuzz_audio.py --replay 1234     # one input again, in this process

Writes ``--out``.md / .json and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import hashlib
import json
import math
import os
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import time
import traceback
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # audio_helpers: the test suite's own writers

SAMPLE_RATE, CHANNELS = 32000, 2  # what the service asks audio_in for (the model's rate, stereo)

# format label -> seeds as (channels, sample rate, seconds). Opus only encodes at 8/12/16/24/48 kHz
# and MPEG audio at most 2 channels; 5.1 where the container carries it without extra mapping.
SEEDS: tp.Dict[str, tp.List[tp.Tuple[int, int, float]]] = {
    "wav": [(1, 16000, 1.0), (2, 44100, 3.0), (6, 48000, 2.0)],
    "mp3": [(1, 22050, 1.0), (2, 44100, 3.0), (2, 48000, 5.0)],
    "flac": [(1, 16000, 1.0), (2, 44100, 3.0), (6, 48000, 2.0)],
    "ogg": [(1, 22050, 1.0), (2, 44100, 3.0), (2, 48000, 5.0)],
    "opus": [(1, 16000, 1.0), (2, 48000, 3.0), (2, 24000, 5.0)],
    "m4a": [(1, 22050, 1.0), (2, 44100, 3.0), (2, 48000, 5.0)],
    "aac": [(1, 32000, 1.0), (2, 44100, 3.0), (2, 48000, 5.0)],
    "aiff": [(1, 16000, 1.0), (2, 44100, 3.0), (6, 48000, 2.0)],
    "webm": [(1, 48000, 1.0), (2, 48000, 3.0), (2, 24000, 5.0)],
}
FORMATS = list(SEEDS)
OGG_LIKE = {"ogg", "opus"}
PROTECT = 12  # bytes of signature left alone by most mutations (see the docstring)

EXIT_DECODED, EXIT_REFUSED, EXIT_EXCEPTION = 0, 1, 2
OUTCOMES = ("decoded", "refused", "exception", "crash", "hang")


def log(message: str) -> None:
    print(f"[fuzz] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ seeds


@dataclass
class Seed:
    fmt: str
    name: str
    data: bytes


def write_seeds(folder: Path) -> tp.Dict[str, tp.List[Seed]]:
    """Real files of every accepted format (the same encoders as the test suite), written again on
    every run: the encoders are deterministic, and the JSON keeps each seed's sha256 to check that."""
    from audio_helpers import melody, sine, write

    folder.mkdir(parents=True, exist_ok=True)
    seeds: tp.Dict[str, tp.List[Seed]] = {}
    for fmt, specs in SEEDS.items():
        seeds[fmt] = []
        for channels, rate, seconds in specs:
            name = f"{fmt}-{channels}ch-{rate}-{seconds:g}s.{fmt}"
            if seconds <= 1.0:
                wav = sine(440.0, seconds, rate, 0.5, channels)
            else:  # notes: frames that differ, so duplicated or shuffled chunks are not all alike
                notes = [262.0, 330.0, 392.0, 523.0, 440.0, 349.0]
                wav = melody([notes[i % len(notes)] for i in range(int(seconds / 0.5))], 0.5, rate, channels)
            path = write(folder / name, wav, rate)
            seeds[fmt].append(Seed(fmt, name, path.read_bytes()))
    return seeds


# -------------------------------------------------------------------------- structure fields


@dataclass
class Field:
    """A header field: ``bits`` bits at ``shift`` inside the ``width``-byte integer at ``offset``."""

    name: str
    offset: int
    width: int
    big: bool = True
    shift: int = 0
    bits: int = 0  # 0: the whole integer
    length: bool = False  # a size, length or count (what "huge length" mutations aim at)

    @property
    def nbits(self) -> int:
        return self.bits or 8 * self.width

    def get(self, d: tp.Union[bytes, bytearray]) -> int:
        raw = int.from_bytes(d[self.offset : self.offset + self.width], "big" if self.big else "little")
        return (raw >> self.shift) & ((1 << self.nbits) - 1)

    def set(self, d: bytearray, value: int) -> None:
        order = "big" if self.big else "little"
        raw = int.from_bytes(d[self.offset : self.offset + self.width], order)
        mask = ((1 << self.nbits) - 1) << self.shift
        raw = (raw & ~mask) | ((value << self.shift) & mask)
        d[self.offset : self.offset + self.width] = raw.to_bytes(self.width, order)


def u32le(d: bytes, p: int) -> int:
    return struct.unpack_from("<I", d, p)[0]


def u32be(d: bytes, p: int) -> int:
    return struct.unpack_from(">I", d, p)[0]


def tag(d: bytes, p: int) -> str:
    return d[p : p + 4].decode("latin-1").strip().replace(" ", "_") or "?"


def wav_fields(d: bytes) -> tp.List[Field]:
    out = [Field("RIFF.size", 4, 4, False, length=True)]
    p = 12
    while p + 8 <= len(d) and len(out) < 64:
        size = u32le(d, p + 4)
        name = tag(d, p)
        out.append(Field(f"{name}.size", p + 4, 4, False, length=True))
        if d[p : p + 4] == b"fmt " and p + 24 <= len(d):
            out += [
                Field("fmt.tag", p + 8, 2, False),
                Field("fmt.channels", p + 10, 2, False),
                Field("fmt.rate", p + 12, 4, False),
                Field("fmt.byte_rate", p + 16, 4, False),
                Field("fmt.block_align", p + 20, 2, False),
                Field("fmt.bits", p + 22, 2, False),
            ]
            if size >= 40 and p + 48 <= len(d):  # WAVE_FORMAT_EXTENSIBLE
                out += [
                    Field("fmt.cb_size", p + 24, 2, False, length=True),
                    Field("fmt.valid_bits", p + 26, 2, False),
                    Field("fmt.channel_mask", p + 28, 4, False),
                    Field("fmt.subformat", p + 32, 2, False),
                ]
        elif d[p : p + 4] == b"LIST" and d[p + 8 : p + 12] == b"INFO":  # metadata: FFmpeg allocates each tag's size
            q, end = p + 12, min(p + 8 + size, len(d))
            while q + 8 <= end and len(out) < 64:
                out.append(Field(f"LIST.{tag(d, q)}.size", q + 4, 4, False, length=True))
                q += 8 + u32le(d, q + 4) + (u32le(d, q + 4) & 1)
        p += 8 + size + (size & 1)
    return [f for f in out if f.offset + f.width <= len(d)]


def aiff_fields(d: bytes) -> tp.List[Field]:
    out = [Field("FORM.size", 4, 4, length=True)]
    p = 12
    while p + 8 <= len(d) and len(out) < 64:
        size = u32be(d, p + 4)
        name = tag(d, p)
        out.append(Field(f"{name}.size", p + 4, 4, length=True))
        if d[p : p + 4] == b"COMM":
            out += [
                Field("COMM.channels", p + 8, 2),
                Field("COMM.frames", p + 10, 4, length=True),
                Field("COMM.sample_size", p + 14, 2),
                Field("COMM.rate_exponent", p + 16, 2),
                Field("COMM.rate_mantissa", p + 18, 8),
            ]
            if size >= 22:
                out.append(Field("COMM.compression", p + 26, 4))
        elif d[p : p + 4] == b"SSND":
            out += [Field("SSND.offset", p + 8, 4, length=True), Field("SSND.block_size", p + 12, 4, length=True)]
        p += 8 + size + (size & 1)
    return [f for f in out if f.offset + f.width <= len(d)]


def flac_fields(d: bytes, rng: random.Random) -> tp.List[Field]:
    out: tp.List[Field] = []
    p = 4
    while p + 4 <= len(d) and len(out) < 64:
        header, length = d[p], int.from_bytes(d[p + 1 : p + 4], "big")
        out += [
            Field("block.type", p, 1, bits=7),
            Field("block.last", p, 1, shift=7, bits=1),
            Field("block.length", p + 1, 3, length=True),
        ]
        q = p + 4
        if header & 0x7F == 0 and q + 18 <= len(d):  # STREAMINFO
            out += [
                Field("STREAMINFO.min_block", q, 2),
                Field("STREAMINFO.max_block", q + 2, 2),
                Field("STREAMINFO.min_frame", q + 4, 3),
                Field("STREAMINFO.max_frame", q + 7, 3),
                Field("STREAMINFO.rate", q + 10, 8, shift=44, bits=20),
                Field("STREAMINFO.channels", q + 10, 8, shift=41, bits=3),
                Field("STREAMINFO.bps", q + 10, 8, shift=36, bits=5),
                Field("STREAMINFO.total_samples", q + 10, 8, bits=36, length=True),
            ]
        p = q + length
        if header & 0x80:
            break
    # frame headers: the first and one further on (their CRC-8 then fails unless the field is where
    # FFmpeg looks before the check; both paths are worth hitting)
    starts = [p] + [s for s in (d.find(b"\xff\xf8", rng.randrange(p, max(p + 1, len(d)))),) if s > 0]
    for s in starts:
        if s + 4 <= len(d) and d[s] == 0xFF and d[s + 1] & 0xFE == 0xF8:
            out += [
                Field("frame.block_size_code", s + 2, 1, shift=4, bits=4),
                Field("frame.rate_code", s + 2, 1, bits=4),
                Field("frame.channel_assignment", s + 3, 1, shift=4, bits=4),
                Field("frame.sample_size_code", s + 3, 1, shift=1, bits=3),
            ]
    return [f for f in out if f.offset + f.width <= len(d)]


MP4_CONTAINERS = {
    b"moov",
    b"trak",
    b"mdia",
    b"minf",
    b"stbl",
    b"edts",
    b"dinf",
    b"udta",
    b"mvex",
    b"moof",
    b"traf",
    b"ilst",
}


def mp4_boxes(d: bytes) -> tp.List[tp.Tuple[bytes, int, int, int]]:
    """Every box as (type, start, header length, size), walked recursively through the containers."""
    boxes: tp.List[tp.Tuple[bytes, int, int, int]] = []

    def walk(p: int, end: int, depth: int) -> None:
        while p + 8 <= end and depth < 10 and len(boxes) < 400:
            size, kind, head = u32be(d, p), d[p + 4 : p + 8], 8
            if size == 1 and p + 16 <= end:
                size, head = struct.unpack_from(">Q", d, p + 8)[0], 16
            elif size == 0:
                size = end - p
            if size < head:
                return
            boxes.append((kind, p, head, size))
            body, stop = p + head, min(p + size, end)
            if kind in MP4_CONTAINERS:
                walk(body, stop, depth + 1)
            elif kind == b"meta":
                walk(body + 4, stop, depth + 1)
            elif kind == b"stsd":
                walk(body + 8, stop, depth + 1)
            elif len(boxes) >= 2 and boxes[-2][0] == b"stsd" and kind not in (b"esds",):  # a sample entry
                walk(body + 28, stop, depth + 1)  # its children (esds, dfLa, dOps, alac...)
            p += size

    walk(0, len(d), 0)
    return boxes


def mp4_fields(d: bytes) -> tp.List[Field]:
    out: tp.List[Field] = []
    boxes = mp4_boxes(d)
    entry_after_stsd = False
    for kind, p, head, size in boxes:
        name, b = kind.decode("latin-1").replace(" ", "_"), p + head
        out.append(Field(f"{name}.size", p, 4, length=True))
        if head == 16:
            out.append(Field(f"{name}.largesize", p + 8, 8, length=True))
        if kind in (b"mvhd", b"mdhd") and b < len(d):
            if d[b] == 1:
                out += [Field(f"{name}.timescale", b + 20, 4), Field(f"{name}.duration", b + 24, 8, length=True)]
            else:
                out += [Field(f"{name}.timescale", b + 12, 4), Field(f"{name}.duration", b + 16, 4, length=True)]
        elif kind == b"stsd":
            out.append(Field("stsd.entries", b + 4, 4, length=True))
            entry_after_stsd = True
            continue
        elif entry_after_stsd:  # the audio sample entry
            out += [
                Field(f"{name}.version", b + 8, 2),
                Field(f"{name}.channels", b + 16, 2),
                Field(f"{name}.sample_size", b + 18, 2),
                Field(f"{name}.compression_id", b + 20, 2),
                Field(f"{name}.packet_size", b + 22, 2),
                Field(f"{name}.rate", b + 24, 4),
            ]
        elif kind in (b"stts", b"stsc", b"stco", b"co64", b"ctts", b"elst", b"stss"):
            out += [
                Field(f"{name}.entries", b + 4, 4, length=True),
                Field(f"{name}.entry0", b + 8, 4, length=True),
                Field(f"{name}.entry0b", b + 12, 4, length=True),
            ]
        elif kind == b"stsz":
            out += [
                Field("stsz.sample_size", b + 4, 4, length=True),
                Field("stsz.entries", b + 8, 4, length=True),
                Field("stsz.entry0", b + 12, 4, length=True),
            ]
        elif kind == b"hdlr":
            out.append(Field("hdlr.handler", b + 8, 4))
        elif kind == b"esds":
            out += esds_fields(d, b + 4, min(p + size, len(d)))
        entry_after_stsd = False
    return [f for f in out if f.offset + f.width <= len(d)]


def esds_fields(d: bytes, q: int, end: int) -> tp.List[Field]:
    """ES, DecoderConfig and DecoderSpecificInfo descriptors (the AAC AudioSpecificConfig)."""
    out: tp.List[Field] = []
    while q + 2 <= end and len(out) < 32:
        kind, r, length, n = d[q], q + 1, 0, 0
        while r < end and n < 4:
            length, r, n = (length << 7) | (d[r] & 0x7F), r + 1, n + 1
            if not d[r - 1] & 0x80:
                break
        out.append(Field(f"esds.tag{kind}.length", r - 1, 1, bits=7, length=True))
        if kind == 3:
            q = r + 3
        elif kind == 4:
            out += [
                Field("esds.object_type", r, 1),
                Field("esds.stream_type", r + 1, 1),
                Field("esds.buffer_size", r + 2, 3, length=True),
                Field("esds.max_bitrate", r + 5, 4),
                Field("esds.avg_bitrate", r + 9, 4),
            ]
            q = r + 13
        elif kind == 5:
            out += [
                Field("asc.object_type", r, 2, shift=11, bits=5),
                Field("asc.rate_index", r, 2, shift=7, bits=4),
                Field("asc.channel_config", r, 2, shift=3, bits=4),
            ]
            q = r + length
        else:
            q = r + max(length, 1)
    return out


def ogg_pages(d: tp.Union[bytes, bytearray]) -> tp.List[tp.Tuple[int, int]]:
    """(start, length) of each whole Ogg page, resynchronising on ``OggS`` after garbage."""
    pages, p = [], 0
    while p + 27 <= len(d):
        if d[p : p + 4] != b"OggS":
            p = d.find(b"OggS", p + 1)
            if p < 0:
                break
            continue
        nseg = d[p + 26]
        if p + 27 + nseg > len(d):
            break
        length = 27 + nseg + sum(d[p + 27 : p + 27 + nseg])
        if p + length > len(d):
            break
        pages.append((p, length))
        p += length
    return pages


def ogg_fields(d: bytes, rng: random.Random) -> tp.List[Field]:
    out: tp.List[Field] = []
    pages = ogg_pages(d)
    chosen = pages[:3] + (rng.sample(pages[3:], min(3, len(pages) - 3)) if len(pages) > 3 else [])
    for i, (p, _length) in enumerate(chosen):
        nseg = d[p + 26]
        out += [
            Field(f"page{i}.header_type", p + 5, 1),
            Field(f"page{i}.granule", p + 6, 8, False, length=True),
            Field(f"page{i}.serial", p + 14, 4, False),
            Field(f"page{i}.sequence", p + 18, 4, False),
            Field(f"page{i}.segments", p + 26, 1, length=True),
        ]
        if nseg:
            out.append(Field(f"page{i}.lacing", p + 27 + rng.randrange(nseg), 1, length=True))
    v = d.find(b"\x01vorbis")
    if v >= 0:
        out += [
            Field("vorbis.version", v + 7, 4, False),
            Field("vorbis.channels", v + 11, 1),
            Field("vorbis.rate", v + 12, 4, False),
            Field("vorbis.bitrate_nominal", v + 20, 4, False),
            Field("vorbis.blocksize0", v + 28, 1, bits=4),
            Field("vorbis.blocksize1", v + 28, 1, shift=4, bits=4),
            Field("vorbis.framing", v + 29, 1),
        ]
    c = d.find(b"\x03vorbis")
    if c >= 0:
        out.append(Field("vorbis.vendor_length", c + 7, 4, False, length=True))
    s = d.find(b"\x05vorbis")
    if s >= 0:
        out.append(Field("vorbis.codebooks", s + 7, 1, length=True))
    o = d.find(b"OpusHead")
    if o >= 0:
        out += [
            Field("opus.version", o + 8, 1),
            Field("opus.channels", o + 9, 1),
            Field("opus.preskip", o + 10, 2, False, length=True),
            Field("opus.rate", o + 12, 4, False),
            Field("opus.gain", o + 16, 2, False),
            Field("opus.mapping_family", o + 18, 1),
        ]
    t = d.find(b"OpusTags")
    if t >= 0:
        out.append(Field("opus.vendor_length", t + 8, 4, False, length=True))
    return [f for f in out if f.offset + f.width <= len(d)]


def mpeg_fields(d: bytes, rng: random.Random) -> tp.List[Field]:
    out: tp.List[Field] = []
    start = 0
    if d[:3] == b"ID3" and len(d) >= 10:
        out += [Field("id3.flags", 5, 1), Field("id3.size", 6, 4, length=True)]
        if len(d) >= 18:
            out.append(Field("id3.frame_size", 14, 4, length=True))
        start = 10 + ((d[6] & 0x7F) << 21 | (d[7] & 0x7F) << 14 | (d[8] & 0x7F) << 7 | d[9] & 0x7F)
    first = d.find(b"\xff", start)
    later = d.find(b"\xff", rng.randrange(first + 1, len(d))) if 0 <= first < len(d) - 1 else -1
    for name, s in (("frame0", first), ("frame", later)):
        if s >= 0 and s + 4 <= len(d) and d[s + 1] & 0xE0 == 0xE0:
            out += [
                Field(f"{name}.version", s, 4, shift=19, bits=2),
                Field(f"{name}.layer", s, 4, shift=17, bits=2),
                Field(f"{name}.bitrate", s, 4, shift=12, bits=4),
                Field(f"{name}.rate", s, 4, shift=10, bits=2),
                Field(f"{name}.padding", s, 4, shift=9, bits=1),
                Field(f"{name}.mode", s, 4, shift=6, bits=2),
            ]
    for marker in (b"Xing", b"Info"):
        x = d.find(marker)
        if x >= 0:
            out += [
                Field("xing.flags", x + 4, 4),
                Field("xing.frames", x + 8, 4, length=True),
                Field("xing.bytes", x + 12, 4, length=True),
            ]
            lame = d.find(b"LAME", x, x + 200)
            if lame >= 0:  # encoder delay / padding: 12 bits each, 21 bytes into the LAME tag
                out += [
                    Field("lame.delay", lame + 21, 3, shift=12, bits=12, length=True),
                    Field("lame.padding", lame + 21, 3, bits=12, length=True),
                ]
    return [f for f in out if f.offset + f.width <= len(d)]


def adts_fields(d: bytes, rng: random.Random) -> tp.List[Field]:
    frames, p = [], 0
    while p + 7 <= len(d) and d[p] == 0xFF and d[p + 1] & 0xF6 == 0xF0 and len(frames) < 2000:
        frames.append(p)
        length = ((d[p + 3] & 3) << 11) | (d[p + 4] << 3) | (d[p + 5] >> 5)
        if length < 7:
            break
        p += length
    out: tp.List[Field] = []
    for i, s in enumerate(frames[:1] + rng.sample(frames[1:], min(2, len(frames) - 1)) if frames else []):
        name = "adts0" if i == 0 else "adts"
        out += [
            Field(f"{name}.id", s, 7, shift=43, bits=1),
            Field(f"{name}.protection_absent", s, 7, shift=40, bits=1),
            Field(f"{name}.profile", s, 7, shift=38, bits=2),
            Field(f"{name}.rate_index", s, 7, shift=34, bits=4),
            Field(f"{name}.channel_config", s, 7, shift=30, bits=3),
            Field(f"{name}.frame_length", s, 7, shift=13, bits=13, length=True),
            Field(f"{name}.buffer_fullness", s, 7, shift=2, bits=11),
            Field(f"{name}.raw_blocks", s, 7, bits=2, length=True),
        ]
    return [f for f in out if f.offset + f.width <= len(d)]


# Matroska master elements (walked into) and the leaf elements worth corrupting by value.
EBML_MASTERS = {
    0x1A45DFA3,
    0x18538067,
    0x114D9B74,
    0x4DBB,
    0x1549A966,
    0x1654AE6B,
    0xAE,
    0xE1,
    0x1F43B675,
    0xA0,
    0x1C53BB6B,
    0xBB,
    0xB7,
    0x1254C367,
    0x7373,
    0x63C0,
    0x67C8,
    0x6D80,
    0x6240,
    0x5035,
}
EBML_NAMES = {
    0x1A45DFA3: "EBML",
    0x18538067: "Segment",
    0x114D9B74: "SeekHead",
    0x4DBB: "Seek",
    0x1549A966: "Info",
    0x1654AE6B: "Tracks",
    0xAE: "TrackEntry",
    0xE1: "Audio",
    0x1F43B675: "Cluster",
    0xA0: "BlockGroup",
    0xA1: "Block",
    0xA3: "SimpleBlock",
    0x1C53BB6B: "Cues",
    0xBB: "CuePoint",
    0x9F: "Channels",
    0xB5: "SamplingFrequency",
    0x6264: "BitDepth",
    0x2AD7B1: "TimecodeScale",
    0x4489: "Duration",
    0x86: "CodecID",
    0x63A2: "CodecPrivate",
    0xD7: "TrackNumber",
    0x83: "TrackType",
    0x56AA: "CodecDelay",
    0x56BB: "SeekPreRoll",
    0xE7: "Timecode",
    0x4282: "DocType",
    0x42F2: "EBMLMaxIDLength",
    0x42F3: "EBMLMaxSizeLength",
    0x1254C367: "Tags",
    0x7373: "Tag",
}


@dataclass
class Element:
    ident: int
    start: int
    size_at: int
    size_width: int
    body: int
    size: int  # -1: unknown
    parents: tp.List["Element"] = field(default_factory=list)


def ebml_elements(d: bytes) -> tp.List[Element]:
    found: tp.List[Element] = []

    def vint(p: int, keep_marker: bool) -> tp.Tuple[int, int]:
        first = d[p]
        if first == 0:
            raise ValueError("vint")
        width = 9 - first.bit_length()
        if p + width > len(d):
            raise ValueError("vint")
        raw = int.from_bytes(d[p : p + width], "big")
        return (raw if keep_marker else raw & ((1 << (7 * width)) - 1)), width

    def walk(p: int, end: int, parents: tp.List[Element]) -> None:
        while p < end and len(found) < 3000:
            try:
                ident, iw = vint(p, True)
                size, sw = vint(p + iw, False)
            except (ValueError, IndexError):
                return
            unknown = size == (1 << (7 * sw)) - 1
            element = Element(ident, p, p + iw, sw, p + iw + sw, -1 if unknown else size, parents)
            found.append(element)
            stop = end if unknown else min(element.body + size, end)
            if ident in EBML_MASTERS and len(parents) < 8:
                walk(element.body, stop, parents + [element])
            if unknown and ident not in EBML_MASTERS:
                return
            p = stop if not unknown else end

    walk(0, len(d), [])
    return found


def ebml_fields(d: bytes, rng: random.Random) -> tp.List[Field]:
    out: tp.List[Field] = []
    elements = ebml_elements(d)
    blocks = [e for e in elements if e.ident in (0xA3, 0xA1)]
    others = [e for e in elements if e.ident not in (0xA3, 0xA1)]
    for e in others + rng.sample(blocks, min(6, len(blocks))):
        name = EBML_NAMES.get(e.ident, f"0x{e.ident:X}")
        out.append(Field(f"{name}.size", e.size_at, e.size_width, bits=7 * e.size_width, length=True))
        n = max(e.size, 0)
        if e.ident in (0x9F, 0x6264, 0x2AD7B1, 0xD7, 0x83, 0x56AA, 0x56BB, 0xE7, 0x42F2, 0x42F3) and 0 < n <= 8:
            out.append(Field(name, e.body, n, length=e.ident == 0x2AD7B1))
        elif e.ident in (0xA3, 0xA1) and n >= 4:  # track number (1-byte vint), timecode, flags (lacing)
            out += [
                Field(f"{name}.track", e.body, 1, bits=7),
                Field(f"{name}.timecode", e.body + 1, 2),
                Field(f"{name}.lacing", e.body + 3, 1, shift=1, bits=2),
            ]
            if d[e.body + 3] & 0x06 and n >= 5:
                out.append(Field(f"{name}.lace_count", e.body + 4, 1, length=True))
    return [f for f in out if f.offset + f.width <= len(d)]


def fields_of(fmt: str, d: bytes, rng: random.Random) -> tp.List[Field]:
    """The header fields of ``d`` (which may already be mutated: parsers stop where it stops making sense)."""
    try:
        if d[:4] in (b"RIFF", b"RF64"):
            return wav_fields(d)
        if d[:4] == b"FORM":
            return aiff_fields(d)
        if d[:4] == b"fLaC":
            return flac_fields(d, rng)
        if d[4:8] == b"ftyp":
            return mp4_fields(d)
        if d[:4] == b"OggS":
            return ogg_fields(d, rng)
        if d[:4] == b"\x1a\x45\xdf\xa3":
            return ebml_fields(d, rng)
        if fmt == "aac" and d[:1] == b"\xff":
            return adts_fields(d, rng)
        return mpeg_fields(d, rng)
    except (IndexError, ValueError, struct.error):
        return []


# ------------------------------------------------------------------------------------- mutations


def edge_values(rng: random.Random, f: Field, old: int) -> int:
    top = (1 << f.nbits) - 1
    choices = [
        0,
        1,
        top,
        top >> 1,
        1 << (f.nbits - 1),
        (old + 1) & top,
        (old - 1) & top,
        (old * 2) & top,
        old >> 1,
        rng.randrange(top + 1),
        rng.randrange(2, 17) & top,
    ]
    return rng.choice(choices)


def huge_values(rng: random.Random, f: Field, old: int, size: int) -> int:
    top = (1 << f.nbits) - 1
    return rng.choice(
        [
            top,
            top - 1,
            top >> 1,
            1 << (f.nbits - 1),
            min(top, size * 1000),
            min(top, size + 1),
            min(top, old * 1000 + 7),
        ]
    )


def span(rng: random.Random, limit: int) -> int:
    """A chunk length from 1 to ``limit``, log-uniform: as many short chunks as long ones."""
    return max(1, min(limit, int(math.exp(rng.uniform(0, math.log(max(limit, 2)))))))


def low(rng: random.Random, d: bytearray) -> int:
    return PROTECT if rng.random() < 0.9 and len(d) > PROTECT + 1 else 0


Seeds = tp.Dict[str, tp.List[Seed]]
Mutated = tp.Tuple[bytearray, str]  # the new bytes, and what was done (for the report and --replay)
Mutation = tp.Callable[[random.Random, bytearray, str, Seeds], Mutated]


def bitflip(rng: random.Random, d: bytearray, fmt: str, seeds: Seeds) -> Mutated:
    lo, n = low(rng, d), rng.randint(1, 16)
    for _ in range(n):
        p = rng.randrange(lo, len(d))
        d[p] ^= 1 << rng.randrange(8)
    return d, f"bitflip(x{n})"


def overwrite(rng: random.Random, d: bytearray, fmt: str, seeds: Seeds) -> Mutated:
    lo, n = low(rng, d), rng.randint(1, 32)
    special = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE]
    for _ in range(n):
        d[rng.randrange(lo, len(d))] = rng.choice(special) if rng.random() < 0.5 else rng.randrange(256)
    return d, f"overwrite(x{n})"


def truncate(rng: random.Random, d: bytearray, fmt: str, seeds: Seeds) -> Mutated:
    cut = rng.randrange(max(1, low(rng, d)), len(d))
    return d[:cut], f"truncate(@{cut}/{len(d)})"


def duplicate(rng: random.Random, d: bytearray, fmt: str, seeds: Seeds) -> Mutated:
    lo = low(rng, d)
    n = span(rng, max(1, (len(d) - lo) // 3))
    a = rng.randrange(lo, max(lo + 1, len(d) - n))
    b = rng.randrange(lo, len(d) + 1)
    times = rng.choice([1, 1, 1, 2, 8])
    return d[:b] + d[a : a + n] * times + d[b:], f"duplicate({n}B@{a}->@{b} x{times})"


def delete(rng: random.Random, d: bytearray, fmt: str, seeds: Seeds) -> Mutated:
    lo = low(rng, d)
    n = span(rng, max(1, (len(d) - lo) // 3))
    a = rng.randrange(lo, max(lo + 1, len(d) - n))
    return d[:a] + d[a + n :], f"delete({n}B@{a})"


def shuffle(rng: random.Random, d: bytearray, fmt: str, seeds: Seeds) -> Mutated:
    lo = low(rng, d)
    k = rng.randint(2, 8)
    region = len(d) - lo
    if rng.random() < 0.5:  # a short region: the header's neighbourhood
        region = min(region, span(rng, region))
    cuts = sorted(rng.sample(range(1, region), min(k - 1, region - 1))) if region > 2 else []
    bounds = [lo] + [lo + c for c in cuts] + [lo + region]
    pieces = [d[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]
    rng.shuffle(pieces)
    return d[:lo] + b"".join(pieces) + d[lo + region :], f"shuffle({len(pieces)} pieces of {region}B@{lo})"


def header_field(rng: random.Random, d: bytearray, fmt: str, seeds: Seeds) -> Mutated:
    fields = fields_of(fmt, bytes(d), rng)
    if not fields:
        return overwrite(rng, d, fmt, seeds)
    f = rng.choice(fields)
    old = f.get(d)
    new = edge_values(rng, f, old)
    f.set(d, new)
    return d, f"field({f.name}@{f.offset}: {old}->{new})"


def huge_length(rng: random.Random, d: bytearray, fmt: str, seeds: Seeds) -> Mutated:
    fields = sorted((f for f in fields_of(fmt, bytes(d), rng) if f.length), key=lambda f: f.offset)
    inner = rng.choice(fields) if fields else None
    before = [f for f in fields if inner is not None and f.offset < inner.offset]
    if before and rng.random() < 0.4:
        # two at once: a size inside a container is only believed up to the container's own size
        # (RIFF LIST/INFO, MP4 boxes, EBML masters), so both must be huge to reach the inner one; the
        # nearest length field before it is most often its container
        outer = before[-1] if rng.random() < 0.6 else rng.choice(before)
        pair = [outer, inner]
        done = []
        for f in pair:
            old = f.get(d)
            new = huge_values(rng, f, old, len(d))
            f.set(d, new)
            done.append(f"{f.name}@{f.offset}: {old}->{new}")
        return d, f"huge({'; '.join(done)})"
    if fields and rng.random() < 0.8:
        f = rng.choice(fields)
        old = f.get(d)
        new = huge_values(rng, f, old, len(d))
        f.set(d, new)
        return d, f"huge({f.name}@{f.offset}: {old}->{new})"
    # no structure known (or the remaining 20%): a huge number inserted or written anywhere
    value = rng.choice(
        [
            b"\xff\xff\xff\xff",
            b"\x7f\xff\xff\xff",
            b"\x80\x00\x00\x00",
            b"\xff" * 8,
            b"\x01\xff\xff\xff\xff\xff\xff\xff",
            struct.pack(">I", len(d) * 1000),
            struct.pack("<I", len(d) * 1000),
        ]
    )
    p = rng.randrange(low(rng, d), len(d))
    if rng.random() < 0.5:
        return d[:p] + value + d[p:], f"huge(insert {value.hex()}@{p})"
    d[p : p + len(value)] = value
    return d, f"huge(write {value.hex()}@{p})"


WAV_TAGS = [
    0x0001,
    0x0002,
    0x0003,
    0x0006,
    0x0007,
    0x0011,
    0x0022,
    0x0031,
    0x0040,
    0x0045,
    0x0050,
    0x0055,
    0x0061,
    0x0062,
    0x0069,
    0x0092,
    0x00FF,
    0x0130,
    0x0160,
    0x0161,
    0x0162,
    0x0163,
    0x0200,
    0x0270,
    0x028F,
    0x0401,
    0x1600,
    0x2000,
    0x2001,
    0x6750,
    0xF1AC,
    0xFFFE,
]
MP4_ENTRIES = [
    b"mp4a",
    b"alac",
    b"ac-3",
    b"ec-3",
    b"Opus",
    b"fLaC",
    b"samr",
    b"sawb",
    b"sowt",
    b"twos",
    b"ima4",
    b"ulaw",
    b"alaw",
    b"lpcm",
    b"in24",
    b"fl32",
    b".mp3",
    b"QDM2",
    b"QDMC",
    b"dtsc",
    b"mlpa",
    b"raw ",
    b"Qclp",
    b"agsm",
    b"spex",
    b"MAC3",
]
AIFC_TYPES = [
    b"NONE",
    b"sowt",
    b"fl32",
    b"fl64",
    b"alaw",
    b"ulaw",
    b"ALAW",
    b"ULAW",
    b"ima4",
    b"MAC3",
    b"MAC6",
    b"QDM2",
    b"QDMC",
    b"QclP",
    b"GSM ",
    b"in24",
    b"in32",
    b"twos",
    b"raw ",
    b"G722",
]
MKV_CODECS = [
    b"A_AAC",
    b"A_AC3",
    b"A_EAC3",
    b"A_DTS",
    b"A_FLAC",
    b"A_ALAC",
    b"A_TTA1",
    b"A_OPUS",
    b"A_MLP",
    b"A_VORBIS",
    b"A_MPEG/L3",
    b"A_MPEG/L2",
    b"A_TRUEHD",
    b"A_PCM/INT/LIT",
    b"A_PCM/INT/BIG",
    b"A_PCM/FLOAT/IEEE",
    b"A_MS/ACM",
    b"A_REAL/COOK",
    b"A_REAL/ATRC",
    b"A_REAL/28_8",
    b"A_QUICKTIME/QDM2",
    b"A_WAVPACK4",
    b"A_ATRAC/AT1",
    b"A_AAC/MPEG4/LC/SBR",
]


def codec_swap(rng: random.Random, d: bytearray, fmt: str, seeds: Seeds) -> Mutated:
    """Another codec's tag in the same container: FFmpeg then hands this data to that decoder."""
    data = bytes(d)
    try:
        if data[:4] == b"RIFF":
            fields = {f.name: f for f in wav_fields(data)}
            if "fmt.tag" in fields:
                new = rng.choice(WAV_TAGS)
                target = (
                    fields["fmt.subformat"] if "fmt.subformat" in fields and rng.random() < 0.5 else fields["fmt.tag"]
                )
                target.set(d, new)
                return d, f"codec({target.name} -> 0x{new:04X})"
        elif data[:4] == b"FORM":
            return aifc(rng, d)
        elif data[4:8] == b"ftyp":
            boxes = mp4_boxes(data)
            for i, (kind, _p, _head, _size) in enumerate(boxes[:-1]):
                if kind == b"stsd":
                    entry = boxes[i + 1]
                    new = rng.choice(MP4_ENTRIES)
                    d[entry[1] + 4 : entry[1] + 8] = new
                    return d, f"codec(stsd entry {entry[0].decode('latin-1')} -> {new.decode()})"
        elif data[:4] == b"\x1a\x45\xdf\xa3":
            for e in ebml_elements(data):
                if e.ident == 0x86 and e.size > 0:
                    return ebml_replace(d, e, rng.choice(MKV_CODECS), "CodecID")
    except (IndexError, ValueError, struct.error):
        pass
    return header_field(rng, d, fmt, seeds)


def aifc(rng: random.Random, d: bytearray) -> tp.Tuple[bytearray, str]:
    """AIFF -> AIFC with a compression type (the COMM chunk grows by the type and an empty name)."""
    new = rng.choice(AIFC_TYPES)
    p = 12
    while p + 8 <= len(d):
        size = u32be(d, p + 4)
        if d[p : p + 4] == b"COMM":
            if d[8:12] == b"AIFC" and size >= 22:
                d[p + 26 : p + 30] = new
                return d, f"codec(AIFC compression -> {new.decode()})"
            if size >= 18:
                body = bytes(d[p + 8 : p + 26]) + new + b"\x00\x00"
                rest = d[p + 8 + size + (size & 1) :]
                out = d[:p] + b"COMM" + struct.pack(">I", len(body)) + body + rest
                out[8:12] = b"AIFC"
                struct.pack_into(">I", out, 4, max(0, len(out) - 8))
                return out, f"codec(AIFF -> AIFC {new.decode()})"
        p += 8 + size + (size & 1)
    return d, "codec(no COMM chunk)"


def ebml_replace(d: bytearray, e: Element, payload: bytes, name: str) -> tp.Tuple[bytearray, str]:
    """Replace an element's payload, growing or shrinking every sized ancestor with it (where the size
    still fits its field): the file stays well formed, only the value changed."""
    delta = len(payload) - e.size
    out = d[: e.body] + payload + d[e.body + e.size :]
    for holder in [e] + e.parents:
        if holder.size < 0:
            continue
        value = len(payload) if holder is e else holder.size + delta
        if 0 <= value < (1 << (7 * holder.size_width)) - 1:
            f = Field("size", holder.size_at, holder.size_width, bits=7 * holder.size_width)
            f.set(out, value)
    return out, f"codec({name} {bytes(d[e.body : e.body + e.size]).decode('latin-1')} -> {payload.decode()})"


def splice(rng: random.Random, d: bytearray, fmt: str, seeds: Seeds) -> Mutated:
    same = rng.random() < 0.5
    other = rng.choice(seeds[fmt] if same else [s for f in FORMATS for s in seeds[f]])
    a = rng.randrange(max(1, low(rng, d)), len(d))
    b = rng.randrange(0, len(other.data))
    return d[:a] + other.data[b:], f"splice(@{a} + {other.name}@{b})"


# (name, mutation, weight): codec swaps weigh more than their share of the formats they apply to,
# since they reach decoders that plain files of the accepted formats never do.
MUTATIONS: tp.List[tp.Tuple[str, Mutation, int]] = [
    ("bitflip", bitflip, 14),
    ("overwrite", overwrite, 14),
    ("truncate", truncate, 10),
    ("duplicate", duplicate, 8),
    ("delete", delete, 7),
    ("shuffle", shuffle, 6),
    ("field", header_field, 18),
    ("huge", huge_length, 10),
    ("codec", codec_swap, 8),
    ("splice", splice, 5),
]

_OGG_CRC: tp.List[int] = []


def ogg_fix_crcs(d: bytearray) -> int:
    """Recompute every whole page's CRC (FFmpeg drops a page whose CRC is wrong); the pages fixed."""
    if not _OGG_CRC:
        for i in range(256):
            r = i << 24
            for _ in range(8):
                r = ((r << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if r & 0x80000000 else (r << 1) & 0xFFFFFFFF
            _OGG_CRC.append(r)
    pages = ogg_pages(d)
    for p, length in pages:
        d[p + 22 : p + 26] = b"\x00\x00\x00\x00"
        crc = 0
        for byte in bytes(d[p : p + length]):
            crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[((crc >> 24) ^ byte) & 0xFF]
        struct.pack_into("<I", d, p + 22, crc)
    return len(pages)


@dataclass
class Input:
    index: int
    fmt: str
    seed: str
    mutations: tp.List[str]
    data: bytes


def make_input(index: int, seed_value: int, seeds: tp.Dict[str, tp.List[Seed]]) -> Input:
    """Input ``index``: its own generator, so any one can be rebuilt alone (``--replay``)."""
    rng = random.Random(f"{seed_value}/{index}")
    fmt = FORMATS[index % len(FORMATS)]
    seed = rng.choice(seeds[fmt])
    d = bytearray(seed.data)
    names, weights = [m[1] for m in MUTATIONS], [m[2] for m in MUTATIONS]
    steps: tp.List[str] = []
    for _ in range(rng.choices([1, 2, 3], [60, 25, 15])[0]):
        if not d:
            break
        mutate = rng.choices(names, weights)[0]
        d, what = mutate(rng, d, fmt, seeds)
        steps.append(what)
    if fmt in OGG_LIKE and d[:4] == b"OggS" and rng.random() < 0.75:
        steps.append(f"ogg-crc-fixed({ogg_fix_crcs(d)} pages)")
    return Input(index, fmt, seed.name, steps, bytes(d))


# ------------------------------------------------------------------------------------- the child


def rss_kb(field_name: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def decode_once(path: Path) -> tp.Tuple[int, tp.Dict[str, tp.Any]]:
    """What the service does with ``input_audio``: the exit code and what to report."""
    from musicgen_service.audio import input_audio as audio_in
    from musicgen_service.core.errors import InputError

    try:
        clip = audio_in.load(path, sample_rate=SAMPLE_RATE, channels=CHANNELS)
        return EXIT_DECODED, {"seconds": round(clip.seconds, 3)}
    except InputError as exc:
        return EXIT_REFUSED, {"message": str(exc)[:400]}
    except BaseException as exc:
        frames = traceback.extract_tb(exc.__traceback__)[-3:]
        return EXIT_EXCEPTION, {
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": str(exc)[:400],
            "where": [f"{Path(fr.filename).name}:{fr.lineno} {fr.name}" for fr in frames],
        }


def child(path: Path, write_fd: int, timeout: float, mem_limit: int) -> tp.NoReturn:
    """In the forked child: report the resident set, decode, report, exit with the outcome's code.
    ``os._exit``: no atexit handlers, no flushing of the parent's buffers, no torch teardown."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # FFmpeg's own log lines: not ours to print 2,000 times
        os.dup2(devnull, 2)
        report = os.fdopen(write_fd, "w", buffering=1)
        # On a fatal signal, the Python stack (which PyAV call) goes to the parent; on a hang, the
        # stack shortly before the parent's SIGKILL.
        faulthandler.enable(file=report, all_threads=True)
        faulthandler.dump_traceback_later(timeout * 0.8, file=report)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if mem_limit:
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
        report.write(json.dumps({"start_rss_kb": rss_kb()}) + "\n")
        report.flush()
        code, info = decode_once(path)
        faulthandler.cancel_dump_traceback_later()
        report.write(json.dumps(info) + "\n")
        report.flush()
        os._exit(code)
    except BaseException as exc:
        try:
            os.write(
                write_fd,
                (
                    json.dumps(
                        {"type": f"outside the decode: {type(exc).__name__}", "message": str(exc)[:400], "where": []}
                    )
                    + "\n"
                ).encode(),
            )
        finally:
            os._exit(3)


# ------------------------------------------------------------------------------------ the parent


@dataclass
class Job:
    item: Input
    path: Path
    read_fd: int
    started: float
    parent_rss_kb: int
    chunks: tp.List[bytes] = field(default_factory=list)
    killed: bool = False


@dataclass
class Result:
    index: int
    fmt: str
    seed: str
    mutations: tp.List[str]
    size: int
    outcome: str
    wall_s: float
    cpu_s: float
    extra_mb: float
    detail: tp.Dict[str, tp.Any]
    start_rss_mb: float
    parent_rss_mb: float
    signal: tp.Optional[str] = None
    trace: str = ""
    saved: tp.Optional[str] = None


def drain(fd: int, job: Job) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        job.chunks.append(chunk)


def finish(job: Job, status: int, usage: tp.Any, crash_dir: Path, label: str) -> Result:
    drain(job.read_fd, job)
    os.close(job.read_fd)
    wall = time.perf_counter() - job.started
    text = b"".join(job.chunks).decode("utf-8", "replace")
    start_rss, detail, trace = None, {}, []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                trace.append(line)
                continue
            if "start_rss_kb" in value and start_rss is None:
                start_rss = value["start_rss_kb"]
            else:
                detail = value
        elif not line.startswith("Extension modules:"):  # faulthandler's list of every loaded module
            trace.append(line)
    baseline = start_rss if start_rss else job.parent_rss_kb
    extra = max(0.0, (usage.ru_maxrss - baseline) / 1024)
    sig = None
    if os.WIFSIGNALED(status):
        outcome = "hang" if job.killed else "crash"
        sig = signal.Signals(os.WTERMSIG(status)).name
    else:
        code = os.WEXITSTATUS(status)
        outcome = {EXIT_DECODED: "decoded", EXIT_REFUSED: "refused", EXIT_EXCEPTION: "exception"}.get(code, "exception")
        if code not in (EXIT_DECODED, EXIT_REFUSED, EXIT_EXCEPTION) and "type" not in detail:
            detail = {"type": f"exit code {code}", "message": "the child failed outside the decode", "where": []}
    item = job.item
    result = Result(
        item.index,
        item.fmt,
        item.seed,
        item.mutations,
        len(item.data),
        outcome,
        round(wall, 4),
        round(usage.ru_utime + usage.ru_stime, 4),
        round(extra, 1),
        detail,
        round(baseline / 1024, 1),
        round(job.parent_rss_kb / 1024, 1),
        sig,
        "\n".join(trace)[:6000],
    )
    if outcome in ("crash", "hang", "exception"):
        crash_dir.mkdir(parents=True, exist_ok=True)
        kind = {"crash": f"crash-{sig}", "hang": "hang", "exception": "exception"}[outcome]
        saved = crash_dir / f"{kind}-{label}{item.index:05d}-{item.fmt}.{item.fmt}"
        saved.write_bytes(item.data)
        saved.with_suffix(saved.suffix + ".txt").write_text(
            json.dumps(
                {
                    "index": item.index,
                    "format": item.fmt,
                    "seed_file": item.seed,
                    "mutations": item.mutations,
                    "outcome": outcome,
                    "signal": sig,
                    "detail": detail,
                    "trace": result.trace,
                },
                indent=2,
            )
            + "\n"
        )
        result.saved = str(saved.relative_to(ROOT) if saved.is_relative_to(ROOT) else saved)
    try:
        job.path.unlink()
    except OSError:
        pass
    return result


def run_all(
    items: tp.Iterable[Input],
    total: int,
    jobs: int,
    timeout: float,
    mem_limit: int,
    tmp: Path,
    crash_dir: Path,
    label: str,
) -> tp.List[Result]:
    """A pool of at most ``jobs`` forked children; the parent polls ``wait4`` and kills overdue ones.
    Kept inputs are named ``<outcome>-<label><index>-<format>`` (the label: the generator's seed)."""
    tmp.mkdir(parents=True, exist_ok=True)
    pending = iter(items)
    running: tp.Dict[int, Job] = {}
    results: tp.List[Result] = []
    exhausted = False
    last_log = time.perf_counter()
    while running or not exhausted:
        while not exhausted and len(running) < jobs:
            item = next(pending, None)
            if item is None:
                exhausted = True
                break
            path = tmp / f"input-{item.index:05d}.{item.fmt}"
            path.write_bytes(item.data)
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(read_fd, False)
            parent_rss = rss_kb()
            started = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                for other in running.values():
                    os.close(other.read_fd)
                child(path, write_fd, timeout, mem_limit)
            os.close(write_fd)
            running[pid] = Job(item, path, read_fd, started, parent_rss)
        now = time.perf_counter()
        for job_pid, job in running.items():
            drain(job.read_fd, job)  # a child's report never fills its pipe
            if not job.killed and now - job.started > timeout:
                os.kill(job_pid, signal.SIGKILL)
                job.killed = True
        pid, status, usage = os.wait4(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.002)
            continue
        results.append(finish(running.pop(pid), status, usage, crash_dir, label))
        last = results[-1]
        if last.outcome in ("crash", "hang", "exception"):
            log(
                f"#{last.index} {last.fmt}: {last.outcome} {last.signal or last.detail.get('type', '')} "
                f"({'; '.join(last.mutations)})"
            )
        if time.perf_counter() - last_log > 15:
            log(f"{len(results)}/{total} inputs")
            last_log = time.perf_counter()
    return results


# ---------------------------------------------------------------------------------------- report


def p99(values: tp.List[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def summarize(rows: tp.List[Result]) -> tp.Dict[str, tp.Any]:
    counts = {outcome: sum(r.outcome == outcome for r in rows) for outcome in OUTCOMES}
    signals: tp.Dict[str, int] = {}
    for r in rows:
        if r.signal and r.outcome == "crash":
            signals[r.signal] = signals.get(r.signal, 0) + 1
    walls, extras = [r.wall_s for r in rows], [r.extra_mb for r in rows]
    return {
        "inputs": len(rows),
        **counts,
        "crash_signals": signals,
        "max_s": max(walls, default=0.0),
        "p99_s": p99(walls),
        "max_cpu_s": max((r.cpu_s for r in rows), default=0.0),
        "max_extra_mb": max(extras, default=0.0),
        "p99_extra_mb": p99(extras),
    }


def median(values: tp.List[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def reason(message: str) -> str:
    """A refusal's rule without its numbers and long lists: refusals grouped by kind."""
    from musicgen_service.audio.input_audio import EXPECTED

    text = message.split(": ", 1)[-1].replace(EXPECTED, "...")
    text = re.sub(r"\d+(\.\d+)?", "#", text)
    return text[:110]


def code_version() -> tp.Dict[str, tp.Any]:
    """Which ``audio_in`` the children run: its hash, and the git commit with whether the service's code
    differs from it (read before the import: children run what the parent imported, whatever changes
    on disk during the run)."""
    info: tp.Dict[str, tp.Any] = {
        "audio_in_sha256": hashlib.sha256(
            (ROOT / "musicgen_service" / "audio" / "input_audio.py").read_bytes()
        ).hexdigest()[:16]
    }
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        changed = (
            subprocess.run(
                ["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "musicgen_service"],
                capture_output=True,
                timeout=30,
            ).returncode
            != 0
        )
        if head:
            info.update(git_head=head, musicgen_service_modified=changed)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine() -> tp.Dict[str, tp.Any]:
    import platform

    import av

    from musicgen_service.core.machine import cpu_flags

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    relevant = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")
    versions = {name: ".".join(map(str, v)) for name, v in av.library_versions.items()}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in relevant if f in cpu_flags()],
        "python": platform.python_version(),
        "pyav": av.__version__,
        "ffmpeg_libraries": versions,
        "ffmpeg": getattr(av, "ffmpeg_version_info", None),
    }


def report(
    results: tp.List[Result],
    seeds_results: tp.List[Result],
    seeds: tp.Dict[str, tp.List[Seed]],
    args: argparse.Namespace,
    elapsed: float,
    mem_limit: int,
    code: tp.Dict[str, tp.Any],
) -> tp.Dict[str, tp.Any]:
    by_format = {fmt: summarize([r for r in results if r.fmt == fmt]) for fmt in FORMATS}
    for fmt, row in by_format.items():  # what decoding the real files themselves adds (see the docstring)
        row["seed_max_extra_mb"] = max((r.extra_mb for r in seeds_results if r.fmt == fmt), default=0.0)
    by_mutation = {}
    for name, _fn, _w in MUTATIONS:
        rows = [r for r in results if any(m.startswith(name + "(") for m in r.mutations)]
        by_mutation[name] = summarize(rows)
    reasons: tp.Dict[str, int] = {}
    for r in results:
        if r.outcome == "refused":
            key = reason(r.detail.get("message", ""))
            reasons[key] = reasons.get(key, 0) + 1
    findings = [r.__dict__ for r in results + seeds_results if r.outcome in ("crash", "hang", "exception")]
    distinct: tp.Dict[str, tp.Dict[str, tp.Any]] = {}
    for r in results + seeds_results:
        if r.outcome == "exception":
            key = f"{r.detail.get('type')}: {re.sub(r'[0-9]+', '#', r.detail.get('message', ''))[:160]}"
            entry = distinct.setdefault(
                key,
                {
                    "count": 0,
                    "first_index": r.index,
                    "where": r.detail.get("where"),
                    "saved": r.saved,
                    "mutations": r.mutations,
                },
            )
            entry["count"] += 1
    slowest = sorted(results, key=lambda r: -r.wall_s)[:5]
    heaviest = sorted(results, key=lambda r: -r.extra_mb)[:5]
    brief = lambda r: {
        "index": r.index,
        "format": r.fmt,
        "seed_file": r.seed,
        "mutations": r.mutations,
        "outcome": r.outcome,
        "wall_s": r.wall_s,
        "cpu_s": r.cpu_s,
        "extra_mb": r.extra_mb,
        "size": r.size,
    }
    return {
        "what": "malformed input_audio files decoded by musicgen_service.audio.input_audio.load, one forked child each",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + [str(a) for a in sys.argv]),
        "machine": machine(),
        "code": code,
        "settings": {
            "seed": args.seed,
            "count": len(results),
            "jobs": args.jobs,
            "timeout_s": args.timeout,
            "child_address_space_limit_mb": round(mem_limit / 2**20),
            "sample_rate": SAMPLE_RATE,
            "channels": CHANNELS,
            "elapsed_s": round(elapsed, 1),
            "median_parent_rss_mb": median([r.parent_rss_mb for r in results]),
            "median_child_start_rss_mb": median([r.start_rss_mb for r in results]),
        },
        "seeds": {
            "files": {
                s.name: {"bytes": len(s.data), "sha256": hashlib.sha256(s.data).hexdigest()[:16]}
                for fmt in FORMATS
                for s in seeds[fmt]
            },
            "decoded": sum(r.outcome == "decoded" for r in seeds_results),
            "count": len(seeds_results),
        },
        "total": summarize(results),
        "by_format": by_format,
        "by_mutation": by_mutation,
        "refusal_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:15]),
        "other_exceptions": distinct,
        "findings": findings,
        "slowest": [brief(r) for r in slowest],
        "most_memory": [brief(r) for r in heaviest],
    }


def markdown(rep: tp.Dict[str, tp.Any]) -> str:
    m, s = rep["machine"], rep["settings"]
    head = (
        "| format | inputs | decoded | refused | other exceptions | crashes (signal) | hangs | max s | p99 s "
        "| max extra MB | p99 extra MB | seeds' max extra MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )

    def row(name: str, x: tp.Dict[str, tp.Any]) -> str:
        crashes = str(x["crash"]) + (
            " (" + ", ".join(f"{k} {v}" for k, v in x["crash_signals"].items()) + ")" if x["crash_signals"] else ""
        )
        seeds_extra = f"{x['seed_max_extra_mb']:.1f}" if "seed_max_extra_mb" in x else ""
        return (
            f"| {name} | {x['inputs']} | {x['decoded']} | {x['refused']} | {x['exception']} | {crashes} "
            f"| {x['hang']} | {x['max_s']:.3f} | {x['p99_s']:.3f} | {x['max_extra_mb']:.1f} | {x['p99_extra_mb']:.1f} "
            f"| {seeds_extra} |\n"
        )

    lines = [
        "# Decoder fuzz: malformed input_audio through audio_in.load\n\n",
        f"`{rep['command']}` on {rep['date']}, "
        + (
            f"commit {rep['code']['git_head']}"
            + (" with changes to musicgen_service/" if rep["code"]["musicgen_service_modified"] else "")
            + ", "
            if rep["code"].get("git_head")
            else ""
        )
        + f"audio_in.py sha256 {rep['code']['audio_in_sha256']}.\n\n",
        f"Machine: {m['cpu']}, {m['cores']} cores, flags {', '.join(m['cpu_flags']) or 'none'}; "
        f"Python {m['python']}, PyAV {m['pyav']}, FFmpeg libraries "
        + ", ".join(f"{k} {v}" for k, v in m["ffmpeg_libraries"].items())
        + (f" (FFmpeg {m['ffmpeg']})" if m.get("ffmpeg") else "")
        + ".\n\n",
        f"Seed {s['seed']}, {s['count']} mutated inputs, {s['jobs']} children at a time, timeout "
        f"{s['timeout_s']} s, child address space limit {s['child_address_space_limit_mb']} MB, "
        f"{s['elapsed_s']} s in all. Seeds: {rep['seeds']['decoded']} of {rep['seeds']['count']} real files "
        "decoded unmutated. Time: fork to reap. Extra MB: the child's peak RSS less its RSS right after the "
        f"fork (median {s['median_child_start_rss_mb']:.0f} MB; the parent's: {s['median_parent_rss_mb']:.0f} MB), "
        "which includes the decoder's code and tables paged in: the unmutated seeds' own figure is the "
        "baseline to compare with.\n\n",
        "## By format\n\n",
        head,
    ]
    lines += [row(fmt, x) for fmt, x in rep["by_format"].items()]
    lines.append(row("**all**", rep["total"]))
    lines += ["\n## By mutation (inputs with that mutation among theirs)\n\n", head.replace("| format", "| mutation")]
    lines += [row(name, x) for name, x in rep["by_mutation"].items()]
    lines.append("\n## Most common refusals\n\n| count | InputError rule (numbers as #) |\n|---|---|\n")
    lines += [f"| {n} | {text.replace('|', '/')} |\n" for text, n in rep["refusal_reasons"].items()]
    lines.append("\n## Other exceptions (bugs)\n\n")
    if rep["other_exceptions"]:
        lines += [
            f"- `{k}` x{v['count']}, first input #{v['first_index']} ({'; '.join(v['mutations'])}, kept as "
            f"`{v['saved']}`), at {' > '.join(v['where'] or [])}\n"
            for k, v in rep["other_exceptions"].items()
        ]
    else:
        lines.append("None.\n")
    lines.append("\n## Crashes and hangs\n\n")
    bad = [f for f in rep["findings"] if f["outcome"] in ("crash", "hang")]
    if bad:
        lines += [
            f"- #{f['index']} {f['fmt']} from {f['seed']}: {f['outcome']} {f['signal'] or ''} "
            f"({'; '.join(f['mutations'])}), kept as `{f['saved']}`\n"
            for f in bad
        ]
    else:
        lines.append("None.\n")
    lines.append(
        "\n## Slowest and most memory\n\n| input | format | mutations | outcome | s | cpu s | extra MB |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    for r in rep["slowest"] + rep["most_memory"]:
        lines.append(
            f"| #{r['index']} | {r['format']} | {'; '.join(r['mutations']).replace('|', '/')} | {r['outcome']} "
            f"| {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r['extra_mb']:.1f} |\n"
        )
    return "".join(lines)


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2400, help="mutated inputs (spread over the formats)")
    parser.add_argument("--quick", type=int, default=None, metavar="N", help="smoke run: N inputs")
    parser.add_argument("--seed", type=int, default=26)
    parser.add_argument("--jobs", type=int, default=2, help="children at a time")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a child counts as a hang")
    parser.add_argument(
        "--mem-headroom-mb",
        type=int,
        default=4096,
        help="a child's address space limit above the parent's size (0: none)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results path without suffix (default bench/results/fuzz; with --quick bench/work/fuzz-quick)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument(
        "--replay",
        type=int,
        default=None,
        metavar="I",
        help="rebuild input I, save it under <work>/fuzz-replay/ and decode it in this process",
    )
    args = parser.parse_args()
    count = args.quick if args.quick is not None else args.count
    out = args.out or (args.work / "fuzz-quick" if args.quick is not None else ROOT / "bench" / "results" / "fuzz")

    code = code_version()
    # Everything a decode needs, imported once here so that every child starts with it (fork).
    import av  # noqa: F401
    import torch  # noqa: F401
    from audiocraft.data import audio_utils  # noqa: F401  (audio_in imports it per frame)

    from musicgen_service.audio import input_audio as audio_in  # noqa: F401

    seeds = write_seeds(args.work / "fuzz-seeds")
    if args.replay is not None:
        item = make_input(args.replay, args.seed, seeds)
        folder = args.work / "fuzz-replay"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"input-{item.index:05d}.{item.fmt}"
        path.write_bytes(item.data)
        print(
            json.dumps(
                {
                    "index": item.index,
                    "format": item.fmt,
                    "seed_file": item.seed,
                    "mutations": item.mutations,
                    "path": str(path),
                },
                indent=2,
            ),
            flush=True,
        )
        code, info = decode_once(path)
        print(json.dumps({"outcome": {0: "decoded", 1: "refused", 2: "exception"}[code], **info}, indent=2))
        return 0

    mem_limit = (rss_kb("VmSize") * 1024 + args.mem_headroom_mb * 2**20) if args.mem_headroom_mb else 0
    crash_dir, tmp = args.work / "fuzz-crashes", args.work / f"fuzz-tmp-{os.getpid()}"
    started = time.perf_counter()
    seed_items = [Input(-1 - i, s.fmt, s.name, [], s.data) for i, s in enumerate(s for f in FORMATS for s in seeds[f])]
    log(f"{len(seed_items)} seed files, then {count} mutated inputs, {args.jobs} at a time")
    seeds_results = run_all(
        iter(seed_items), len(seed_items), args.jobs, args.timeout, mem_limit, tmp, crash_dir, "seedfile"
    )
    results = run_all(
        (make_input(i, args.seed, seeds) for i in range(count)),
        count,
        args.jobs,
        args.timeout,
        mem_limit,
        tmp,
        crash_dir,
        f"s{args.seed}-",
    )
    try:
        tmp.rmdir()
    except OSError:
        pass
    results.sort(key=lambda r: r.index)
    rep = report(results, seeds_results, seeds, args, time.perf_counter() - started, mem_limit, code)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rep, indent=1) + "\n")
    text = markdown(rep)
    out.with_suffix(".md").write_text(text)
    print(text)
    log(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
