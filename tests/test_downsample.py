"""Downsampling against the naive reference, for every method, factor and odd shape."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import out_side, reference_downsample

from todo_core import DownsampleMethod, downsample_tokens, output_side, output_tokens

METHODS = [m.value for m in DownsampleMethod]
FACTORS = [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 8.0]
SHAPES = [(8, 8), (9, 7), (135, 240), (68, 120), (17, 30), (73, 125), (1, 5), (3, 2)]


def tokens_for(batch: int, height: int, width: int, channels: int = 6, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, height * width, channels, generator=generator).to(dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_matches_reference(method, factor, height, width):
    tokens = tokens_for(2, height, width)
    got = downsample_tokens(tokens, height, width, factor, factor, DownsampleMethod(method))
    want = reference_downsample(tokens, height, width, factor, method)
    assert got.shape == want.shape == (2, out_side(height, factor) * out_side(width, factor), 6)
    torch.testing.assert_close(got, want)  # float32 tolerance: the kernels sum their taps in float32


@pytest.mark.parametrize(
    ("height", "width", "factor", "expected"),
    [
        (135, 240, 2, (68, 120)),  # 1080 px: the odd side keeps its last row
        (135, 240, 3, (45, 80)),
        (73, 125, 4, (19, 32)),
        (128, 128, 1.5, (86, 86)),
        (96, 96, 1.5, (64, 64)),
        (5, 5, 8, (1, 1)),  # a factor larger than the side leaves one token, never zero
    ],
)
def test_ceil_output_sides(height, width, factor, expected):
    assert (output_side(height, factor), output_side(width, factor)) == expected
    tokens = tokens_for(1, height, width)
    for method in DownsampleMethod:
        assert downsample_tokens(tokens, height, width, factor, factor, method).shape[1] == expected[0] * expected[1]


def test_nearest_keeps_real_tokens_with_last_row_and_column():
    height, width = 5, 7
    tokens = torch.arange(height * width, dtype=torch.float32).reshape(1, -1, 1)
    got = downsample_tokens(tokens, height, width, 2, 2, DownsampleMethod.NEAREST).flatten().tolist()
    assert got == [r * width + c for r in (0, 2, 4) for c in (0, 2, 4, 6)]


def test_per_axis_factors():
    tokens = tokens_for(1, 12, 20)
    got = downsample_tokens(tokens, 12, 20, 3.0, 2.0, DownsampleMethod.NEAREST)
    assert got.shape[1] == output_tokens(12, 20, 3.0, 2.0) == 4 * 10
    grid = tokens.view(1, 12, 20, -1)
    torch.testing.assert_close(got, grid[:, ::3, ::2].reshape(1, 40, -1))


@pytest.mark.parametrize("method", list(DownsampleMethod))
def test_factor_one_is_identity_without_copy(method):
    tokens = tokens_for(2, 9, 11)
    assert downsample_tokens(tokens, 9, 11, 1.0, 1.0, method) is tokens


@pytest.mark.parametrize("method", list(DownsampleMethod))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_keeps_dtype_and_device_and_never_mutates(method, dtype):
    tokens = tokens_for(3, 17, 30, dtype=dtype)
    before = tokens.clone()
    got = downsample_tokens(tokens, 17, 30, 2.0, 2.0, method)
    assert got.dtype == dtype and got.device == tokens.device
    assert torch.equal(tokens, before)
    assert got.data_ptr() != tokens.data_ptr()


def test_rejects_tokens_that_do_not_fill_the_grid():
    with pytest.raises(ValueError, match="not a 8x8 grid"):
        downsample_tokens(tokens_for(1, 8, 7), 8, 8, 2.0)


def test_method_names_are_exact():
    assert DownsampleMethod.parse("nearest-exact") is DownsampleMethod.NEAREST_EXACT
    assert DownsampleMethod.parse("nearest") is DownsampleMethod.NEAREST
    for wrong in ("near", "nearest-exactly", "Nearest", "avg", "pool"):
        with pytest.raises(ValueError, match="method must be one of"):
            DownsampleMethod.parse(wrong)


@settings(max_examples=150, deadline=None)
@given(
    height=st.integers(8, 300),
    width=st.integers(8, 300),
    factor=st.sampled_from([1.0, 1.25, 1.5, 2.0, 2.75, 3.0, 4.0, 5.0]),
    batch=st.integers(1, 3),
    method=st.sampled_from(METHODS),
)
def test_property_sweep_matches_reference(height, width, factor, batch, method):
    tokens = tokens_for(batch, height, width, channels=2, seed=height * 1000 + width)
    got = downsample_tokens(tokens, height, width, factor, factor, DownsampleMethod(method))
    if method in ("avg_pool", "max_pool", "area") and height * width > 120 * 120:
        # The loop reference is slow on big grids: check shape and a cheap invariant instead.
        assert got.shape == (batch, out_side(height, factor) * out_side(width, factor), 2)
        assert got.amax() <= tokens.amax() + 1e-6 and got.amin() >= tokens.amin() - 1e-6
        return
    want = reference_downsample(tokens, height, width, factor, method)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("nearest", [0.0, 2.0]),  # floor(i * 2)
        ("nearest-exact", [1.0, 3.0]),  # floor((i + 0.5) * 2)
        ("avg_pool", [0.5, 2.5]),
        ("max_pool", [1.0, 3.0]),
        ("area", [0.5, 2.5]),
        ("bilinear", [0.5, 2.5]),  # half-pixel centres 0.5 and 2.5
        # Keys kernel (a = -0.75) at t = 0.5: weights -0.09375, 0.59375, 0.59375, -0.09375; the first output's
        # left tap is clamped to column 0.
        ("bicubic", [0.40625, 2.59375]),
    ],
)
def test_a_row_of_four_halved_by_hand(method, expected):
    """Values worked out on paper: the implementation and the reference oracle both have to give them."""
    rows = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 2).reshape(1, 8, 1)  # two equal rows: halving them changes nothing
    got = downsample_tokens(rows, 2, 4, 2.0, 2.0, DownsampleMethod(method))
    want = reference_downsample(rows, 2, 4, 2.0, method)
    assert got.flatten().tolist() == pytest.approx(expected, abs=1e-6)
    assert want.flatten().tolist() == pytest.approx(expected, abs=1e-6)


DEVICES = [
    "meta",  # shapes, dtypes and devices without data: a tensor made on the CPU by mistake fails to combine
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(DownsampleMethod))
@pytest.mark.parametrize("factor", [2.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_stays_on_the_tokens_device_and_dtype(device, method, factor, dtype):
    tokens = torch.ones(2, 17 * 30, 6, dtype=dtype, device=device)
    got = downsample_tokens(tokens, 17, 30, factor, factor, method)
    assert got.device == tokens.device and got.dtype == dtype
    assert got.shape == (2, out_side(17, factor) * out_side(30, factor), 6)
    per_axis = downsample_tokens(tokens, 17, 30, factor, 1.0, method)
    assert per_axis.device == tokens.device and per_axis.shape == (2, out_side(17, factor) * 30, 6)
