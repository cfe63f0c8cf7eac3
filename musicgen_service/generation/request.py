"""A validated, typed generation request, and every rule an input must follow.

``parse_request`` takes ``predict()``'s arguments as they arrive (from the Cog
server, ``cog predict`` or the local command line), checks every field and
every cross-field rule, and either returns a :class:`Request` or raises one
:class:`~musicgen_service.core.errors.InputError` naming each offending field and
its rule. Nothing here touches a model, so a bad request fails in microseconds.
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from ..audio import looping
from ..audio.input_audio import MAX_SECONDS as MAX_INPUT_AUDIO_SECONDS
from ..core.errors import InputError
from ..core.limits import MAX_SEED, MAX_TEXT_CHARS

NORMALIZATION_STRATEGIES = ("loudness", "clip", "peak", "rms")
OUTPUT_FORMATS = ("wav", "mp3")
# Sampling at a temperature this low is the most likely token (greedy decoding): below it, logits /
# temperature overflows float32 for temperatures a JSON number can still give (1e-40: inf, then NaN).
GREEDY_BELOW = 0.01
# Guidance weights past a few tens give noise; past ~1e37, (cond - uncond) * cfg overflows float32 and
# an integer beyond float range cannot even be converted. The rule keeps every value finite.
MAX_GUIDANCE = 1000


@dataclass(frozen=True)
class Capabilities:
    """What the loaded model can do; the rules that depend on the model read it."""

    max_duration: int  # longest request allowed (seconds, a setting)
    card: int  # codebook size: the largest meaningful top_k
    melody: bool = True  # has a chroma (melody) conditioner
    name: str = "the model"
    mbd_unavailable: tp.Optional[str] = None  # why multi_band_diffusion can't be used, if it can't
    negative_unavailable: tp.Optional[str] = None  # why negative_prompt can't be used, if it can't


@dataclass(frozen=True)
class Request:
    prompt: tp.Optional[str]
    input_audio: tp.Optional[Path]
    duration: int
    continuation: bool
    continuation_start: int
    continuation_end: tp.Optional[int]  # None: the end of the clip
    multi_band_diffusion: bool
    normalization_strategy: str
    top_k: int
    top_p: float
    temperature: float
    classifier_free_guidance: int
    output_format: str
    seed: tp.Optional[int]  # None: pick a random seed
    # the text guidance steers away from (the unconditional branch's text; None: stock's empty one)
    negative_prompt: tp.Optional[str] = None

    @property
    def greedy(self) -> bool:
        """Whether the temperature is so low that sampling is the most likely token (:data:`GREEDY_BELOW`)."""
        return self.temperature < GREEDY_BELOW

    @property
    def mode(self) -> str:
        if self.input_audio is None:
            return "text"
        return "continuation" if self.continuation else "melody"


def _shown(value: tp.Any) -> str:
    """A value as a message quotes it: a number of hundreds of digits (JSON allows them) is shortened."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return "a number of thousands of digits"
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} characters)"


def parse_request(
    caps: Capabilities,
    *,
    prompt: tp.Optional[str] = None,
    input_audio: tp.Optional[tp.Union[str, Path]] = None,
    duration: int = 8,
    continuation: bool = False,
    continuation_start: int = 0,
    continuation_end: tp.Optional[int] = None,
    multi_band_diffusion: bool = False,
    normalization_strategy: str = "loudness",
    top_k: int = 250,
    top_p: float = 0.0,
    temperature: float = 1.0,
    classifier_free_guidance: int = 3,
    output_format: str = "wav",
    seed: tp.Optional[int] = None,
) -> Request:
    """Check every input; raise one InputError listing all the problems found."""
    problems: tp.List[tp.Tuple[str, str]] = []

    def bad(field: str, rule: str) -> None:
        problems.append((field, rule))

    text = prompt.strip() if isinstance(prompt, str) else None
    audio = Path(input_audio) if input_audio is not None else None
    if not text and audio is None:
        bad("prompt", "describe the music you want (it may only be empty when input_audio is given)")
    _check_text(bad, "prompt", text)

    if not 1 <= duration <= caps.max_duration:
        bad("duration", f"must be between 1 and {caps.max_duration} seconds (got {_shown(duration)})")

    if continuation_start < 0:
        bad("continuation_start", f"must be >= 0 seconds (got {_shown(continuation_start)})")
    elif continuation_start > MAX_INPUT_AUDIO_SECONDS:  # (it selects seconds of input_audio)
        bad(
            "continuation_start",
            f"must be at most {MAX_INPUT_AUDIO_SECONDS:g} seconds, the longest input_audio "
            f"(got {_shown(continuation_start)})",
        )
    end = None if continuation_end in (None, -1) else continuation_end
    if end is not None and end < 0:
        bad("continuation_end", f"must be -1 or None (the end of the clip) or >= 0 seconds (got {_shown(end)})")
    elif end is not None and end <= continuation_start:
        bad(
            "continuation_end",
            f"must be greater than continuation_start ({_shown(continuation_start)}); "
            f"got {_shown(end)}. Use -1 or leave it empty for the end of the clip",
        )
    if audio is None:
        if continuation:
            bad("continuation", "needs input_audio: the music to continue")
        if continuation_start != 0 or end is not None:
            bad(
                "continuation_start" if continuation_start != 0 else "continuation_end",
                "selects part of input_audio, but no input_audio was given",
            )

    if normalization_strategy not in NORMALIZATION_STRATEGIES:
        bad(
            "normalization_strategy",
            f"must be one of {', '.join(NORMALIZATION_STRATEGIES)} (got {normalization_strategy!r})",
        )
    _check_output_format(bad, output_format)

    _check_sampling(bad, caps, top_k, top_p, temperature, classifier_free_guidance)
    seed_value = _check_seed(bad, seed)
    if audio is not None and not continuation and not caps.melody:
        bad(
            "input_audio",
            f"{caps.name} has no melody conditioning: set continuation to true to "
            "continue the audio instead, or serve a melody model",
        )

    if multi_band_diffusion and caps.mbd_unavailable:
        bad("multi_band_diffusion", caps.mbd_unavailable)

    if problems:
        raise InputError(problems)
    return Request(
        prompt=text or None,
        input_audio=audio,
        duration=int(duration),
        continuation=bool(continuation),
        continuation_start=int(continuation_start),
        continuation_end=end,
        multi_band_diffusion=bool(multi_band_diffusion),
        normalization_strategy=normalization_strategy,
        top_k=int(top_k),
        top_p=float(top_p),
        temperature=float(temperature),
        classifier_free_guidance=int(classifier_free_guidance),
        output_format=output_format,
        seed=seed_value,
    )


Bad = tp.Callable[[str, str], None]  # records one (field, rule) problem


def _check_text(bad: Bad, field: str, text: tp.Optional[str]) -> None:
    if text and len(text) > MAX_TEXT_CHARS:
        bad(field, f"must be at most {MAX_TEXT_CHARS} characters (got {len(text)})")


def _check_output_format(bad: Bad, output_format: tp.Any) -> None:
    if output_format not in OUTPUT_FORMATS:
        bad("output_format", f"must be one of {', '.join(OUTPUT_FORMATS)} (got {output_format!r})")


def _check_sampling(
    bad: Bad, caps: Capabilities, top_k: int, top_p: float, temperature: float, classifier_free_guidance: int
) -> None:
    """The sampling rules every model shares."""
    if not 0 <= top_k <= caps.card:
        bad("top_k", f"must be between 0 and {caps.card}, the model's codebook size (got {_shown(top_k)})")
    if not (math.isfinite(top_p) and 0.0 <= top_p <= 1.0):
        bad("top_p", f"must be between 0 and 1 (got {_shown(top_p)})")
    if not (math.isfinite(temperature) and temperature > 0):
        bad("temperature", f"must be greater than 0 (got {_shown(temperature)})")
    if classifier_free_guidance < 0:
        bad("classifier_free_guidance", f"must be >= 0 (got {_shown(classifier_free_guidance)})")
    elif classifier_free_guidance > MAX_GUIDANCE:
        bad("classifier_free_guidance", f"must be at most {MAX_GUIDANCE} (got {_shown(classifier_free_guidance)})")


def _check_seed(bad: Bad, seed: tp.Optional[int]) -> tp.Optional[int]:
    """The seed to use (None: a random one), after its rule."""
    seed_value = None if seed in (None, -1) else seed
    if seed_value is not None and not 0 <= seed_value <= MAX_SEED:
        bad("seed", f"must be -1 or None (random) or between 0 and {MAX_SEED} (got {_shown(seed)})")
    return seed_value


# ---------------------------------------------------------------------------- the loop model

BPM_RANGE = (40.0, 300.0)
BARS = (1, 2, 4, 8, 16)
BEATS_PER_BAR_RANGE = (2, 12)
VARIATIONS_RANGE = (1, 8)


@dataclass(frozen=True)
class LoopRequest:
    """The loop model's request (:mod:`..serving.loops`): loops of ``bars`` bars at ``bpm``."""

    prompt: str
    negative_prompt: tp.Optional[str]
    bpm: float
    bars: int
    beats_per_bar: int
    variations: int
    input_audio: tp.Optional[Path]  # a melody for the first loop
    top_k: int
    top_p: float
    temperature: float
    classifier_free_guidance: int
    output_format: str
    seed: tp.Optional[int]

    @property
    def beats(self) -> int:
        return self.bars * self.beats_per_bar

    @property
    def seconds(self) -> float:
        """A loop's exact length."""
        return self.beats * 60.0 / self.bpm

    def generation(self, seconds: int, seed: int, continued: tp.Optional[Path] = None) -> Request:
        """The main model's request that generates one loop's audio: the tempo in the prompt's words
        (the model was trained on captions that name it), ``seconds`` of new audio; ``continued``:
        audio to continue (a variation), else the melody, if any."""
        return Request(
            prompt=f"{self.prompt}, {self.bpm:g} bpm",
            input_audio=continued if continued is not None else self.input_audio,
            duration=seconds,
            continuation=continued is not None,
            continuation_start=0,
            continuation_end=None,
            multi_band_diffusion=False,
            normalization_strategy="loudness",
            top_k=self.top_k,
            top_p=self.top_p,
            temperature=self.temperature,
            classifier_free_guidance=self.classifier_free_guidance,
            output_format=self.output_format,
            seed=seed,
            negative_prompt=self.negative_prompt,
        )


def parse_loop_request(
    caps: Capabilities,
    *,
    prompt: tp.Optional[str] = None,
    negative_prompt: tp.Optional[str] = "",
    bpm: float = 120.0,
    bars: int = 4,
    beats_per_bar: int = 4,
    variations: int = 4,
    input_audio: tp.Optional[tp.Union[str, Path]] = None,
    top_k: int = 250,
    top_p: float = 0.0,
    temperature: float = 1.0,
    classifier_free_guidance: int = 3,
    output_format: str = "wav",
    seed: tp.Optional[int] = None,
) -> LoopRequest:
    """Check every input of the loop model; raise one InputError listing all the problems found."""
    problems: tp.List[tp.Tuple[str, str]] = []

    def bad(field: str, rule: str) -> None:
        problems.append((field, rule))

    text = prompt.strip() if isinstance(prompt, str) else ""
    if not text:
        bad("prompt", "describe the music of the loop")
    _check_text(bad, "prompt", text)
    negative = negative_prompt.strip() if isinstance(negative_prompt, str) else ""
    _check_text(bad, "negative_prompt", negative)
    if negative and caps.negative_unavailable:
        bad("negative_prompt", caps.negative_unavailable)
    low, high = BPM_RANGE
    bpm_ok = isinstance(bpm, (int, float)) and math.isfinite(bpm) and low <= bpm <= high
    if not bpm_ok:
        bad("bpm", f"must be between {low:g} and {high:g} beats per minute (got {_shown(bpm)})")
    if bars not in BARS:
        bad("bars", f"must be one of {', '.join(map(str, BARS))} (got {_shown(bars)})")
    low_b, high_b = BEATS_PER_BAR_RANGE
    if not low_b <= beats_per_bar <= high_b:
        bad("beats_per_bar", f"must be between {low_b} and {high_b} (got {_shown(beats_per_bar)})")
    low_v, high_v = VARIATIONS_RANGE
    if not low_v <= variations <= high_v:
        bad("variations", f"must be between {low_v} and {high_v} (got {_shown(variations)})")
    if bpm_ok and bars in BARS and low_b <= beats_per_bar <= high_b:
        needed = looping.generation_seconds(bpm, bars, beats_per_bar)
        if needed > caps.max_duration:
            bad(
                "bars",
                f"{bars} bars of {beats_per_bar} beats at {bpm:g} BPM is {bars * beats_per_bar * 60 / bpm:.0f} s "
                f"of loop, {needed} s to generate, past this deployment's {caps.max_duration} s: "
                "ask for fewer bars or a faster tempo",
            )
    audio = Path(input_audio) if input_audio is not None else None
    if audio is not None and not caps.melody:
        bad("input_audio", f"{caps.name} has no melody conditioning: serve a melody model to loop a melody")
    _check_sampling(bad, caps, top_k, top_p, temperature, classifier_free_guidance)
    _check_output_format(bad, output_format)
    seed_value = _check_seed(bad, seed)
    if problems:
        raise InputError(problems)
    return LoopRequest(
        prompt=text,
        negative_prompt=negative or None,
        bpm=float(bpm),
        bars=int(bars),
        beats_per_bar=int(beats_per_bar),
        variations=int(variations),
        input_audio=audio,
        top_k=int(top_k),
        top_p=float(top_p),
        temperature=float(temperature),
        classifier_free_guidance=int(classifier_free_guidance),
        output_format=output_format,
        seed=seed_value,
    )
