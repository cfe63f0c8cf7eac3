"""MultiBand Diffusion decoding of MusicGen tokens: mono, stereo, any length.

audiocraft's ``MultiBandDiffusion.tokens_to_wav`` turns 32 kHz EnCodec tokens of
one channel into audio (a diffusion model per frequency band, then an EQ match
to the EnCodec decode). The anchor refuses stereo models, but a stereo MusicGen
is two interleaved mono token streams: as audiocraft's own stereo demo does, the
left and right codes are split, decoded together as a batch of two, and put back
side by side.

Long outputs are decoded in windows of ``WINDOW_SECONDS`` that overlap by
``OVERLAP_SECONDS``, each crossfaded into one CPU buffer as it is decoded (a
crossfade that keeps the level: :func:`join`): memory is the output plus one
window's decode, and joins have no clicks; up to one window, the decode is exactly
``tokens_to_wav``.

Cost: MBD is about 500x the FLOPs of an EnCodec decode. On a GPU that is about a
second for 30 s of audio; on a CPU, minutes (see docs/multiband-diffusion.md).
"""

from __future__ import annotations

import math
import typing as tp

from ..core.errors import InputError

WINDOW_SECONDS = 30.0
OVERLAP_SECONDS = 1.0


def check_compatible(mbd: tp.Any, compression_model: tp.Any) -> None:
    """MBD for MusicGen decodes 32 kHz, 50 Hz, 4-codebook EnCodec tokens; refuse other models."""
    codec = getattr(compression_model, "model", compression_model)  # stereo wrapper -> mono codec
    ours = (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.cardinality)
    theirs = (
        mbd.codec_model.sample_rate,
        mbd.codec_model.frame_rate,
        mbd.codec_model.num_codebooks,
        mbd.codec_model.cardinality,
    )
    if ours != theirs:
        raise InputError(
            [
                (
                    "multi_band_diffusion",
                    (
                        "this model's tokens (%d Hz, %g frames/s, %d codebooks of %d) are not the ones MultiBand "
                        "Diffusion decodes (%d Hz, %g frames/s, %d codebooks of %d): use the EnCodec decoder "
                        "(multi_band_diffusion=false)"
                    )
                    % (ours + theirs),
                )
            ]
        )


def tokens_to_wav(mbd: tp.Any, compression_model: tp.Any, tokens: tp.Any) -> tp.Any:
    """[B, K, T] tokens of the model -> [B, channels, samples] float32 audio on the CPU, decoded
    by MBD."""
    from audiocraft.models.encodec import InterleaveStereoCompressionModel

    if isinstance(compression_model, InterleaveStereoCompressionModel):
        import torch

        batch = tokens.shape[0]
        left, right = compression_model.get_left_right_codes(tokens)  # [B, K/2, T] each
        both = _windowed(mbd, torch.cat([left, right], dim=0))  # [2B, 1, samples]
        return both.reshape(2, batch, both.shape[-1]).transpose(0, 1).contiguous()  # no copy at B = 1
    return _windowed(mbd, tokens)


def _windowed(mbd: tp.Any, codes: tp.Any) -> tp.Any:
    """Each window decoded on the model's device is crossfaded into one CPU buffer as it comes."""
    frame_rate = mbd.codec_model.frame_rate
    window = int(WINDOW_SECONDS * frame_rate)
    total = codes.shape[-1]
    if total <= window:
        return mbd.tokens_to_wav(codes).float().cpu()
    overlap = int(OVERLAP_SECONDS * frame_rate)
    out = samples_per_frame = None
    for start in range(0, total - overlap, window - overlap):
        piece = mbd.tokens_to_wav(codes[..., start : min(start + window, total)]).float().cpu()
        if out is None:
            import torch

            samples_per_frame = piece.shape[-1] // min(window, total)
            out = torch.empty(*piece.shape[:-1], total * samples_per_frame)
        join(out, start * samples_per_frame, piece, overlap * samples_per_frame if start else 0)
    return out


def crossfade(pieces: tp.Sequence[tp.Any], overlap: int, correlated: bool = True) -> tp.Any:
    """Join [..., n_i] pieces that overlap by ``overlap`` samples (see :func:`join`)."""
    import torch

    total = sum(p.shape[-1] for p in pieces) - overlap * (len(pieces) - 1)
    out = torch.empty(*pieces[0].shape[:-1], total, dtype=pieces[0].dtype)
    position = 0
    for i, piece in enumerate(pieces):
        join(out, position, piece, overlap if i else 0, correlated)
        position += piece.shape[-1] - overlap
    return out


def join(out: tp.Any, position: int, piece: tp.Any, overlap: int, correlated: bool = True) -> None:
    """Write ``piece`` into ``out`` from ``position`` on; its first ``overlap`` samples are
    crossfaded with what ``out`` holds there. The fades are cos/sin ramps (equal power) divided
    by sqrt(1 + 2 cos sin rho), rho being the two signals' correlation over the overlap (each row;
    clamped to [0, 1]): the mix keeps the level whether the two renderings are unrelated (rho = 0:
    the plain equal-power crossfade) or the same (rho = 1: it returns that signal). MBD draws
    fresh noise for each window, and two renderings of the same tokens are partly correlated
    (0.38 on the tiny random MBD): a plain equal-power crossfade would swell by 10 log10(1 + rho)
    dB (1.4 dB there) in the middle of each join. ``correlated=False``: the plain equal-power
    crossfade (rho = 0), for comparison (bench/long.py)."""
    import torch

    end = position + piece.shape[-1]
    if overlap:
        head, new = out[..., position : position + overlap], piece[..., :overlap]
        t = (torch.arange(overlap, dtype=out.dtype) + 0.5) / overlap
        fade_in, fade_out = torch.sin(t * math.pi / 2), torch.cos(t * math.pi / 2)
        norms = head.norm(dim=-1, keepdim=True) * new.norm(dim=-1, keepdim=True)
        rho = ((head * new).sum(dim=-1, keepdim=True) / norms.clamp_min(1e-12)).clamp(0, 1) * correlated
        gain = (1 + 2 * fade_in * fade_out * rho).rsqrt()
        head.mul_(fade_out * gain).add_(new * (fade_in * gain))
    out[..., position + overlap : end].copy_(piece[..., overlap:])
