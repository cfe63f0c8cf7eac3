"""The exceptions a person can act on, defined once: a request's (or a training's) input that breaks a
rule, a deployment that cannot start as configured, and a cancel. Anything else that escapes is a bug
or an operational fault.

Raised where each rule lives (the request's, the dataset's, the weights folder's...), always with a
message that names what to change.
"""

from __future__ import annotations

import typing as tp


class InputError(ValueError):
    """One or more inputs break a rule. The message names each field and its rule.

    Raised before any model work, so a failed request costs nothing.
    """

    def __init__(self, problems: tp.Sequence[tp.Tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{field}: {rule}" for field, rule in self.problems))

    @property
    def fields(self) -> tp.List[str]:
        return [field for field, _ in self.problems]


class SetupError(Exception):
    """The deployment cannot start as configured; the message says what is wrong and how to fix it
    (the command line tools print it as one line)."""


class SettingsError(SetupError, ValueError):
    """An environment variable holds a value the service cannot use."""


class WeightsMissingError(SetupError, FileNotFoundError):
    """A checkpoint file the configured model needs is not in the weights folder."""


class DownloadError(SetupError, RuntimeError):
    """A file could not be fetched from the hub; the message says why and what to do."""


class TrainedError(SetupError, ValueError):
    """A trained file that cannot be served here (the message says why and what to do)."""


class Cancelled(Exception):
    """The prediction (or training) was cancelled while it waited or worked (not an error)."""
