"""How a dataset becomes what the LM trains on, computed once and reused for every epoch.

For each segment (:mod:`.dataset`):

- **codes**: EnCodec's tokens [K, T] through the chunked encoder the service already uses for
  continuation prompts (:func:`..audio.codec.encode`: bounded memory, the one-shot encoder's codes);
- **text**: the conditioner's T5 states for its caption (each distinct caption once), before the
  conditioner's output projection;
- **melody** (melody models): the chroma conditioner's features of the segment itself, before its
  output projection: demucs takes out drums and bass, then the chroma is taken, as audiocraft's
  chroma2music training does, so that the model keeps following the melody it is given.

The features stop before the conditioners' output projections because those are LM parameters
(a full fine-tune trains them): :func:`conditions` applies them at every step, exactly as the
conditioners' own ``forward`` does after their frozen parts (T5Conditioner: projection, then the
padding mask; WaveformConditioner: projection, then its mask), which a test compares with the
condition provider's own output.

Classifier-free-guidance dropout (:func:`conditions`) uses the LM's own probabilities (its
``cfg_dropout`` and ``att_dropout`` modules, from the checkpoint's training config: 0.3 for all
conditions; melody models also drop the melody alone with 0.5), drawn per segment from the run's
seeded generator: a dropped condition is the null condition audiocraft's guidance uses (no text:
zeros under a zero mask; no melody: the chroma conditioner's features of a null waveform).
"""

from __future__ import annotations

import time
import typing as tp
from dataclasses import dataclass, field

import torch

from ..core.logs import get_logger

log = get_logger()

TEXT = "description"
MELODY = "self_wav"


@dataclass
class Example:
    codes: torch.Tensor  # [K, T] int16
    caption: str  # key of Features.text
    melody: tp.Optional[torch.Tensor]  # [frames, chroma bins] pre-projection (melody models)
    source: str
    start: float


@dataclass
class Features:
    examples: tp.List[Example]
    text: tp.Dict[str, torch.Tensor] = field(default_factory=dict)  # caption -> [L, T5 dim] (no padding)
    null_melody: tp.Optional[torch.Tensor] = None
    frame_rate: float = 50.0
    seconds: float = 0.0

    def save(self, path: tp.Any) -> None:
        examples = [{**vars(e), "start": float(e.start)} for e in self.examples]
        torch.save(
            {
                "examples": examples,
                "text": self.text,
                "null_melody": self.null_melody,
                "frame_rate": float(self.frame_rate),
                "seconds": float(self.seconds),
            },
            path,
        )

    @classmethod
    def load(cls, path: tp.Any) -> "Features":
        data = torch.load(path, weights_only=True)
        return cls(
            examples=[Example(**e) for e in data["examples"]],
            text=data["text"],
            null_melody=data["null_melody"],
            frame_rate=data["frame_rate"],
            seconds=data["seconds"],
        )


def _attributes(
    caption: tp.Optional[str], wav: tp.Optional[torch.Tensor], sample_rate: int, melody: bool, device: tp.Any
) -> tp.Any:
    """audiocraft's ConditioningAttributes for one segment, as MusicGen builds them (a melody model
    without a melody gets its one-sample silent WavCondition)."""
    from audiocraft.modules.conditioners import ConditioningAttributes, WavCondition

    attributes = ConditioningAttributes(text={TEXT: caption or None})
    if melody:
        if wav is None:
            wav, length = torch.zeros((1, 1), device=device), 0
        else:
            length = wav.shape[-1]
        attributes.wav[MELODY] = WavCondition(
            wav[None], torch.tensor([length], device=device), sample_rate=[sample_rate], path=[None], seek_time=[0.0]
        )
    return attributes


def compute(
    model: tp.Any,
    segments: tp.Iterable[tp.Any],
    instance_prompt: str,
    cancelled: tp.Callable[[], bool] = lambda: False,
    seed: int = 0,
    total_seconds: tp.Optional[float] = None,
) -> Features:
    """Codes and condition features for every segment (see the module docstring), through the LM's
    condition provider's own tokenization (which, for instance, folds a stereo melody into one
    channel as MusicGen's inference does). ``segments``: any iterable, consumed once (the run's are
    decoded as they are tokenized); ``total_seconds``: their length, for the progress lines. ``seed``:
    demucs' random shifts (the melody's stems)."""
    with torch.no_grad():
        return _compute(model, segments, instance_prompt, cancelled, seed, total_seconds)


def segment_seed(seed: int, index: int) -> int:
    """The seed of demucs' random shifts for segment ``index`` (-1: the null melody): each segment's
    chroma is the same whatever else was computed before it."""
    return seed * 1_000_003 + index


MAX_TEXT_TOKENS = 512  # what T5 was trained on (t5-base's n_positions); audiocraft's tokenizer takes any length


def fit_caption(tokenizer: tp.Any, text: str) -> str:
    """``text`` as the text encoder takes it: at most :data:`MAX_TEXT_TOKENS` tokens (cut, logged).
    Attention cost grows with the square of the length, and T5 saw no longer text in training."""
    ids = tokenizer(text).input_ids
    if len(ids) <= MAX_TEXT_TOKENS:
        return text
    keep = MAX_TEXT_TOKENS - 1  # room for the end-of-sequence token
    cut = text
    while len(tokenizer(cut).input_ids) > MAX_TEXT_TOKENS and keep > 0:
        cut = tokenizer.decode(ids[:keep], skip_special_tokens=True)
        keep -= 8
    log.info(
        "dataset: a caption of %d tokens was cut to the text encoder's %d (%r...)", len(ids), MAX_TEXT_TOKENS, cut[:60]
    )
    return cut


def _compute(
    model: tp.Any,
    segments: tp.Iterable[tp.Any],
    instance_prompt: str,
    cancelled: tp.Callable[[], bool],
    seed: int,
    total_seconds: tp.Optional[float],
) -> Features:
    from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout

    from ..audio import codec
    from ..generation.seeding import demucs_random

    start = time.perf_counter()
    lm, device, rate = model.lm, model.device, model.sample_rate
    provider = lm.condition_provider
    text_cond = provider.conditioners[TEXT]
    melody_cond = provider.conditioners[MELODY] if MELODY in provider.conditioners else None
    features = Features(examples=[], frame_rate=float(model.frame_rate))
    fitted: tp.Dict[str, str] = {}  # caption as given -> as the encoder takes it

    def caption_of(segment: tp.Any) -> str:
        given = segment.caption if segment.caption is not None else instance_prompt
        if given not in fitted:
            fitted[given] = fit_caption(text_cond.t5_tokenizer, given)
            caption = fitted[given]
            if caption not in features.text:
                tokens = provider.tokenize([_attributes(caption, None, rate, melody_cond is not None, device)])[TEXT]
                states = text_cond.t5(**tokens).last_hidden_state[0]
                features.text[caption] = states[: int(tokens["attention_mask"][0].sum())].float().cpu()
        return fitted[given]

    longest: tp.Any = None  # the first of the longest segments: the null melody is padded to its length
    done, next_report = 0.0, 0.1
    for i, s in enumerate(segments):
        if cancelled():
            break
        caption = caption_of(s)
        wav = s.wav.to(device)
        if melody_cond is not None and (longest is None or wav.shape[-1] > longest.shape[-1]):
            longest = wav
        codes = codec.encode(model.compression_model, wav[None])[0]
        melody = None
        if melody_cond is not None:
            tokenized = provider.tokenize([_attributes("", wav, rate, True, device)])[MELODY]
            with demucs_random(segment_seed(seed, i)):
                melody = melody_cond._get_wav_embedding(tokenized)[0].float().cpu()
        features.examples.append(
            Example(codes=codes.to(torch.int16).cpu(), caption=caption, melody=melody, source=s.source, start=s.start)
        )
        done += wav.shape[-1] / rate
        if total_seconds and done / max(total_seconds, 1e-9) >= next_report:
            log.info(
                "tokenizing: %.0f s of %.0f s of audio (%d segments), %.1f s elapsed",
                done,
                total_seconds,
                len(features.examples),
                time.perf_counter() - start,
            )
            next_report += 0.1
    features.text = dict(sorted(features.text.items()))
    if melody_cond is not None and longest is not None:
        # the null melody as guidance computes it: tokenized beside a real one (so padded to its length)
        real = _attributes("", longest, rate, True, device)
        both = provider.tokenize([real] + ClassifierFreeGuidanceDropout(p=1.0)([real]))[MELODY]
        with demucs_random(segment_seed(seed, -1)):
            features.null_melody = melody_cond._get_wav_embedding(both)[1].float().cpu()
    features.seconds = done
    seconds = time.perf_counter() - start
    log.info(
        "tokenized %.0f s of audio in %.1f s (%.2f s per minute of audio)%s",
        done,
        seconds,
        60 * seconds / max(done, 1e-9),
        ", with the melody's chroma" if melody_cond is not None else "",
    )
    return features


def conditions(
    lm: tp.Any, features: Features, batch: tp.Sequence[Example], drop_all: torch.Tensor, drop_melody: torch.Tensor
) -> tp.Dict[str, tp.Tuple[torch.Tensor, torch.Tensor]]:
    """The LM's condition tensors for ``batch`` (as its condition provider would give them),
    with the dropout decisions given (bool per example): ``drop_all`` (classifier-free guidance: every
    condition null) and ``drop_melody`` (the melody alone)."""
    conditioners = lm.condition_provider.conditioners
    device = next(lm.parameters()).device
    out: tp.Dict[str, tp.Tuple[torch.Tensor, torch.Tensor]] = {}
    # text: T5 states padded to the longest caption, zeros under a zero mask for a dropped one
    text_cond = conditioners[TEXT]
    states = [
        features.text[e.caption] if not drop_all[i] else features.text[e.caption][:0] for i, e in enumerate(batch)
    ]
    length = max(1, max(s.shape[0] for s in states))
    dim = next(iter(features.text.values())).shape[-1]
    pre = torch.zeros(len(batch), length, dim, device=device)
    mask = torch.zeros(len(batch), length, dtype=torch.long, device=device)
    for i, s in enumerate(states):
        pre[i, : s.shape[0]] = s.to(device)
        mask[i, : s.shape[0]] = 1
    embeds = text_cond.output_proj(pre.to(text_cond.output_proj.weight))  # T5Conditioner.forward, after T5
    out[TEXT] = (embeds * mask.unsqueeze(-1), mask)
    melody_cond = conditioners[MELODY] if MELODY in conditioners else None
    if melody_cond is not None:
        rows = [features.null_melody if drop_all[i] or drop_melody[i] else e.melody for i, e in enumerate(batch)]
        pre = torch.stack([r.to(device) for r in rows])
        embeds = melody_cond.output_proj(pre.to(melody_cond.output_proj.weight))  # WaveformConditioner.forward
        mask = torch.ones_like(embeds[..., 0])  # (served with _use_masking off: match_len_on_eval)
        out[MELODY] = (embeds * mask.unsqueeze(-1), mask)
    return out


def dropout_probabilities(lm: tp.Any) -> tp.Tuple[float, float]:
    """The LM's own classifier-free-guidance dropout and melody attribute dropout probabilities."""
    p_all = float(lm.cfg_dropout.p)
    p_melody = float(lm.att_dropout.p.get("wav", {}).get(MELODY, 0.0)) if hasattr(lm.att_dropout, "p") else 0.0
    return p_all, p_melody
