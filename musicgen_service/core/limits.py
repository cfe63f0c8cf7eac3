"""Limits that predictions and trainings share (each is a rule of both)."""

from __future__ import annotations

MAX_SEED = 2**32 - 1  # a seed is a 32-bit unsigned integer (numpy's generators take no more)
MAX_TEXT_CHARS = 2000  # a prompt, a caption: far beyond what T5's 512 tokens hold of English
