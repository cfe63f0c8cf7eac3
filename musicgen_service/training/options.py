"""A training run's settings, validated: every rule and its message, checked before any work.

``train.py`` (Cog) and ``script/train`` pass their inputs to :func:`parse`; a setting that cannot work
(batch size 0, a LoRA rank above the layer width, a base model missing from the weights folder,
vocal removal without HTDemucs) raises one :class:`~..core.errors.InputError` naming each field and its
rule. The rules that need the base model's shape read its checkpoint's config, not its weights.

Defaults, for ~10-30 minutes of music (20-60 segments of 30 s):

- ``method=lora``, ``lora_rank=16``: a LoRA of rank 16 on every projection and head of the default
  3.3B model is ~26M parameters (~52 MB in fp16, a tenth of a percent of the model): enough to take on
  a style from tens of minutes of audio without forgetting the rest, and fast and small to serve.
- ``epochs=4``, ``learning_rate`` 2e-4 (LoRA) / 1e-5 (full): the LoRA anchor's (27 minutes of music,
  4 epochs, 2e-4: a good result, not a memorised one); a full fine-tune moves every weight, so its
  rate is an order of magnitude lower, near audiocraft's own pre-training rate.
- ``batch_size=4`` segments per update (30 s each: 6,000 frames of tokens), ``gradient_accumulation=1``:
  40-60 updates over 4 epochs of 30 minutes; on 24 GB GPUs the LoRA fits at batch 4 with gradient
  checkpointing.
- warmup 5% of the updates, then cosine decay to 10% of the rate; gradient norm clipped at 1.0
  (audiocraft's ``optim.max_norm``); AdamW with audiocraft's betas (0.9, 0.95), weight decay 0 for
  LoRA and 0.01 for full.
"""

from __future__ import annotations

import typing as tp
from dataclasses import asdict, dataclass

from ..core.errors import InputError
from ..core.limits import MAX_SEED, MAX_TEXT_CHARS
from ..generation.seeding import random_seed

METHODS = ("lora", "full")
DEFAULT_LR = {"lora": 2e-4, "full": 1e-5}
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1
MAX_GRAD_NORM = 1.0
BETAS = (0.9, 0.95)
WEIGHT_DECAY = {"lora": 0.0, "full": 0.01}


@dataclass(frozen=True)
class Options:
    base_model: str
    method: str = "lora"
    lora_rank: int = 16
    epochs: int = 4
    max_steps: int = 0  # 0: as many as the epochs take
    batch_size: int = 4
    gradient_accumulation: int = 1
    learning_rate: float = DEFAULT_LR["lora"]
    caption: str = ""
    drop_vocals: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0

    @property
    def lora_alpha(self) -> float:
        return float(self.lora_rank)  # scale alpha / rank = 1: the rate alone sets the step size

    def asdict(self) -> tp.Dict[str, tp.Any]:
        return asdict(self)


def parse(
    *,
    base_model: tp.Optional[str],
    default_model: str,
    method: str = "lora",
    lora_rank: int = 16,
    epochs: int = 4,
    max_steps: int = 0,
    batch_size: int = 4,
    gradient_accumulation: int = 1,
    learning_rate: tp.Optional[float] = None,
    caption: tp.Optional[str] = "",
    drop_vocals: bool = False,
    gradient_checkpointing: bool = False,
    seed: tp.Optional[int] = None,
    model_width: tp.Optional[tp.Callable[[str], int]] = None,
) -> Options:
    """Check every setting; one InputError listing all the problems. ``model_width(base)``: the
    smallest side of the base model's adapted matrices (raises InputError if the model is not in the
    weights folder); ``seed`` None or -1: a random one."""
    problems: tp.List[tp.Tuple[str, str]] = []

    def bad(name: str, rule: str) -> None:
        problems.append((name, rule))

    base = (base_model or "").strip() or default_model
    if method not in METHODS:
        bad("method", f"must be one of {', '.join(METHODS)} (got {method!r})")
    if batch_size < 1:
        bad("batch_size", f"must be at least 1 (got {batch_size})")
    if gradient_accumulation < 1:
        bad("gradient_accumulation", f"must be at least 1 (got {gradient_accumulation})")
    elif batch_size >= 1 and batch_size % gradient_accumulation:
        bad(
            "gradient_accumulation",
            f"must divide batch_size ({batch_size}) into equal micro-batches (got {gradient_accumulation})",
        )
    if epochs < 1 and max_steps < 1:
        bad("epochs", f"must be at least 1, or max_steps set (got epochs={epochs}, max_steps={max_steps})")
    if epochs < 0:
        bad("epochs", f"must be >= 0 (got {epochs})")
    if max_steps < 0:
        bad("max_steps", f"must be >= 0; 0 means as many as the epochs take (got {max_steps})")
    lr = DEFAULT_LR.get(method, DEFAULT_LR["lora"]) if learning_rate in (None, 0) else float(learning_rate)
    if not 0 < lr <= 0.1:
        bad("learning_rate", f"must be greater than 0 and at most 0.1 (got {learning_rate})")
    if method == "lora" and lora_rank < 1:
        bad("lora_rank", f"must be at least 1 (got {lora_rank})")
    if seed not in (None, -1) and not 0 <= int(seed) <= MAX_SEED:
        bad("seed", f"must be -1 or None (random) or between 0 and {MAX_SEED} (got {seed})")
    text = (caption or "").strip()
    if len(text) > MAX_TEXT_CHARS:
        bad("caption", f"must be at most {MAX_TEXT_CHARS} characters (got {len(text)})")
    if model_width is not None:
        try:
            width = model_width(base)
        except InputError as exc:
            problems.extend(exc.problems)
        else:
            if method == "lora" and lora_rank > width:
                bad("lora_rank", f"must be at most {width}, the narrowest adapted matrix of {base} (got {lora_rank})")
    if problems:
        raise InputError(problems)
    return Options(
        base_model=base,
        method=method,
        lora_rank=int(lora_rank),
        epochs=int(epochs),
        max_steps=int(max_steps),
        batch_size=int(batch_size),
        gradient_accumulation=int(gradient_accumulation),
        learning_rate=lr,
        caption=text,
        drop_vocals=bool(drop_vocals),
        gradient_checkpointing=bool(gradient_checkpointing),
        seed=random_seed() if seed in (None, -1) else int(seed),
    )
