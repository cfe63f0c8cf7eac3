"""Cog training entry point (``cog train``, ``POST /trainings``, ``script/train``): the inputs and
nothing else of substance. The work happens in ``musicgen_service.training`` (start to end:
``training/run.py``); every input is checked there, with a message naming it, before any training.

As predict.py, every ``Input()`` argument is a plain literal (Cog's static schema parser reads them).
``train`` is async because the image's ``COG_MAX_CONCURRENCY`` (cog.yaml's ``concurrency.max``)
applies to the training server too, and coglet refuses a sync function above 1: the work runs in a
thread, one training at a time per process (others wait their turn), and a cancel stops it within
an update.
"""

import asyncio
import threading
from typing import Optional

from cog import BaseModel, Input, Path


class TrainingOutput(BaseModel):
    weights: Path  # the trained file: serve it as COG_WEIGHTS (a trained version) or MUSICGEN_TRAINED
    loss_curve: Path
    sample_before: Optional[Path] = None
    sample_after: Optional[Path] = None


async def train(
    dataset: Path = Input(
        description="Your music: a zip or tar (.tar, .tar.gz) archive of audio files (wav, mp3, flac, ogg, opus, m4a...) in any folders, or one audio file. A same-name .txt beside an audio file is its caption. Long files are cut into 30 s segments; shorter ones train at their own length."
    ),
    base_model: Optional[str] = Input(
        description="The MusicGen model to fine-tune, from this deployment's weights folder (training never downloads). Empty: the model this deployment serves.",
        default=None,
    ),
    method: str = Input(
        description="lora: small adapters on the transformer's projections and output heads (tens of MB, keeps the model's general ability); full: every LM weight (a whole model's size).",
        default="lora",
        choices=["lora", "full"],
    ),
    lora_rank: int = Input(description="Rank of the LoRA adapters (method lora).", default=16, ge=1, le=512),
    epochs: int = Input(description="Passes over the dataset.", default=4, ge=0, le=1000),
    max_steps: int = Input(description="At most this many updates (0: as many as the epochs take).", default=0, ge=0),
    batch_size: int = Input(description="Segments per update.", default=4, ge=1, le=256),
    gradient_accumulation: int = Input(
        description="Micro-batches each update is computed in (it must divide batch_size): less memory, same update.",
        default=1,
        ge=1,
        le=256,
    ),
    learning_rate: float = Input(
        description="Peak learning rate (warmup, then cosine decay). 0: the method's default, 2e-4 for lora, 1e-5 for full.",
        default=0.0,
        ge=0.0,
        le=0.1,
    ),
    caption: str = Input(
        description="The caption of every clip without its own .txt (an instance prompt, e.g. 'in the style of my band'). Empty: those clips train without text.",
        default="",
    ),
    drop_vocals: bool = Input(
        description="Remove vocals from the dataset first (HTDemucs from the weights folder).", default=False
    ),
    gradient_checkpointing: bool = Input(
        description="Recompute activations in the backward pass: less memory, about a third more time.", default=False
    ),
    seed: Optional[int] = Input(
        description="Seed for the run (order, dropout, adapter init, samples). None or -1: random.",
        default=None,
        ge=-1,
        le=4294967295,
    ),
) -> TrainingOutput:
    from musicgen_service.training.entry import train as run_training

    cancel = threading.Event()
    try:
        out = await asyncio.to_thread(
            run_training,
            dataset=dataset,
            base_model=base_model,
            method=method,
            lora_rank=lora_rank,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            gradient_accumulation=gradient_accumulation,
            learning_rate=learning_rate,
            caption=caption,
            drop_vocals=drop_vocals,
            gradient_checkpointing=gradient_checkpointing,
            seed=seed,
            cancelled=cancel.is_set,
        )
    except asyncio.CancelledError:
        cancel.set()
        raise
    if out is None:  # a process of a torchrun-launched run other than rank 0: rank 0 returns the files
        return None  # type: ignore[return-value]
    return TrainingOutput(
        weights=Path(out.weights),
        loss_curve=Path(out.loss_curve),
        sample_before=Path(out.sample_before) if out.sample_before else None,
        sample_after=Path(out.sample_after) if out.sample_after else None,
    )
