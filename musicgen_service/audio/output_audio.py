"""Turning generated audio into the file a user downloads: normalization, then wav or mp3.

Normalization follows audiocraft's own (``audio_utils.normalize_audio``, with the same settings
its ``audio_write`` uses and the loudness compressor on, as the original MusicGen predictor
did), in bounded memory: outputs may be 300 s of stereo, so the waveform is normalized in
place, block by block, and nothing else holds more than one block of it. The library computes
whole-signal statistics on temporary copies (``wav.abs()``, ``wav.pow(2)``, ``gain * wav``,
and for loudness torchaudio's K-weighting filters and 400 ms block matrix). Here the statistics
are accumulated block by block (in float64) and the gains applied in place: peak and clip give
the library's exact samples, rms and loudness the same gain up to float rounding (tested
against the library). Loudness is ITU-R BS.1770 as ``torchaudio.functional.loudness`` computes
it: the K-weighting biquads run block by block through torchaudio's ``lfilter`` with their
state carried across blocks (:class:`_Biquad`), the energy of each 100 ms hop is summed, and
the 400 ms gating blocks (four hops, 75% overlap) are gated as torchaudio gates them.

Encoding happens in-process, one block at a time: wav through soundfile (16-bit PCM, like
``audio_write``), mp3 through lameenc (320 kbps), so no ffmpeg binary is needed at run time.
``audio_write`` itself is not used because it pipes every format, wav included, through an
``ffmpeg`` subprocess.

Each output is written to a fresh temporary folder under a temporary name and
renamed into place once complete: a failed write leaves nothing behind, and
concurrent predictions never share a file.
"""

from __future__ import annotations

import math
import typing as tp
from pathlib import Path

import numpy as np

MP3_KBPS = 320
PEAK_CLIP_HEADROOM_DB = 1.0
RMS_HEADROOM_DB = 18.0
LOUDNESS_HEADROOM_DB = 14.0  # target loudness: -14 LUFS
LOUDNESS_ENERGY_FLOOR = 2e-3  # normalize_loudness's: quieter audio is left as it is
BLOCK = 2**18  # samples per channel per block (8.2 s at 32 kHz): ~1 MB of float32 a channel


def _blocks(length: int, size: int = BLOCK) -> tp.Iterator[slice]:
    for start in range(0, length, size):
        yield slice(start, min(start + size, length))


def normalize(wav: tp.Any, sample_rate: int, strategy: str) -> tp.Any:
    """``wav`` [C, T] float -> normalized [C, T] float32 within [-1, 1] (audiocraft's strategies).
    A float32 CPU tensor is normalized in place and returned."""
    import torch

    with torch.inference_mode():  # the decoder's output is an inference tensor
        return _normalize(wav.detach().to("cpu", torch.float32), sample_rate, strategy)


def _normalize(wav: tp.Any, sample_rate: int, strategy: str) -> tp.Any:
    import torch

    peak = torch.zeros((), dtype=torch.float32)
    for b in _blocks(wav.shape[-1]):
        if not torch.isfinite(wav[:, b]).all():
            raise RuntimeError("generated audio contains NaN or infinite samples")
        peak = torch.maximum(peak, wav[:, b].abs().max())
    if peak == 0:  # silence: every strategy would divide by zero
        return wav
    if strategy == "peak":
        _scale(wav, 10 ** (-PEAK_CLIP_HEADROOM_DB / 20) / peak)
    elif strategy == "clip":
        limit = 10 ** (-PEAK_CLIP_HEADROOM_DB / 20)
        _apply(wav, lambda x: x.clamp_(-limit, limit))
    elif strategy == "rms":
        mean_square = sum(wav[:, b].mean(dim=0).pow(2).sum(dtype=torch.float64) for b in _blocks(wav.shape[-1]))
        rms = torch.tensor(math.sqrt(mean_square / wav.shape[-1]), dtype=torch.float32)
        _scale(wav, 10 ** (-RMS_HEADROOM_DB / 20) / rms)
    elif strategy == "loudness":
        energy = math.sqrt(sum(wav[:, b].pow(2).sum(dtype=torch.float64) for b in _blocks(wav.shape[-1])) / wav.numel())
        if energy >= LOUDNESS_ENERGY_FLOOR:
            gain = 10.0 ** ((-LOUDNESS_HEADROOM_DB - loudness(wav, sample_rate)) / 20.0)
            _apply(wav, lambda x: x.mul_(gain).tanh_())  # audiocraft's loudness_compressor
        _apply(wav, lambda x: x.clamp_(-1, 1))
    else:
        raise ValueError(f"unknown normalization strategy: {strategy!r}")
    return wav


def fixed_levelling(first: tp.Any, sample_rate: int, strategy: str) -> tp.Callable[[tp.Any], tp.Any]:
    """``strategy``'s processing with its gain measured on ``first`` (a stream's opening seconds)
    instead of the whole signal, to apply to every later block as it comes (streaming): peak and rms
    scale by the gain that brings ``first`` to their target, loudness scales to -14 LUFS of ``first``
    then soft-clips (tanh) as :func:`normalize` does, clip clips; all end clamped to [-1, 1]. The
    returned function also tells its gain in dB (``.gain_db``)."""
    import torch

    with torch.inference_mode():
        x = first.detach().to("cpu", torch.float32)
        peak = float(x.abs().max()) if x.numel() else 0.0
        gain, soft = 1.0, False
        if peak > 0 and strategy == "peak":
            gain = 10 ** (-PEAK_CLIP_HEADROOM_DB / 20) / peak
        elif peak > 0 and strategy == "rms":
            gain = 10 ** (-RMS_HEADROOM_DB / 20) / float(x.mean(dim=0).pow(2).mean().sqrt())
        elif peak > 0 and strategy == "loudness":
            soft = True
            if math.sqrt(float(x.pow(2).mean())) >= LOUDNESS_ENERGY_FLOOR:
                gain = 10.0 ** ((-LOUDNESS_HEADROOM_DB - loudness(x.clone(), sample_rate)) / 20.0)
    limit = 10 ** (-PEAK_CLIP_HEADROOM_DB / 20) if strategy == "clip" else 1.0

    def level(block: tp.Any) -> tp.Any:
        y = block.detach().to("cpu", torch.float32) * gain
        if soft:
            y = y.tanh()
        return y.clamp(-limit, limit)

    level.gain_db = 20 * math.log10(gain)  # type: ignore[attr-defined]
    return level


def _apply(wav: tp.Any, fn: tp.Callable[[tp.Any], tp.Any]) -> None:
    for b in _blocks(wav.shape[-1]):
        fn(wav[:, b])


def _scale(wav: tp.Any, gain: tp.Any) -> None:
    """``wav * gain`` then clipped to [-1, 1], in place (normalize_audio's rescaling)."""
    _apply(wav, lambda x: x.mul_(gain).clamp_(-1, 1))


def loudness(wav: tp.Any, sample_rate: int) -> float:
    """Integrated loudness (LUFS) of [C, T] audio, as ``torchaudio.functional.loudness``
    measures it (ITU-R BS.1770-4: K-weighting, 400 ms blocks every 100 ms, absolute gate at
    -70 LUFS, relative gate 10 LU below), holding one block of the signal at a time."""
    import torch

    gate = int(round(0.4 * sample_rate))
    step = int(round(gate * 0.25))
    channels = wav.shape[0]
    if gate != 4 * step or channels > 5:  # rates whose blocks are not four hops: the library
        import torchaudio

        return torchaudio.functional.loudness(wav, sample_rate).item()
    # torchaudio's K-weighting: treble_biquad(4 dB, 1500 Hz, Q 1/sqrt(2)), highpass_biquad(38 Hz, Q 0.5)
    filters = [
        _Biquad(*_treble_coefficients(sample_rate, 4.0, 1500.0, 1 / math.sqrt(2)), channels),
        _Biquad(*_highpass_coefficients(sample_rate, 38.0, 0.5), channels),
    ]
    hops = []  # [C, n] energy sums of whole 100 ms hops
    for b in _blocks(wav.shape[-1], size=step * math.ceil(BLOCK / step)):
        x = wav[:, b]
        for f in filters:
            x = f(x)
        whole = x.shape[-1] // step * step
        hops.append(x[:, :whole].square().reshape(channels, -1, step).sum(dim=-1, dtype=torch.float64))
    hop_energy = torch.cat(hops, dim=-1)
    if hop_energy.shape[-1] < 4:
        raise ValueError("loudness needs at least 400 ms of audio")
    energy = hop_energy.unfold(-1, 4, 1).sum(dim=-1) / gate  # [C, blocks]
    # gating: torchaudio.functional.loudness's arithmetic on these block energies
    g = torch.tensor([1.0, 1.0, 1.0, 1.41, 1.41], dtype=energy.dtype)[:channels]
    block_loudness = -0.691 + 10 * torch.log10(torch.sum(g.unsqueeze(-1) * energy, dim=-2))
    gated = block_loudness > -70.0
    filtered = torch.sum(gated * energy, dim=-1) / torch.count_nonzero(gated, dim=-1)
    gamma_rel = -0.691 + 10 * torch.log10(torch.sum(g * filtered, dim=-1)) - 10
    gated = torch.logical_and(gated, block_loudness > gamma_rel)
    filtered = torch.sum(gated * energy, dim=-1) / torch.count_nonzero(gated, dim=-1)
    value = (-0.691 + 10 * torch.log10(torch.sum(g * filtered, dim=-1))).item()
    if not math.isfinite(value):
        raise RuntimeError("the generated audio is too quiet to measure its loudness")
    return value


def _treble_coefficients(sample_rate: int, gain: float, central_freq: float, q: float) -> tp.Tuple[tp.Any, tp.Any]:
    """(b, a) of ``torchaudio.functional.treble_biquad``, computed as it computes them (float32)."""
    import torch

    w0 = 2 * math.pi * torch.tensor(central_freq) / sample_rate
    alpha = torch.sin(w0) / 2 / torch.tensor(q)
    A = torch.exp(torch.tensor(gain) / 40 * math.log(10))
    temp1, temp2, temp3 = 2 * torch.sqrt(A) * alpha, (A - 1) * torch.cos(w0), (A + 1) * torch.cos(w0)
    b = torch.stack([A * ((A + 1) + temp2 + temp1), -2 * A * ((A - 1) + temp3), A * ((A + 1) + temp2 - temp1)])
    a = torch.stack([(A + 1) - temp2 + temp1, 2 * ((A - 1) - temp3), (A + 1) - temp2 - temp1])
    return b, a


def _highpass_coefficients(sample_rate: int, cutoff_freq: float, q: float) -> tp.Tuple[tp.Any, tp.Any]:
    """(b, a) of ``torchaudio.functional.highpass_biquad``, computed as it computes them (float32)."""
    import torch

    w0 = 2 * math.pi * torch.tensor(cutoff_freq) / sample_rate
    alpha = torch.sin(w0) / 2.0 / torch.tensor(q)
    b0 = (1 + torch.cos(w0)) / 2
    b = torch.stack([b0, -1 - torch.cos(w0), b0])
    a = torch.stack([1 + alpha, -2 * torch.cos(w0), 1 - alpha])
    return b, a


class _Biquad:
    """``torchaudio.functional.biquad`` (``lfilter``, output clamped to [-1, 1] as there) on
    consecutive blocks of a [C, T] signal, with the filter's state carried from block to block:
    the FIR part sees the previous block's last two inputs, and the IIR part's last two
    (unclamped) outputs enter the next block as an equivalent correction of its first two
    inputs, so the recursion continues where it stopped."""

    def __init__(self, b: tp.Any, a: tp.Any, channels: int):
        import torch

        self.b = (b / a[0]).tolist()  # lfilter's normalization by a0
        self.a = a / a[0]
        self.identity = torch.tensor([1.0, 0.0, 0.0])
        self.inputs = torch.zeros(channels, 2)  # x[n-2], x[n-1]
        self.outputs = torch.zeros(channels, 2)  # y[n-2], y[n-1]

    def __call__(self, x: tp.Any) -> tp.Any:
        import torch
        import torchaudio

        n = x.shape[-1]
        padded = torch.cat([self.inputs, x], dim=-1)
        b0, b1, b2 = self.b
        fir = b0 * padded[:, 2:] + b1 * padded[:, 1:-1] + b2 * padded[:, :-2]
        a1, a2 = self.a[1], self.a[2]
        y1, y2 = self.outputs[:, 1], self.outputs[:, 0]
        correction = torch.stack([a1 * y1 + a2 * y2, a2 * y1], dim=-1)
        fir[:, :2] -= correction[:, :n]
        y = torchaudio.functional.lfilter(fir, self.a, self.identity, clamp=False)
        self.inputs = padded[:, -2:].clone()
        self.outputs = torch.cat([self.outputs, y[:, -2:]], dim=-1)[:, -2:]
        return y.clamp(-1.0, 1.0)


def _pcm16(wav: tp.Any) -> np.ndarray:
    """[C, T] float in [-1, 1] -> [T, C] int16, interleaved frames."""
    samples = wav.clamp(-1, 1).numpy().T
    return np.ascontiguousarray(np.round(samples * 32767.0).astype(np.int16))


def encode_wav(wav: tp.Any, sample_rate: int, path: Path) -> None:
    import soundfile

    with soundfile.SoundFile(str(path), "w", sample_rate, wav.shape[0], subtype="PCM_16", format="WAV") as f:
        for b in _blocks(wav.shape[-1]):
            f.write(_pcm16(wav[:, b]))


def mp3_encoder(sample_rate: int, channels: int) -> tp.Any:
    """lameenc's encoder as every mp3 here is made (320 kbps, high quality)."""
    import lameenc

    if channels not in (1, 2):
        raise ValueError(f"mp3 holds mono or stereo audio, not {channels} channels")
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(MP3_KBPS)
    encoder.set_in_sample_rate(sample_rate)
    encoder.set_channels(channels)
    encoder.set_quality(2)  # 2 = high quality, 7 = fastest
    return encoder


def mp3_bytes(encoder: tp.Any, wav: tp.Any) -> bytes:
    return encoder.encode(_pcm16(wav).tobytes())


def encode_mp3(wav: tp.Any, sample_rate: int, path: Path) -> None:
    encoder = mp3_encoder(sample_rate, wav.shape[0])
    with open(path, "wb") as f:
        for b in _blocks(wav.shape[-1]):
            f.write(encoder.encode(_pcm16(wav[:, b]).tobytes()))
        f.write(encoder.flush())


ENCODERS = {"wav": encode_wav, "mp3": encode_mp3}


def write(wav: tp.Any, sample_rate: int, output_format: str, folder: Path, stem: str = "output") -> Path:
    """Encode ``wav`` (already normalized) as ``folder/stem.<format>``, atomically."""
    final = Path(folder) / f"{stem}.{output_format}"
    partial = final.with_name(f".{final.name}.partial")
    try:
        ENCODERS[output_format](wav, sample_rate, partial)
        partial.replace(final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return final
