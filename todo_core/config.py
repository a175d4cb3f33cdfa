"""The validated, frozen configuration of a ToDo patch, built once from the node inputs.

Everything the attention hot path needs is decided here, once: the method is an
enum, the factors are checked floats, the auto budget is a token count per
depth. The patch then only looks values up.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import Enum

from .choices import ConfigError, parse_choice
from .downsample import DownsampleMethod, output_side, output_tokens
from .grid import TokenGrid, ceil_side

CONFIGURABLE_DEPTHS = 3
"""Depths 1-3 carry almost all self-attention cost; deeper levels are never reduced."""

MIN_FACTOR, MAX_FACTOR = 1.0, 8.0
MIN_NATIVE_RESOLUTION, MAX_NATIVE_RESOLUTION = 64, 8192
DEFAULT_MANUAL_FACTORS = (2.0, 1.0, 1.0)
"""Manual mode's factors for depths 1-3: halve the side where attention is most expensive."""
DEFAULT_NATIVE_RESOLUTION = 512
MIN_MAX_ERROR, MAX_MAX_ERROR = 0.001, 0.5
DEFAULT_MAX_ERROR = 0.03
"""Fidelity mode's budget: relative error of each layer's attention output on the sampled query rows."""
LATENT_SCALE = 8
"""Pixels per latent cell for every SD-family VAE."""


class FactorMode(str, Enum):
    """How per-depth factors are chosen."""

    AUTO = "auto"
    """Per grid: reduce K/V to at most the token count the model was trained with at that depth."""
    MANUAL = "manual"
    """Fixed factor per depth, whatever the image size."""
    FIDELITY = "fidelity"
    """Per layer, grid and noise band: the factor keeping the fewest keys with a measured error within ``max_error``."""

    @classmethod
    def parse(cls, name: str | FactorMode) -> FactorMode:
        return parse_choice(cls, "mode", name)


def native_resolution_for(context_dim: int | None, adm_in_channels: int | None, v_prediction: bool) -> int:
    """Training resolution in pixels of an SD-family UNet, from its configuration.

    SDXL and its refiner/distillations (2048/1280-wide text context, pooled
    ``adm`` input) train at 1024 px; SD2.x v-prediction models at 768; SD1.x and
    SD2.x base at 512. Turbo distillations train lower than their family: set
    the node's ``native_resolution`` for them.
    """
    if (context_dim or 0) >= 1280 or (adm_in_channels or 0) >= 2560:
        return 1024
    if context_dim == 1024 and v_prediction:
        return 768
    return 512


@functools.lru_cache(maxsize=4096)
def factor_within_budget(height: int, width: int, budget_tokens: int) -> float:
    """Smallest factor (>= 1) that leaves at most ``budget_tokens`` of an ``height x width`` grid.

    Pure and memoised: the grid sizes of one render repeat thousands of times.
    """
    if height * width <= budget_tokens:
        return 1.0
    factor = math.sqrt(height * width / budget_tokens)
    if abs(factor - round(factor)) < 1e-9:
        factor = float(round(factor))
    # ceil() can leave a few tokens over budget: step to the next factor at
    # which one of the sides loses a row, until the budget holds.
    while output_tokens(height, width, factor, factor) > budget_tokens:
        next_h = height / (output_side(height, factor) - 1) if output_side(height, factor) > 1 else math.inf
        next_w = width / (output_side(width, factor) - 1) if output_side(width, factor) > 1 else math.inf
        factor = min(next_h, next_w)
    return factor


def _check_range(name: str, value: float, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number between {low:g} and {high:g}; got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}; got {value:g}")
    return float(value)


@dataclass(frozen=True, slots=True)
class ToDoConfig:
    """What to downsample, where and when. Build it with :meth:`create`."""

    mode: FactorMode
    factors: tuple[float, ...]
    """Manual factor for depths 1..CONFIGURABLE_DEPTHS (1 = off)."""
    method: DownsampleMethod
    start_percent: float
    end_percent: float
    native_resolution: int
    """Training resolution in pixels; sets the auto mode's token budget per depth."""
    temporal_factor: float = 1.0
    """Video DiTs: keys/values reduced along time too (1 = every frame kept)."""
    max_error: float = DEFAULT_MAX_ERROR
    """Fidelity mode: the relative attention-output error each layer may cause."""
    report_error: bool = False
    """Auto and manual modes: measure the error the factors cause and report it once per render."""

    @classmethod
    def create(
        cls,
        mode: str | FactorMode = FactorMode.AUTO,
        depth_1_factor: float = DEFAULT_MANUAL_FACTORS[0],
        depth_2_factor: float = DEFAULT_MANUAL_FACTORS[1],
        depth_3_factor: float = DEFAULT_MANUAL_FACTORS[2],
        method: str | DownsampleMethod = DownsampleMethod.NEAREST,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        native_resolution: int = DEFAULT_NATIVE_RESOLUTION,
        temporal_factor: float = 1.0,
        max_error: float = DEFAULT_MAX_ERROR,
        report_error: bool = False,
    ) -> ToDoConfig:
        """Validate raw node inputs; every error names the input and its allowed range."""
        factors = tuple(
            _check_range(f"depth_{depth}_factor", value, MIN_FACTOR, MAX_FACTOR)
            for depth, value in enumerate((depth_1_factor, depth_2_factor, depth_3_factor), start=1)
        )
        start = _check_range("start_percent", start_percent, 0.0, 1.0)
        end = _check_range("end_percent", end_percent, 0.0, 1.0)
        if start > end:
            raise ConfigError(f"start_percent ({start:g}) must not be greater than end_percent ({end:g})")
        native = _check_range("native_resolution", native_resolution, MIN_NATIVE_RESOLUTION, MAX_NATIVE_RESOLUTION)
        if native != int(native):
            raise ConfigError(f"native_resolution must be a whole number of pixels; got {native:g}")
        temporal = _check_range("temporal_factor", temporal_factor, MIN_FACTOR, MAX_FACTOR)
        budget = _check_range("max_error", max_error, MIN_MAX_ERROR, MAX_MAX_ERROR)
        if not isinstance(report_error, bool):
            raise ConfigError(f"report_error must be true or false; got {report_error!r}")
        return cls(
            FactorMode.parse(mode),
            factors,
            DownsampleMethod.parse(method),
            start,
            end,
            int(native),
            temporal,
            budget,
            report_error,
        )

    @property
    def native_latent_side(self) -> int:
        return max(1, self.native_resolution // LATENT_SCALE)

    @property
    def covers_whole_schedule(self) -> bool:
        return self.start_percent <= 0.0 and self.end_percent >= 1.0

    @property
    def measures(self) -> bool:
        """True when attention calls measure their error: fidelity mode, or a report asked for."""
        return self.mode is FactorMode.FIDELITY or self.report_error

    @property
    def is_identity(self) -> bool:
        """True when no grid at any size would be reduced (manual mode, all factors 1)."""
        return self.mode is FactorMode.MANUAL and all(f <= 1.0 for f in (*self.factors, self.temporal_factor))

    def budget_tokens(self, depth: int) -> int:
        """Tokens a square native-resolution image has at ``depth``: the auto mode's K/V budget."""
        return ceil_side(self.native_latent_side, depth) ** 2

    def factor_for(self, grid: TokenGrid) -> float:
        """Downsample factor for one grid (1.0 = leave it alone); fidelity mode's fallback is auto's factor."""
        if grid.depth > CONFIGURABLE_DEPTHS:
            return 1.0
        if self.mode is FactorMode.MANUAL:
            return self.factors[grid.depth - 1]
        return factor_within_budget(grid.height, grid.width, self.budget_tokens(grid.depth))

    def image_token_factor(self, height: int, width: int, native_tokens: int) -> float:
        """Factor for a DiT's ``height x width`` token grid, whose native frame has ``native_tokens`` tokens.

        A DiT has one token grid: manual mode uses the depth-1 factor, auto mode
        keeps at most the image tokens of a frame at the model's native size.
        """
        if self.mode is FactorMode.MANUAL:
            return self.factors[0]
        return factor_within_budget(height, width, native_tokens)
