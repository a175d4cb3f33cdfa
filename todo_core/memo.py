"""Memoisation that torch.compile can trace through.

Dynamo cannot use a ``functools.lru_cache`` (it traces the wrapped function
and warns that it did). The hot path's memoised helpers (grid depths, nearest
rows, kept-key selections) therefore call their function directly while being
traced and use the cache otherwise, where it saves the work and the
host-to-device copies of index tensors on every attention call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

Result = TypeVar("Result")

is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", None) or (lambda: False)
"""True while torch.compile traces (dynamo folds it to a constant); always False in eager code and old torch."""


def memoised(maxsize: int) -> Callable[[Callable[..., Result]], Callable[..., Result]]:
    """``functools.lru_cache(maxsize)`` in eager code; the plain function while torch.compile traces."""

    def decorate(function: Callable[..., Result]) -> Callable[..., Result]:
        cached = functools.lru_cache(maxsize=maxsize)(function)

        @functools.wraps(function)
        def call(*args, **kwargs) -> Result:
            if is_compiling():
                return function(*args, **kwargs)
            return cached(*args, **kwargs)

        call.cache_info = cached.cache_info  # type: ignore[attr-defined]
        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return call

    return decorate
