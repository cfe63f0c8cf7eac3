"""How long audio stays in bounded memory: EnCodec decoding (and encoding) in chunks.

audiocraft's ``EncodecModel.decode`` runs its SEANet decoder over the whole output in one call,
so its activations grow with the length (real size: ~36 MB per second of mono audio, and time
per second grows too). Here the same modules run on a stream of chunks, and the result is the
one-shot decode's, not an approximation of it:

- the SEANet stack (``decoder.model``, an ``nn.Sequential``) is cut at its LSTM into *local*
  runs of layers (convolutions, transposed convolutions, residual blocks, activations: each
  output sample depends on a bounded span of inputs) and the *recurrent* LSTM;
- a local run is evaluated on windows of its input that carry ``margin`` frames of real context
  on each side, and only the middle of each window is kept. ``margin`` is an upper bound of the
  run's receptive field (:func:`receptive_frames`, from the kernels, strides and dilations), so
  every kept sample saw exactly the inputs it sees in the one-shot call; windows start on whole
  frames, so strides and the convolutions' padding line up as in the one-shot call, and the
  stream's two ends are the one-shot call's ends;
- the LSTM runs over consecutive chunks carrying its hidden state, which is what the one-shot
  call does inside ``nn.LSTM``;
- the codebook lookup (``decode_latent``) works frame by frame.

So chunked and one-shot outputs differ only by float rounding (kernels pick other blockings for
other shapes): measured on the real-size EnCodec, random weights, see bench/long.py and
bench/results/long.md. Memory is the output buffer plus one chunk's activations, whatever the
length; time per second of audio stays flat (the one-shot call slows down on long inputs).

A stereo (interleaved) model's two code streams are decoded one after the other, as
``InterleaveStereoCompressionModel.decode`` does. Chunks are computed on the model's device and
copied into one float32 buffer on the CPU, the only full-length copy.
:func:`encode` streams the SEANet encoder the same way (continuation prompts may be minutes
long). A compression model of another kind is run in one call, as audiocraft does.
"""

from __future__ import annotations

import math
import typing as tp

from ..core.logs import get_logger

log = get_logger()

# Latent frames (50 per second) per chunk, chosen by measurement (bench/results/long.md, real-size
# EnCodec on a 2-core CPU): 2 s chunks decode fastest (smaller ones pay for their margins: ~24
# frames recomputed per chunk; larger ones lose the caches: 10 s chunks are ~1.5x slower per
# second of audio) and peak memory grows ~36 MB per second of chunk (2 s: ~250 MB).
CHUNK_FRAMES = 100


def decode(compression_model: tp.Any, codes: tp.Any, chunk_frames: int = CHUNK_FRAMES) -> tp.Any:
    """[B, K, T] codes -> [B, channels, samples] float32 audio on the CPU: the one-shot
    ``compression_model.decode(codes)``, computed in chunks of ``chunk_frames`` frames."""
    import torch

    codec, streams = _mono_codec(compression_model)
    decoder = getattr(codec, "decoder", None)
    if streams is None or not _streamable(getattr(decoder, "model", None)):
        log.info("%s: decoded in one call (not a SEANet EnCodec)", type(compression_model).__name__)
        return compression_model.decode(codes, None).float().cpu()
    batch = codes.shape[0]
    rows = streams.split(codes)  # [streams * B, K', T], left rows first
    frames = rows.shape[-1]
    hop = int(round(codec.sample_rate / codec.frame_rate))
    out = torch.empty(batch, streams.count, frames * hop, dtype=torch.float32)
    with torch.inference_mode():
        # One stream after the other, as audiocraft's stereo wrapper does: a chunk of one stream
        # stays in the caches (as a batch of two, 1.5x slower on a 2-core CPU: bench/README.md).
        for row, row_codes in enumerate(rows.split(1)):
            target = out[row % batch, row // batch]
            stream = _Stream(decoder.model)
            written = 0
            for start in range(0, frames, chunk_frames):
                end = min(start + chunk_frames, frames)
                piece = stream.push(codec.decode_latent(row_codes[..., start:end]), last=end == frames)
                if piece is not None:
                    target[written : written + piece.shape[-1]].copy_(piece[0, 0])
                    written += piece.shape[-1]
            assert written == target.shape[-1], (written, target.shape)
    return out


class StreamingDecoder:
    """:func:`decode` fed as codes arrive (streaming): :meth:`push` takes the next frames of a [1, K, T]
    code stream and returns the [channels, samples] audio that is final so far (the decoder's
    receptive field holds back a few frames until more arrive or :meth:`finish`). The samples are
    the one-shot decode's, as :func:`decode`'s are, whatever the pushes' sizes."""

    def __init__(self, compression_model: tp.Any):
        codec, streams = _mono_codec(compression_model)
        decoder = getattr(codec, "decoder", None)
        if streams is None or not _streamable(getattr(decoder, "model", None)):
            raise ValueError(f"{type(compression_model).__name__} cannot be decoded as a stream")
        self.codec, self.streams = codec, streams
        self.rows = [_Stream(decoder.model) for _ in range(streams.count)]

    def push(self, codes: tp.Any, last: bool = False) -> tp.Any:
        import torch

        with torch.inference_mode():
            rows = [None] * len(self.rows) if codes is None else self.streams.split(codes).split(1)
            pieces = []
            for stream, row_codes in zip(self.rows, rows):
                has = row_codes is not None and row_codes.shape[-1] > 0
                pieces.append(stream.push(self.codec.decode_latent(row_codes) if has else None, last=last))
            if any(p is None for p in pieces):
                return torch.zeros(self.streams.count, 0)
            return torch.cat([p[0].float().cpu() for p in pieces], dim=0)

    def finish(self) -> tp.Any:
        return self.push(None, last=True)


def encode(compression_model: tp.Any, wav: tp.Any, chunk_frames: int = CHUNK_FRAMES) -> tp.Any:
    """[B, channels, samples] audio -> [B, K, T] codes: the one-shot
    ``compression_model.encode(wav)[0]``, computed in chunks of ``chunk_frames`` frames."""
    import torch

    codec, streams = _mono_codec(compression_model)
    encoder = getattr(codec, "encoder", None)
    if streams is None or getattr(codec, "renormalize", True) or not _streamable(getattr(encoder, "model", None)):
        log.info(
            "%s: encoded in one call (not a SEANet EnCodec without renormalization)", type(compression_model).__name__
        )
        return compression_model.encode(wav)[0]
    hop = int(round(codec.sample_rate / codec.frame_rate))
    step = chunk_frames * hop
    codes = []
    with torch.inference_mode():
        for channel in range(streams.count):  # left rows first, as streams.split orders them
            for b in range(wav.shape[0]):
                row = wav[b : b + 1, channel : channel + 1]
                stream = _Stream(encoder.model, unit=hop)
                pieces = []
                for start in range(0, row.shape[-1], step):
                    end = min(start + step, row.shape[-1])
                    latent = stream.push(row[..., start:end], last=end == row.shape[-1])
                    if latent is not None:
                        pieces.append(codec.quantizer.encode(latent))
                codes.append(torch.cat(pieces, dim=-1))
    return streams.interleave(torch.cat(codes, dim=0), wav.shape[0])


# ------------------------------------------------------------------------------------ streams


class _Streams:
    """How a model's channels map to mono code streams: one for a mono EnCodec, two (left and
    right) for audiocraft's interleaved stereo wrapper."""

    def __init__(self, wrapper: tp.Any = None):
        self.wrapper = wrapper
        self.count = 1 if wrapper is None else 2

    def split(self, codes: tp.Any) -> tp.Any:
        """[B, K, T] model codes -> [count * B, K / count, T] mono codes (left rows first)."""
        if self.wrapper is None:
            return codes
        import torch

        return torch.cat(self.wrapper.get_left_right_codes(codes), dim=0)

    def interleave(self, codes: tp.Any, batch: int) -> tp.Any:
        """[count * B, K, T] mono codes (left rows first) -> [B, count * K, T], the wrapper's layout."""
        if self.wrapper is None:
            return codes
        from einops import rearrange

        pattern = "(c b) k t -> b k (t c)" if self.wrapper.per_timestep else "(c b) k t -> b (k c) t"
        return rearrange(codes, pattern, c=2, b=batch)


def _mono_codec(compression_model: tp.Any) -> tp.Tuple[tp.Any, tp.Optional[_Streams]]:
    """The mono EncodecModel behind ``compression_model`` and its streams (None: not EnCodec)."""
    from audiocraft.models.encodec import EncodecModel, InterleaveStereoCompressionModel

    if isinstance(compression_model, InterleaveStereoCompressionModel):
        inner = compression_model.model
        return inner, (_Streams(compression_model) if isinstance(inner, EncodecModel) else None)
    if isinstance(compression_model, EncodecModel) and compression_model.channels == 1:
        return compression_model, _Streams()
    return compression_model, None


def _is_lstm(layer: tp.Any) -> bool:
    from audiocraft.modules.lstm import StreamableLSTM

    return isinstance(layer, StreamableLSTM)


def _local_types() -> tp.Tuple[type, ...]:
    """Layers whose outputs depend on a bounded span of their inputs."""
    from audiocraft.modules.conv import StreamableConv1d, StreamableConvTranspose1d
    from audiocraft.modules.seanet import SEANetResnetBlock
    from torch import nn

    return (
        StreamableConv1d,
        StreamableConvTranspose1d,
        SEANetResnetBlock,
        nn.Identity,
        nn.ELU,
        nn.ReLU,
        nn.LeakyReLU,
        nn.GELU,
        nn.SiLU,
        nn.Tanh,
        nn.Sigmoid,
    )


def _streamable(model: tp.Any) -> bool:
    from torch import nn

    local = _local_types()
    return isinstance(model, nn.Sequential) and all(isinstance(m, local) or _is_lstm(m) for m in model)


def receptive_frames(layers: tp.Sequence[tp.Any], unit: int) -> tp.Tuple[int, tp.Any]:
    """(margin, ratio) of a local run: an upper bound, in whole frames of ``unit`` input samples,
    of how far an output sample's inputs reach on either side; and output samples per input
    sample. A convolution of kernel k, dilation d, stride s reaches at most (k - 1) d + s of its
    inputs; a transposed one ceil(k / s) + 1 (both counted on one side as if they were the whole
    span, which covers any padding split)."""
    from fractions import Fraction

    from torch import nn

    reach = Fraction(0)
    scale = Fraction(1)  # run-input samples per input sample of the current layer
    for layer in layers:
        for m in layer.modules():
            if isinstance(m, nn.Conv1d):
                (k,), (s,), (d,) = m.kernel_size, m.stride, m.dilation
                reach += ((k - 1) * d + s) * scale
                scale *= s
            elif isinstance(m, nn.ConvTranspose1d):
                (k,), (s,) = m.kernel_size, m.stride
                reach += (math.ceil(k / s) + 1) * scale
                scale /= s
    return math.ceil(reach / unit), 1 / scale


class _Local:
    """A local run of layers evaluated on windows with ``margin`` frames of context each side."""

    def __init__(self, layers: tp.Sequence[tp.Any], unit: int):
        from torch import nn

        self.layers = nn.Sequential(*layers)
        margin_frames, self.ratio = receptive_frames(layers, unit)
        self.unit = unit
        self.margin = margin_frames * unit  # input samples
        self.buffer: tp.Any = None  # inputs from position `kept` on
        self.kept = 0
        self.seen = 0
        self.done = 0  # outputs are final for the inputs before this position

    @property
    def out_unit(self) -> int:
        return int(self.unit * self.ratio)

    def push(self, x: tp.Any, last: bool) -> tp.Any:
        import torch

        if x is not None and x.shape[-1]:
            self.buffer = x if self.buffer is None else torch.cat([self.buffer, x], dim=-1)
            self.seen += x.shape[-1]
        end = self.seen if last else (self.seen - self.margin) // self.unit * self.unit
        if self.buffer is None or end <= self.done:
            return None
        w0 = max(self.done - self.margin, 0)
        w1 = self.seen if last else end + self.margin
        y = self.layers(self.buffer[..., w0 - self.kept : w1 - self.kept])
        first = int((self.done - w0) * self.ratio)
        y = y[..., first:] if last else y[..., first : first + int((end - self.done) * self.ratio)]
        self.done = end
        drop = max(self.done - self.margin, 0) - self.kept
        self.buffer, self.kept = self.buffer[..., drop:], self.kept + drop
        return y


class _Recurrent:
    """audiocraft's StreamableLSTM on consecutive chunks, its (h, c) state carried along."""

    def __init__(self, layer: tp.Any):
        self.layer = layer
        self.state: tp.Any = None

    def push(self, x: tp.Any, last: bool) -> tp.Any:
        if x is None:
            return None
        x = x.permute(2, 0, 1)
        y, self.state = self.layer.lstm(x, self.state)
        if self.layer.skip:
            y = y + x
        return y.permute(1, 2, 0)


class _Stream:
    """A SEANet ``nn.Sequential`` as a pipeline of local runs and LSTMs; ``unit``: input samples
    per latent frame (1 for the decoder, the hop for the encoder)."""

    def __init__(self, model: tp.Any, unit: int = 1):
        self.stages: tp.List[tp.Any] = []
        run: tp.List[tp.Any] = []
        for layer in list(model) + [None]:
            if layer is None or _is_lstm(layer):
                if run:
                    self.stages.append(_Local(run, unit))
                    unit = self.stages[-1].out_unit
                    run = []
                if layer is not None:
                    self.stages.append(_Recurrent(layer))
            else:
                run.append(layer)

    def push(self, x: tp.Any, last: bool = False) -> tp.Any:
        for stage in self.stages:
            x = stage.push(x, last)
        return x
