"""One training run, start to end: settings and dataset checked, tokens, training, the trained file.

Order (everything a user can get wrong is refused before the model loads, and nothing is returned
unless the whole run succeeded):

1. settings (:mod:`.options`; the base model must be in the weights folder: training never downloads);
2. the dataset unpacked into the run's own folder, its audio found and cut (:mod:`.dataset`);
3. the base model loaded as the service loads it (:mod:`..weights.loading`); vocals removed if asked (the
   HTDemucs of the weights folder); codes and condition features computed once (:mod:`.tokens`);
4. a sample of the base model (the prompt of the first segment, the run's seed);
5. LoRA attached (:mod:`.adapters`) or every LM weight made trainable; the updates (:mod:`.loop`), in
   this process, or in one process per GPU when several are visible;
6. the trained file (:mod:`..weights.trained`), the loss curve, and the same sample from the trained model.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import Cancelled, InputError
from ..core.logs import get_logger
from ..core.settings import Settings
from ..weights import hub as weights
from ..weights import lora, trained
from . import adapters, allocator, base_model, dataset, loop, parallel, tokens
from .options import Options

if tp.TYPE_CHECKING:
    from audiocraft.models import MusicGen

log = get_logger()

SAMPLE_SECONDS = 8


@dataclass
class TrainingResult:
    """What a training returns (train.py's TrainingOutput): the files, and the manifest written."""

    weights: Path
    loss_curve: Path
    sample_before: tp.Optional[Path]
    sample_after: tp.Optional[Path]
    manifest: tp.Dict[str, tp.Any]


def model_width(settings: Settings) -> tp.Callable[[str], int]:
    """For :func:`.options.parse`: the narrowest adapted matrix of a base model, read from its
    checkpoint's config; InputError (``base_model``) when the model or its conditioners are not in
    the weights folder."""

    def width(base: str) -> int:
        try:
            folder = weights.musicgen_folder(settings.weights_dir, base)
            cfg = weights.read_lm_config(folder / weights.LM_FILE)
            weights.require(settings.weights_dir, weights.conditioner_files(cfg), f"the model {base}")
        except weights.WeightsMissingError as exc:
            raise InputError(
                [("base_model", f"{base} is not in the weights folder; training never downloads: {exc}")]
            ) from None
        return lora.max_rank(int(cfg.transformer_lm.dim), int(cfg.transformer_lm.card))

    return width


def require_demucs(settings: Settings) -> None:
    try:
        weights.require(
            settings.weights_dir, [weights.HubFile(weights.DEMUCS_REPO, f) for f in weights.DEMUCS_FILES], "drop_vocals"
        )
    except weights.WeightsMissingError as exc:
        raise InputError([("drop_vocals", f"needs HTDemucs in the weights folder: {exc}")]) from None


def prepare_dataset(
    path: Path, folder: Path, sample_rate: int, channels: int, window: float, cancelled: tp.Callable[[], bool]
) -> tp.Tuple[Path, dataset.Plan]:
    """The dataset unpacked into ``folder`` and gone through once (:func:`.dataset.plan`): every
    refusal happens here, before the model loads; the audio is decoded again as it is tokenized."""
    start = time.perf_counter()
    root = dataset.unpack(path, folder, cancelled)
    found = dataset.collect(root)
    if not found.audio:
        listed = ", ".join(name for name, _ in found.skipped[:5]) or "nothing"
        raise InputError([(dataset.FIELD, f"holds no audio file (wav, mp3, flac, ogg, opus, m4a...; found {listed})")])
    plan = dataset.plan(root, found, sample_rate, channels, window, cancelled)
    dataset.describe_skipped(found)
    if not plan.summary["segments"]:
        raise InputError(
            [
                (
                    dataset.FIELD,
                    f"no usable audio: every file is shorter than "
                    f"{dataset.MIN_SEGMENT_SECONDS:g} s or could not be decoded "
                    f"({'; '.join(f'{n}: {w}' for n, w in found.skipped[:5])})",
                )
            ]
        )
    summary = plan.summary
    log.info(
        "dataset: %d segments (%.0f s) from %d file(s), %d captioned, %d file(s) skipped; checked in %.1f s",
        summary["segments"],
        summary["seconds"],
        summary["audio_files"],
        summary["captioned_segments"],
        len(found.skipped),
        time.perf_counter() - start,
    )
    return root, plan


def _melody_conditioner(model: tp.Any) -> tp.Any:
    conditioners = model.lm.condition_provider.conditioners
    return conditioners[tokens.MELODY] if tokens.MELODY in conditioners else None


def without_vocals(model: tp.Any, segs: tp.Iterable[dataset.Segment]) -> tp.Iterator[dataset.Segment]:
    """Each segment as its mix without the vocals stem (HTDemucs: drums + bass + other), as they come."""
    from demucs import pretrained
    from demucs.apply import apply_model
    from demucs.audio import convert_audio

    start = time.perf_counter()
    melody = _melody_conditioner(model)
    demucs = melody.demucs if melody is not None else pretrained.get_model("htdemucs").to(model.device)
    keep = [i for i, name in enumerate(demucs.sources) if name != "vocals"]
    count = 0
    for s in segs:
        wav = convert_audio(s.wav[None].to(model.device), model.sample_rate, demucs.samplerate, demucs.audio_channels)
        with torch.no_grad():
            stems = apply_model(demucs, wav, device=model.device)
        mix = stems[:, keep].sum(1)
        s.wav = convert_audio(mix, demucs.samplerate, model.sample_rate, model.audio_channels)[0].cpu()
        count += 1
        yield s
    log.info("removed vocals from %d segments in %.1f s", count, time.perf_counter() - start)


def sample(model: tp.Any, prompt: str, seed: int, seconds: int, folder: Path, name: str) -> Path:
    """``seconds`` of the model's music for ``prompt`` with ``seed``, as the service makes it."""
    from ..audio import output_audio
    from ..generation.generator import Generator
    from ..generation.request import Capabilities, parse_request

    mode = "fp16" if str(model.device).startswith("cuda") else "exact"
    generator = Generator(model, mode)
    caps = Capabilities(max_duration=max(seconds, 1), card=model.lm.card)
    wav = generator.generate(parse_request(caps, prompt=prompt or "music", duration=seconds, seed=seed)).wav
    wav = output_audio.normalize(wav, model.sample_rate, "loudness")
    return output_audio.write(wav, model.sample_rate, "wav", folder, stem=name)


def loss_curve(history: loop.History, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = range(1, len(history.losses) + 1)
    ax.plot(steps, history.losses, lw=1, color="#1f77b4", label="loss per update")
    if len(history.losses) >= 5:
        k = max(2, len(history.losses) // 10)
        smooth = [
            sum(history.losses[max(0, i - k + 1) : i + 1]) / len(history.losses[max(0, i - k + 1) : i + 1])
            for i in range(len(history.losses))
        ]
        ax.plot(steps, smooth, lw=2, color="#d62728", label=f"mean of {k}")
    ax.set_xlabel("update")
    ax.set_ylabel("cross-entropy (nats, mean over codebooks)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(
    dataset_path: Path,
    o: Options,
    settings: Settings,
    out_dir: Path,
    device: tp.Optional[str] = None,
    sample_seconds: int = SAMPLE_SECONDS,
    world: tp.Optional[int] = None,
    backend: tp.Optional[str] = None,
    cancelled: tp.Callable[[], bool] = lambda: False,
) -> tp.Optional[TrainingResult]:
    """The whole run (see the module docstring). ``world``: processes (default: the visible GPUs,
    else 1); ``backend``: their process group's (nccl on GPUs, gloo on CPUs). A process launched as
    one of several (torchrun: :class:`.parallel.Launch`) is one of them whatever ``world`` says, and
    only rank 0 returns a result."""
    start = time.perf_counter()
    device = device or settings.resolved_device()
    if device == "cpu":
        allocator.map_large_blocks()  # before the dataset and the model load too (logged by loop.train)
    weights.use_hub_cache(settings.weights_dir)
    if o.drop_vocals:
        require_demucs(settings)
    cfg = weights.read_lm_config(weights.musicgen_folder(settings.weights_dir, o.base_model) / weights.LM_FILE)
    work = Path(tempfile.mkdtemp(prefix="musicgen-train-", dir=out_dir))
    try:
        return _Run(o, settings, out_dir, device, sample_seconds, cancelled, work, cfg, start).execute(
            Path(dataset_path), world, backend
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class _Run:
    """One run's settings and places, and its steps (:meth:`execute`)."""

    o: Options
    settings: Settings
    out_dir: Path  # what is returned goes here
    device: str
    sample_seconds: int
    cancelled: tp.Callable[[], bool]
    work: Path  # the run's own folder (removed after it)
    cfg: tp.Any  # the base checkpoint's config: the model's rate, channels and training window
    start: float

    def execute(
        self, dataset_path: Path, world: tp.Optional[int], backend: tp.Optional[str]
    ) -> tp.Optional[TrainingResult]:
        launch = parallel.Launch.of(self.settings)
        if launch is None:
            return self._steps(dataset_path, world, backend, None)
        self.device = launch.device(self.device)
        with launch.joined(backend or ("nccl" if self.device.startswith("cuda") else "gloo")):
            return self._steps(dataset_path, launch.world, None, launch)

    def _steps(
        self,
        dataset_path: Path,
        world: tp.Optional[int],
        backend: tp.Optional[str],
        launch: tp.Optional[parallel.Launch],
    ) -> tp.Optional[TrainingResult]:
        """The run's steps; under a launch, rank 0 prepares and finishes, every rank trains (None
        returned on the others)."""
        o = self.o
        if launch is not None and launch.rank != 0:
            features = launch.share(None)
            model = base_model.load(self.settings, o.base_model, self.device)
            params, _ = base_model.trainable(model, o, o.seed)
            loop.train(model.lm, features, o, params, rank=launch.rank, world=launch.world)
            return None
        try:
            plan, model, features = self._prepare(dataset_path)
        except Exception as exc:
            if launch is not None:  # the other ranks are waiting for the dataset: tell them
                launch.share(None, f"rank 0 failed to prepare the dataset: {exc}")
            raise
        if launch is not None:
            launch.share(features)
        prompt = features.examples[0].caption
        before = self._sample(model, prompt, "sample-before")
        loss_before = loop.teacher_forced_loss(model.lm, features)
        world = world or (torch.cuda.device_count() if self.device.startswith("cuda") else 1) or 1
        model, state, history = self._train(model, features, world, backend, launch)
        loss_after = loop.teacher_forced_loss(model.lm, features)
        log.info("teacher-forced loss on the training set: %.4f before, %.4f after", loss_before, loss_after)
        manifest = self._manifest(state, history, world, plan.summary, loss_before, loss_after)
        name = f"{o.base_model.rsplit('/', 1)[-1]}-{o.method}.safetensors"
        path = trained.write(self.out_dir / name, state, manifest)
        curve = loss_curve(
            history,
            self.out_dir / "loss-curve.png",
            f"{o.base_model}, {o.method}: {len(history.losses)} updates, final loss {history.final_loss:.3f}",
        )
        if self.sample_seconds and o.method == "full":
            model.lm.to(next(model.lm.parameters()).dtype)
        after = self._sample(model, prompt, "sample-after")
        log.info(
            "trained file: %s (%.1f MB) in %.1f s; serve it with MUSICGEN_TRAINED=<file> (and "
            "MUSICGEN_MODEL=%s), or as COG_WEIGHTS of a trained version",
            path.name,
            path.stat().st_size / 1e6,
            time.perf_counter() - self.start,
            o.base_model,
        )
        return TrainingResult(
            weights=path, loss_curve=curve, sample_before=before, sample_after=after, manifest=manifest.as_dict()
        )

    def _prepare(self, dataset_path: Path) -> tp.Tuple[tp.Any, "MusicGen", tokens.Features]:
        """The dataset checked and planned, the base model, the tokens and conditions."""
        o, cfg = self.o, self.cfg
        sample_rate, channels = int(cfg.sample_rate), int(cfg.get("channels", 1))
        window = float(cfg.dataset.segment_duration)
        root, plan = prepare_dataset(dataset_path, self.work / "dataset", sample_rate, channels, window, self.cancelled)
        log.info(
            "base model: %s on %s (%s)",
            o.base_model,
            self.device,
            "LoRA rank %d" % o.lora_rank if o.method == "lora" else "full fine-tune",
        )
        model = base_model.load(self.settings, o.base_model, self.device)
        # the audio decoded again, segment by segment, as it is tokenized: never the whole dataset in memory
        segs = dataset.segments(root, plan.usable, sample_rate, channels, window, self.cancelled)
        if o.drop_vocals:
            segs = without_vocals(model, segs)
        features = tokens.compute(
            model, segs, o.caption, self.cancelled, seed=o.seed, total_seconds=plan.summary["seconds"]
        )
        if self.cancelled():
            raise Cancelled("training cancelled while tokenizing")
        return plan, model, features

    def _sample(self, model: "MusicGen", prompt: str, name: str) -> tp.Optional[Path]:
        if not self.sample_seconds:
            return None
        return sample(model, prompt, self.o.seed, self.sample_seconds, self.out_dir, name)

    def _train(
        self,
        model: "MusicGen",
        features: tokens.Features,
        world: int,
        backend: tp.Optional[str],
        launch: tp.Optional[parallel.Launch] = None,
    ) -> tp.Tuple["MusicGen", tp.Dict[str, torch.Tensor], loop.History]:
        """The updates, in this process, in ``world`` spawned processes, or as rank 0 of a launch; the
        model with the trained weights in, what the trained file holds (fp16), and the history."""
        o = self.o
        if world > 1 and launch is None:
            backend = backend or ("nccl" if self.device.startswith("cuda") else "gloo")
            log.info("data parallel: %d processes (%s)", world, backend)
            del model
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            state, history = parallel.train_processes(self.settings, o, features, world, backend, self.work)
            model = base_model.load(self.settings, o.base_model, self.device)
            if o.method == "lora":
                lora.merge(model.lm, state, o.lora_rank, o.lora_alpha)
            else:
                with torch.no_grad():
                    for name, p in model.lm.named_parameters():
                        p.copy_(state[name].to(p.dtype))
        else:
            params, loras = base_model.trainable(model, o, o.seed)
            if launch is not None:
                log.info("data parallel: rank 0 of %d launched processes", launch.world)
                history = loop.train(model.lm, features, o, params, rank=0, world=launch.world)
                history.tokens *= launch.world  # (each rank counts its own share, as spawned workers do)
            else:
                history = loop.train(model.lm, features, o, params, cancelled=self.cancelled)
            if loras:
                state = adapters.state(loras)
                adapters.detach_merged(model.lm, loras)
            else:
                state = {n: p.detach().to("cpu", torch.float16) for n, p in model.lm.named_parameters()}
        return model, {n: t.to(torch.float16) for n, t in state.items()}, history

    def _manifest(
        self,
        state: tp.Mapping[str, torch.Tensor],
        history: loop.History,
        world: int,
        summary: tp.Dict[str, tp.Any],
        loss_before: float,
        loss_after: float,
    ) -> trained.Manifest:
        o = self.o
        checkpoint = weights.musicgen_folder(self.settings.weights_dir, o.base_model) / weights.LM_FILE
        is_lora = o.method == "lora"
        return trained.Manifest(
            base_model=o.base_model,
            base_checkpoint=weights.checkpoint_identity(checkpoint),
            method=o.method,
            rank=o.lora_rank if is_lora else None,
            alpha=o.lora_alpha if is_lora else None,
            targets=lora.adapted(state) if is_lora else "all LM parameters",
            training={
                **o.asdict(),
                "steps": len(history.losses),
                "world": world,
                "seconds": round(history.seconds, 1),
                "tokens": history.tokens,
                "device": self.device,
            },
            dataset=summary,
            final_loss=history.final_loss,
            loss_before=loss_before,
            loss_after=loss_after,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
