"""Configuration: validated once, errors name the input and its range; the auto budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import auto_budget, kept_tokens, smallest_factor_within

from todo_core import ConfigError, DownsampleMethod, FactorMode, ToDoConfig, TokenGrid, native_resolution_for
from todo_core.config import factor_within_budget


def test_defaults_are_auto_nearest_whole_schedule():
    config = ToDoConfig.create()
    assert config.mode is FactorMode.AUTO
    assert config.method is DownsampleMethod.NEAREST
    assert config.covers_whole_schedule and not config.is_identity


def test_config_is_frozen():
    config = ToDoConfig.create()
    with pytest.raises(AttributeError):
        config.method = DownsampleMethod.AREA


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth_1_factor": 0.5}, r"depth_1_factor must be between 1 and 8; got 0.5"),
        ({"depth_2_factor": 9}, r"depth_2_factor must be between 1 and 8; got 9"),
        ({"depth_3_factor": float("nan")}, r"depth_3_factor must be a number between 1 and 8"),
        ({"depth_1_factor": "2"}, r"depth_1_factor must be a number between 1 and 8"),
        ({"start_percent": -0.1}, r"start_percent must be between 0 and 1"),
        ({"end_percent": 1.5}, r"end_percent must be between 0 and 1"),
        (
            {"start_percent": 0.6, "end_percent": 0.4},
            r"start_percent \(0.6\) must not be greater than end_percent \(0.4\)",
        ),
        ({"native_resolution": 32}, r"native_resolution must be between 64 and 8192"),
        ({"native_resolution": 512.5}, r"native_resolution must be a whole number"),
        (
            {"method": "avg"},
            r"method must be one of: nearest, avg_pool, max_pool, area, bilinear, bicubic, nearest-exact",
        ),
        ({"mode": "fast"}, r"mode must be one of: auto, manual"),
    ],
)
def test_bad_input_names_the_input_and_range(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ToDoConfig.create(**kwargs)


def test_manual_factors_by_depth():
    config = ToDoConfig.create("manual", 3.0, 2.0, 1.0)
    assert config.factor_for(TokenGrid(192, 192, 1)) == 3.0
    assert config.factor_for(TokenGrid(96, 96, 2)) == 2.0
    assert config.factor_for(TokenGrid(48, 48, 3)) == 1.0
    assert config.factor_for(TokenGrid(24, 24, 4)) == 1.0  # the middle block is never reduced
    assert ToDoConfig.create("manual", 1.0, 1.0, 1.0).is_identity


@pytest.mark.parametrize(
    ("native", "side_scale", "expected"), [(512, 1, 1.0), (512, 2, 2.0), (512, 4, 4.0), (1024, 2, 2.0)]
)
def test_auto_is_noop_at_native_and_scales_with_the_side(native, side_scale, expected):
    config = ToDoConfig.create(native_resolution=native)
    latent_side = native // 8 * side_scale
    for depth in (1, 2, 3):
        side = latent_side >> (depth - 1)
        assert config.factor_for(TokenGrid(side, side, depth)) == expected


def test_auto_keeps_at_most_the_trained_token_count_at_odd_sizes():
    config = ToDoConfig.create(native_resolution=512)
    for depth, (height, width) in enumerate([(135, 240), (68, 120), (34, 60)], start=1):
        factor = config.factor_for(TokenGrid(height, width, depth))
        assert factor > 1.0
        assert config.budget_tokens(depth) == auto_budget(512, depth) == {1: 64 * 64, 2: 32 * 32, 3: 16 * 16}[depth]
        assert kept_tokens(height, width, factor) <= auto_budget(512, depth)
        assert factor == pytest.approx(smallest_factor_within(height, width, auto_budget(512, depth)), rel=1e-9)


@given(st.integers(1, 600), st.integers(1, 600), st.integers(1, 20000))
def test_factor_within_budget_is_minimal_and_within_budget(height, width, budget):
    factor = factor_within_budget(height, width, budget)
    assert factor >= 1.0
    # Counted independently (rows kept one by one), not with todo_core's own output_tokens.
    assert kept_tokens(height, width, factor) <= budget
    if height * width <= budget:
        assert factor == 1.0
        return
    # Minimal: no smaller factor meets the budget. Exhaustively: the smallest factor found by searching every
    # factor at which a side loses a row...
    assert factor == pytest.approx(smallest_factor_within(height, width, budget), rel=1e-9)
    # ...and on a fine grid between 1 and the factor, every factor leaves more than the budget.
    for step in range(64):
        smaller = 1.0 + (factor - 1.0) * step / 64
        assert kept_tokens(height, width, smaller) > budget, (smaller, factor)


@pytest.mark.parametrize(
    ("height", "width", "budget", "expected"),
    [
        (128, 128, 64 * 64, 2.0),
        (135, 240, 64 * 64, 240 / 85),  # 1080p at SD1.5's depth-1 budget: 48 x 85 = 4080 tokens
        (100, 1, 10, 10.0),
        (7, 7, 48, 7 / 6),  # one row and one column fewer: 36 tokens
        (3, 5, 14, 5 / 4),  # 3 x 4 = 12; a factor just above 1 keeps all 15
    ],
)
def test_factor_within_budget_known_values(height, width, budget, expected):
    assert factor_within_budget(height, width, budget) == pytest.approx(expected, rel=1e-12)
    assert smallest_factor_within(height, width, budget) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("context_dim", "adm", "v_pred", "expected"),
    [
        (768, None, False, 512),  # SD1.x
        (1024, None, False, 512),  # SD2.x base
        (1024, None, True, 768),  # SD2.x 768-v
        (2048, 2816, False, 1024),  # SDXL
        (1280, 2560, False, 1024),  # SDXL refiner
    ],
)
def test_native_resolution_detection(context_dim, adm, v_pred, expected):
    assert native_resolution_for(context_dim, adm, v_pred) == expected
