"""When chunks are cut: the audio of a prediction, sent in pieces while its tokens are generated.

As the LM decodes, :class:`ChunkStream` follows the frames that are complete (with the codebook delay
pattern a frame is complete a few steps after its first codebook: its last codebook's delay), in every
window of audiocraft's extension and after a continuation's prompt, and decodes them as they come
with the chunked EnCodec (:class:`..audio.codec.StreamingDecoder`: the one-shot decode's samples). Each
stretch of :data:`CHUNK_SECONDS` (the first: :data:`FIRST_CHUNK_SECONDS`, to start sooner) is
levelled and written as its own file, ``chunk-0000.wav``, ``chunk-0001.wav``... (the index in the
name: uploads finish in any order), in the requested format.

**Levelling.** The final file is normalized on the whole signal, which the chunks cannot wait for.
They get the same strategy with its gain fixed on the first chunk, before it is sent
(:func:`..audio.output_audio.fixed_levelling`): ``clip`` gives the final file's very samples; ``peak`` and
``rms`` give them up to that fixed gain; ``loudness`` gives tanh(g_chunks x) where the final file has
tanh(g_final x): the same up to a gain where the soft clip is quiet, and a soft clip that acts a
little differently where it is not. The two gains are logged. The chunks join without a seam: they
are consecutive samples of one decode, levelled by one function.

**mp3** chunks are consecutive pieces of one mp3 stream (one encoder across chunks): played in
order, or concatenated, they are one mp3; each file on its own starts without the encoder's history.

The final item is the whole file, made as the main model makes it (:meth:`.service.Service.run`'s
own steps), so it is exactly what the main model returns for the same inputs and seed.
"""

from __future__ import annotations

import time
import typing as tp
from pathlib import Path

from ..audio import codec, output_audio
from ..core.logs import get_logger

log = get_logger()

# Chosen by measuring time to first audio and the cost per chunk (bench/stream.py): the first chunk
# short so that audio starts early, the next ones long enough that each file and its upload are cheap.
FIRST_CHUNK_SECONDS = 1.0
CHUNK_SECONDS = 2.0
# frames between a step and audio out of it: the delay pattern's (a frame completes 3 steps after it
# starts) and the decoder's receptive field (7 frames held back until their right context arrives)
LAG_FRAMES = 10


class ChunkStream:
    """Cuts one prediction's audio into chunk files as its frames complete; ``emit(path)`` gets each."""

    def __init__(
        self,
        model: tp.Any,
        strategy: str,
        output_format: str,
        folder: Path,
        emit: tp.Callable[[Path], None],
        head: tp.Any = None,
    ):
        """``head``: codes the output starts with before the LM's first window (a continuation's
        audio kept as it is, then its window prompt comes from the first window)."""
        self.model, self.strategy, self.format = model, strategy, output_format
        self.folder, self.emit = Path(folder), emit
        self.rate = model.sample_rate
        self.decoder = codec.StreamingDecoder(model.compression_model)
        self.out = head  # [1, K, n] the output's codes known so far
        self.decoded_frames = 0
        self.pending: tp.List[tp.Any] = []  # decoded samples not yet in a chunk
        self.pending_samples = 0
        self.level: tp.Optional[tp.Callable[[tp.Any], tp.Any]] = None
        self.encoder: tp.Any = None
        self.index = 0
        self.view: tp.Any = None
        self.base = 0
        self.first_chunk_at: tp.Optional[float] = None
        self.start = time.perf_counter()

    # the decoding loop's side

    def window(self, view: tp.Any) -> None:
        """A window of the LM starts; its prompt is the last ``view.prompt_frames`` of the output."""
        self._sync()
        known = 0 if self.out is None else self.out.shape[-1]
        self.base = max(0, known - view.prompt_frames)
        self.view = view

    def step(self, generated: int) -> None:
        """After a decoding step (``generated`` steps of the current window so far): cut the next
        chunk once its frames are complete and decoded. Cheap until then: frames are gathered only
        when the count of steps says a chunk can be ready."""
        if self.view is None:
            return
        upper = self.base + self.view.prompt_frames + generated  # frames started, some not complete yet
        needed = int(round(self._next_seconds() * self.model.frame_rate)) + LAG_FRAMES
        if upper - self.decoded_frames + self.pending_samples * self.model.frame_rate / self.rate < needed:
            return
        self._sync()
        self._decode_and_cut(final=False)

    def finish(self, tokens: tp.Any) -> None:
        """All tokens are known: the rest of the audio, in chunks, the last one shorter."""
        self.out, self.view = tokens, None
        self._decode_and_cut(final=True)

    # inside

    def _next_seconds(self) -> float:
        return FIRST_CHUNK_SECONDS if self.index == 0 else CHUNK_SECONDS

    def _sync(self) -> None:
        if self.view is None:
            return
        import torch

        completed = self.view.completed()
        if self.out is None:
            self.out = completed
        elif self.base + completed.shape[-1] > self.out.shape[-1]:
            self.out = torch.cat([self.out[..., : self.base], completed], dim=-1)

    def _decode_and_cut(self, final: bool) -> None:
        import torch

        if self.out is not None and self.out.shape[-1] > self.decoded_frames:
            new = self.out[..., self.decoded_frames :]
            self.decoded_frames = self.out.shape[-1]
            samples = self.decoder.push(new.to(self.model.device), last=final)
        elif final:
            samples = self.decoder.finish()
        else:
            return
        if samples.shape[-1]:
            self.pending.append(samples)
            self.pending_samples += samples.shape[-1]
        while True:
            want = int(round(self._next_seconds() * self.rate))
            if self.pending_samples < want and not (final and self.pending_samples):
                return
            audio = torch.cat(self.pending, dim=-1)
            take = audio if (final and self.pending_samples <= want) else audio[:, :want]
            rest = audio[:, take.shape[-1] :]
            self.pending, self.pending_samples = ([rest] if rest.shape[-1] else []), rest.shape[-1]
            self._write(take, last=final and not self.pending_samples)

    def _write(self, audio: tp.Any, last: bool) -> None:
        if self.level is None:
            self.level = output_audio.fixed_levelling(audio, self.rate, self.strategy)
            log.info(
                "streaming: chunks levelled (%s) with a gain of %+.1f dB fixed on the first %.1f s",
                self.strategy,
                self.level.gain_db,
                audio.shape[-1] / self.rate,
            )
        levelled = self.level(audio)
        name = f"chunk-{self.index:04d}.{self.format}"
        path = self.folder / name
        if self.format == "mp3":
            if self.encoder is None:
                self.encoder = output_audio.mp3_encoder(self.rate, levelled.shape[0])
            data = output_audio.mp3_bytes(self.encoder, levelled) + (self.encoder.flush() if last else b"")
            partial = path.with_name(f".{name}.partial")
            partial.write_bytes(data)
            partial.replace(path)
        else:
            path = output_audio.write(levelled, self.rate, self.format, self.folder, stem=path.stem)
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter() - self.start
        self.index += 1
        self.emit(path)
