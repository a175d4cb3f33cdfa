"""Exact-name parsing of the node's combo inputs, with errors that name the input and its allowed values."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

Choice = TypeVar("Choice", bound=Enum)


class ConfigError(ValueError):
    """A node input outside its allowed range; the message names the input."""


def parse_choice(choices: type[Choice], input_name: str, value: str | Choice) -> Choice:
    """The member of ``choices`` whose value is exactly ``value``: no substring or case-insensitive matching."""
    if isinstance(value, choices):
        return value
    try:
        return choices(value)
    except ValueError:
        allowed = ", ".join(str(member.value) for member in choices)
        raise ConfigError(f"{input_name} must be one of: {allowed}; got {value!r}") from None
