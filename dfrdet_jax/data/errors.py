"""Errors and the skip counter of the data package."""

import collections

from absl import logging


class DataError(ValueError):
    """Bad input data; the message names the file and the offending record."""


class SkipReport:
    """Counts everything lenient mode skipped or repaired, by reason, and logs it once.

    Nothing is dropped silently: every skip goes through ``add`` and shows up in ``counts``.
    """

    def __init__(self, lenient: bool):
        self.lenient = lenient
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, str] = {}

    def problem(self, reason: str, message: str) -> None:
        """Raise DataError(message) or, in lenient mode, count it under ``reason``."""
        if not self.lenient:
            raise DataError(message)
        self.add(reason, message)

    def add(self, reason: str, message: str = "") -> None:
        """Count one occurrence of ``reason`` (kept even in strict mode, e.g. repaired boxes)."""
        self.counts[reason] += 1
        self.examples.setdefault(reason, message)

    def log(self, source: str) -> None:
        for reason, count in sorted(self.counts.items()):
            logging.warning("%s: %d x %s (first: %s)", source, count, reason, self.examples[reason])
