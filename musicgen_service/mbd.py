"""MultiBand Diffusion decoding of MusicGen tokens: mono, stereo, any length.

audiocraft's ``MultiBandDiffusion.tokens_to_wav`` turns 32 kHz EnCodec tokens of
one channel into audio (a diffusion model per frequency band, then an EQ match
to the EnCodec decode). The anchor refuses stereo models, but a stereo MusicGen
is two interleaved mono token streams: as audiocraft's own stereo demo does, the
left and right codes are split, decoded together as a batch of two, and put back
side by side.

Long outputs are decoded in windows of ``WINDOW_SECONDS`` that overlap by
``OVERLAP_SECONDS`` and are joined with an equal-power crossfade, so memory stays
bounded and joins have no clicks; up to one window, the decode is exactly
``tokens_to_wav``.

Cost: MBD is about 500x the FLOPs of an EnCodec decode. On a GPU that is about a
second for 30 s of audio; on a CPU, minutes (see the README).
"""
from __future__ import annotations

import math
import typing as tp

from .errors import InputError

WINDOW_SECONDS = 30.0
OVERLAP_SECONDS = 1.0


def check_compatible(mbd: tp.Any, compression_model: tp.Any) -> None:
    """MBD for MusicGen decodes 32 kHz, 50 Hz, 4-codebook EnCodec tokens; refuse other models."""
    codec = getattr(compression_model, "model", compression_model)  # stereo wrapper -> mono codec
    ours = (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.cardinality)
    theirs = (mbd.codec_model.sample_rate, mbd.codec_model.frame_rate, mbd.codec_model.num_codebooks,
              mbd.codec_model.cardinality)
    if ours != theirs:
        raise InputError([("multi_band_diffusion", (
            "this model's tokens (%d Hz, %g frames/s, %d codebooks of %d) are not the ones MultiBand "
            "Diffusion decodes (%d Hz, %g frames/s, %d codebooks of %d): use the EnCodec decoder "
            "(multi_band_diffusion=false)") % (ours + theirs))])


def tokens_to_wav(mbd: tp.Any, compression_model: tp.Any, tokens: tp.Any) -> tp.Any:
    """[1, K, T] tokens of the model -> [1, channels, samples] audio, decoded by MBD."""
    from audiocraft.models.encodec import InterleaveStereoCompressionModel

    if isinstance(compression_model, InterleaveStereoCompressionModel):
        import torch

        left, right = compression_model.get_left_right_codes(tokens)  # [B, K/2, T] each
        both = _windowed(mbd, torch.cat([left, right], dim=0))  # [2B, 1, samples]
        return torch.cat([both[: tokens.shape[0]], both[tokens.shape[0]:]], dim=1)
    return _windowed(mbd, tokens)


def _windowed(mbd: tp.Any, codes: tp.Any) -> tp.Any:
    frame_rate = mbd.codec_model.frame_rate
    window = int(WINDOW_SECONDS * frame_rate)
    total = codes.shape[-1]
    if total <= window:
        return mbd.tokens_to_wav(codes)
    overlap = int(OVERLAP_SECONDS * frame_rate)
    hop = window - overlap
    starts = list(range(0, total - overlap, hop))
    pieces = [mbd.tokens_to_wav(codes[..., s:min(s + window, total)]) for s in starts]
    samples_per_frame = pieces[0].shape[-1] // min(window, total)
    return crossfade(pieces, overlap * samples_per_frame)


def crossfade(pieces: tp.Sequence[tp.Any], overlap: int) -> tp.Any:
    """Join [..., n_i] pieces that overlap by ``overlap`` samples, with equal-power fades
    (cos/sin ramps), so uncorrelated noise keeps its level and nothing jumps at a join."""
    import torch

    out = pieces[0]
    if overlap <= 0:
        return torch.cat(list(pieces), dim=-1)
    t = (torch.arange(overlap, dtype=out.dtype, device=out.device) + 0.5) / overlap
    fade_in, fade_out = torch.sin(t * math.pi / 2), torch.cos(t * math.pi / 2)
    for piece in pieces[1:]:
        joined = out[..., -overlap:] * fade_out + piece[..., :overlap] * fade_in
        out = torch.cat([out[..., :-overlap], joined, piece[..., overlap:]], dim=-1)
    return out
