"""Fine-tuning MusicGen on a user's own music: ``cog train`` (train.py) and ``script/train``.

dataset (archive -> segments) -> tokens (codes, condition features, once) -> adapters (LoRA) or the
whole LM -> loop (audiocraft's loss, AdamW, data parallel) -> the trained file (:mod:`..weights.trained`),
which ``setup(weights=...)`` / ``MUSICGEN_TRAINED`` serve. :mod:`.run` runs it start to end.
"""
