"""The one error for a name or setting outside its choices.

Every mode, config field, registry and layer option says it the same way, so a user who mistypes
one reads what was given and every valid value:
``Unknown config.fcos.score_mode 'sqrt'; valid choices: ['mmdet', 'torchvision'] (...)``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def unknown_choice(what: str, value: Any, choices: Collection, hint: str = "") -> ValueError:
    """The ValueError for ``value`` of the setting ``what`` not among ``choices`` (listed in
    their order); ``hint`` (what the choices mean, or other accepted forms) follows in
    brackets. For callers that find the miss themselves, e.g. in a failed lookup."""
    message = f"Unknown {what} {value!r}; valid choices: {list(choices)}"
    return ValueError(f"{message} ({hint})" if hint else message)


def check_choice(what: str, value: Any, choices: Collection, hint: str = "") -> None:
    """Raises ``unknown_choice(what, value, choices, hint)`` unless ``value`` is in
    ``choices``."""
    if value not in choices:
        raise unknown_choice(what, value, choices, hint)
