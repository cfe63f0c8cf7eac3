"""The one exception type for mistakes a user can fix by changing an input."""
from __future__ import annotations

import typing as tp


class InputError(ValueError):
    """One or more inputs break a rule. The message names each field and its rule.

    Raised before any model work, so a failed request costs nothing. Anything
    else that escapes ``predict()`` is a bug or an operational fault.
    """

    def __init__(self, problems: tp.Sequence[tp.Tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{field}: {rule}" for field, rule in self.problems))

    @property
    def fields(self) -> tp.List[str]:
        return [field for field, _ in self.problems]


class Cancelled(Exception):
    """The prediction was cancelled while it waited for the LM or decoded (not an error)."""
