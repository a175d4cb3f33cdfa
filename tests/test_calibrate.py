"""Fidelity mode's measurement, in pure torch: sampled rows, the error estimate, the choice, the cache, the report."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from todo_core import ToDoAttn1Patch, ToDoConfig
from todo_core.bench.tokens import PHOTOS, attention_layer, photo_tokens
from todo_core.calibrate import (
    CALIBRATION_KEY,
    CANDIDATE_FACTORS,
    SAMPLED_ROWS,
    Calibration,
    CalibrationStore,
    CallCalibration,
    DecisionKey,
    Measurement,
    NoiseBands,
    SampledQueries,
    choose_factor,
    mask_bias,
    measure_factor,
    relative_error,
    sample_rows,
    stable_seed,
)
from todo_core.dit import (
    DIT_FAMILIES,
    LATENT_INFO_KEY,
    BlockSelection,
    LatentInfo,
    ToDoAttentionOverride,
    sdpa_attention,
)
from todo_core.downsample import downsample_tokens, output_tokens
from todo_core.unet_override import ToDoUNetAttention

FLUX = DIT_FAMILIES["flux"]


def exact_attention(q, k, v, heads, mask=None):
    """Naive reference in float64: ``[B, N, H*d]`` tokens, additive or boolean mask broadcast as ComfyUI does."""
    batch, n_q, channels = q.shape
    split = [t.double().reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v)]
    scores = split[0] @ split[1].transpose(-1, -2) / math.sqrt(channels // heads)
    if mask is not None:
        scores = scores + mask_bias(mask, None).double()
    return (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(batch, n_q, channels)


def local_layer(height: int, width: int, width_cells: float, heads: int = 2, dim: int = 8, seed: int = 0):
    """q/k/v of a layer whose attention is a Gaussian of ``width_cells`` grid cells around each query.

    Logits ``-|p_i - p_j|**2 / t`` (up to a per-row constant) come from queries
    ``[2p/t, -1/t]`` and keys ``[p, |p|**2]``; values are an offset, a smooth field and each
    token's own detail (noise). Small widths attend to a token and its neighbours (sharp),
    large ones to the whole image (diffuse).
    """
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pos = torch.stack((ys, xs), -1).reshape(-1, 2).double()
    temperature = 2 * width_cells**2
    ones = torch.ones(pos.shape[0], 1, dtype=torch.float64)
    q_head = torch.cat((2 * pos, -ones), -1) / temperature * math.sqrt(dim)
    k_head = torch.cat((pos, (pos**2).sum(-1, keepdim=True)), -1)
    pad = torch.zeros(pos.shape[0], dim - 3, dtype=torch.float64)
    q = torch.cat((q_head, pad), -1).repeat(1, heads)[None].float()
    k = torch.cat((k_head, pad), -1).repeat(1, heads)[None].float()
    generator = torch.Generator().manual_seed(seed)
    phases = torch.rand(heads * dim, 2, generator=generator, dtype=torch.float64) * 2 * math.pi
    smooth = 0.3 * (
        torch.sin(pos[:, :1] / height * 3 + phases[:, 0]) + torch.cos(pos[:, 1:] / width * 3 + phases[:, 1])
    )
    offset = torch.randn(heads * dim, generator=generator, dtype=torch.float64)
    noise = torch.randn(pos.shape[0], heads * dim, generator=generator, dtype=torch.float64) * 0.2
    v = (offset + smooth + noise)[None].float()
    return q, k, v


def unet_choice(q, k, v, height, width, heads=2, max_error=0.03):
    rows = sample_rows(q.shape[1], SAMPLED_ROWS, 0)

    def reduce(factor):
        return downsample_tokens(k, height, width, factor), downsample_tokens(v, height, width, factor), None

    queries = SampledQueries.of(q, heads, False, rows)
    kept = lambda factor: output_tokens(height, width, factor, factor)  # noqa: E731
    return choose_factor(queries, k, v, None, reduce, CANDIDATE_FACTORS, max_error, kept, height * width)


# --- rows and the estimate ----------------------------------------------------------------------------------------


def test_sampled_rows_are_one_per_stratum_deterministic_and_leave_the_global_generator_alone():
    state = torch.get_rng_state()
    rows = sample_rows(1000, 64, 7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(rows, sample_rows(1000, 64, 7))
    assert not torch.equal(rows, sample_rows(1000, 64, 8))
    edges = torch.arange(65) * 1000 // 64
    assert ((rows >= edges[:-1]) & (rows < edges[1:])).all()
    assert torch.equal(sample_rows(40, 64, 0), torch.arange(40))


def test_stable_seed_is_the_same_in_every_process():
    assert stable_seed(("input", 1), 0, 64, 64) == 1232001234  # crc32 of the key's repr, not Python's salted hash


@pytest.mark.parametrize("heads_split", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "keys", "rows", "batch", "heads", "bool"])
def test_sampled_attention_equals_the_rows_of_full_attention(heads_split, mask_kind, monkeypatch):
    import todo_core.calibrate as calibrate

    monkeypatch.setattr(calibrate, "MAX_SCORE_ELEMENTS", 1000)  # several head chunks
    generator = torch.Generator().manual_seed(0)
    batch, n_tokens, heads, dim = 2, 50, 4, 8
    q, k, v = (torch.randn(batch, n_tokens, heads * dim, generator=generator) for _ in range(3))
    masks = {
        None: None,
        "keys": torch.randn(n_tokens, generator=generator),
        "rows": torch.randn(n_tokens, n_tokens, generator=generator),
        "batch": torch.randn(batch, n_tokens, n_tokens, generator=generator),
        "heads": torch.randn(batch, heads, n_tokens, n_tokens, generator=generator),
        "bool": torch.rand(batch, 1, 1, n_tokens, generator=generator) > 0.3,
    }
    mask = masks[mask_kind]
    rows = sample_rows(n_tokens, 12, 3)
    as_input = (lambda t: t.view(batch, n_tokens, heads, dim).transpose(1, 2)) if heads_split else (lambda t: t)
    sampled = SampledQueries.of(as_input(q), heads, heads_split, rows).attend(as_input(k), as_input(v), mask)
    full = exact_attention(q, k, v, heads, mask).view(batch, n_tokens, heads, dim).transpose(1, 2)
    torch.testing.assert_close(sampled.double(), full[:, :, rows], atol=1e-5, rtol=1e-5)


def test_sd3_values_with_their_heads_split_out_are_read_as_such():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 20, 4 * 8, generator=generator) for _ in range(3))
    rows = torch.arange(20)
    plain = SampledQueries.of(q, 4, False, rows).attend(k, v, None)
    assert torch.equal(SampledQueries.of(q, 4, False, rows).attend(k, v.view(1, 20, 4, 8), None), plain)


@pytest.mark.parametrize("photo", PHOTOS[:3])
@pytest.mark.parametrize("factor", [2.0, 3.0])
def test_the_error_on_sampled_rows_matches_the_error_on_all_rows(photo, factor):
    """Over 100 seeds of the row sample, on photo-structured tokens of an SD1.5 depth-1 layer (48x48 grid).

    Stated tolerance: every seed within 15 % of the all-row error, 95 % of them within 8 %, no bias beyond 2 %.
    (Measured: 95 % within 3-7 %, all within 11 %.)
    """
    torch.set_num_threads(1)
    height = width = 48
    hidden = photo_tokens(photo, height, width, 320)
    layer = attention_layer(hidden, 8, 40)
    q, k, v = hidden @ layer.w_q, hidden @ layer.w_k, hidden @ layer.w_v
    k_small, v_small = downsample_tokens(k, height, width, factor), downsample_tokens(v, height, width, factor)
    every = SampledQueries.of(q, 8, False, torch.arange(height * width))
    error_all = relative_error(every.attend(k_small, v_small, None), every.attend(k, v, None))
    ratios = []
    for seed in range(100):
        sampled = SampledQueries.of(q, 8, False, sample_rows(height * width, SAMPLED_ROWS, seed))
        ratios.append(relative_error(sampled.attend(k_small, v_small, None), sampled.attend(k, v, None)) / error_all)
    deviations = sorted(abs(r - 1) for r in ratios)
    assert deviations[-1] < 0.15, deviations[-1]
    assert deviations[94] < 0.08, deviations[94]
    assert abs(sum(ratios) / len(ratios) - 1) < 0.02


# --- the choice ---------------------------------------------------------------------------------------------------


def test_sharp_local_attention_gets_no_reduction_and_diffuse_attention_a_large_one():
    height, width = 24, 32
    sharp = unet_choice(*local_layer(height, width, 0.3), height, width)
    local = unet_choice(*local_layer(height, width, 4.0), height, width)
    diffuse = unet_choice(*local_layer(height, width, 40.0), height, width)
    assert sharp.factor == 1.0 and sharp.rejected_error > 0.15  # each query sees itself: any reduction loses it
    assert 1.0 < local.factor < diffuse.factor
    assert diffuse.factor >= 3.0
    for choice in (local, diffuse):
        assert 0 < choice.error <= 0.03 and choice.kept == output_tokens(height, width, choice.factor, choice.factor)


def scaled_values(errors: dict[float, float]):
    """A reduction whose error is known exactly: the values scaled by ``1 + error`` scale the output so."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 16, generator=generator) for _ in range(3))

    def reduce(factor):
        return k, v * (1 + errors[factor]), None

    return SampledQueries.of(q, 2, False, torch.arange(64)), k, v, reduce


def test_the_largest_candidate_within_the_budget_wins_even_past_a_failing_one():
    errors = {1.5: 0.01, 2.0: 0.02, 2.5: 0.05, 3.0: 0.025, 4.0: 0.2, 5.0: 0.3, 6.0: 0.4, 8.0: 0.5}
    queries, k, v, reduce = scaled_values(errors)
    kept = lambda factor: round(1000 / factor**2)  # noqa: E731
    choice = choose_factor(queries, k, v, None, reduce, CANDIDATE_FACTORS, 0.03, kept, 1000)
    assert choice.factor == 3.0 and choice.error == pytest.approx(0.025, rel=1e-4)
    assert choice.rejected_error == pytest.approx(0.2, rel=1e-4) and choice.kept == 111  # 4 would cost 20 %
    none = choose_factor(queries, k, v, None, reduce, CANDIDATE_FACTORS, 0.005, kept, 1000)
    assert (none.factor, none.error, none.kept) == (1.0, 0.0, 1000)
    assert none.rejected_error == pytest.approx(0.01, rel=1e-4)


def test_between_factors_that_keep_as_many_keys_the_smaller_error_wins():
    errors = {1.5: 0.01, 2.0: 0.02, 2.5: 0.025, 3.0: 0.5, 4.0: 0.029, 5.0: 0.021, 6.0: 0.5, 8.0: 0.5}
    queries, k, v, reduce = scaled_values(errors)
    kept = {
        1.0: 144,
        1.5: 64,
        2.0: 36,
        2.5: 25,
        3.0: 16,
        4.0: 9,
        5.0: 9,
        6.0: 4,
        8.0: 4,
    }.__getitem__  # a side of 12 (4 and 5)
    choice = choose_factor(queries, k, v, None, reduce, CANDIDATE_FACTORS, 0.03, kept, 144)
    assert (choice.factor, choice.kept) == (5.0, 9) and choice.error == pytest.approx(0.021, rel=1e-4)


def test_factor_one_is_measured_when_a_temporal_factor_still_reduces():
    errors = dict.fromkeys((1.0, *CANDIDATE_FACTORS), 0.5)
    errors[1.0] = 0.04
    queries, k, v, reduce = scaled_values(errors)
    kept = lambda factor: round(500 / factor**2)  # noqa: E731  (half the frames kept at every factor)
    choice = choose_factor(queries, k, v, None, reduce, CANDIDATE_FACTORS, 0.03, kept, 1000)
    assert choice.factor == 1.0 and choice.error == pytest.approx(0.04, rel=1e-4) and choice.kept == 500


def test_a_fixed_factor_is_measured_for_the_report():
    queries, k, v, reduce = scaled_values({2.0: 0.07})
    measured = measure_factor(queries, k, v, None, reduce, 2.0, lambda f: round(100 / f**2), 100)
    assert measured.error == pytest.approx(0.07, rel=1e-4) and (measured.kept, measured.tokens) == (25, 100)
    assert measure_factor(queries, k, v, None, reduce, 1.0, lambda f: 100, 100).error == 0.0


# --- the cache and the report -------------------------------------------------------------------------------------


def key(group=("depth", 1), layer=(("input", 1), 0), grid=(8, 8), band=0, branch=(1, 0)) -> DecisionKey:
    return DecisionKey(group, layer, grid, band, branch)


def test_each_layer_grid_band_and_branch_is_measured_once_then_looked_up():
    calibration = Calibration("SD15 UNet", "fidelity", 0.03)
    measured: list[DecisionKey] = []

    def measure_for(k):
        return lambda: measured.append(k) or Measurement(2.0, 0.02, 16, 64)

    fallback = lambda: Measurement(1.0, 0.0, 64, 64, measured=False)  # noqa: E731
    keys = [key(), key(band=1), key(branch=(0,)), key(branch=(1,)), key(grid=(16, 16)), key(layer=(("input", 2), 0))]
    for _ in range(3):
        for k in keys:
            assert calibration.decide(k, measure_for(k), fallback) == 2.0
    assert measured == keys and all(calibration.calls[k] == 3 for k in keys)
    assert calibration.seconds >= 0.0


def test_a_failed_measurement_falls_back_once_with_one_warning(caplog):
    calibration = Calibration("Flux", "fidelity", 0.03)

    def broken():
        raise ValueError("queries and keys have different batch sizes (tiled queries)")

    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        for band in range(3):
            factor = calibration.decide(key(band=band), broken, lambda: Measurement(2.0, 0.0, 16, 64, measured=False))
            assert factor == 2.0
    assert calibration.failures == 3 and len(caplog.records) == 1 and "tiled" in caplog.text
    assert "3 layer(s) not measurable" in calibration.report() and "not measured" in calibration.report()


def test_the_report_groups_unet_depths():
    calibration = Calibration("SD15 UNet", "fidelity", 0.03)
    decisions = {
        key(): Measurement(2.0, 0.021, 16, 64),
        key(band=2): Measurement(3.0, 0.028, 9, 64),
        key(group=("depth", 2), grid=(4, 4)): Measurement(1.0, 0.0, 16, 16, rejected_error=0.09),
    }
    for k, decision in decisions.items():
        calibration.decide(k, lambda d=decision: d, lambda: None)
    line = calibration.report()
    assert line.startswith("ToDo fidelity (max_error 0.03), SD15 UNet: depth 1: factor 2-3, error <= 2.8%; ")
    assert "depth 2: factor 1 (the smallest reduction would cause 9.0%)" in line
    assert "keys kept 28% of 144 over 3 attention calls" in line and "measuring took" in line
    assert Calibration("x", "auto", None).report() is None


def test_the_report_merges_runs_of_dit_blocks_with_equal_factors():
    calibration = Calibration("Flux.1 / Flux.2", "auto", None)
    blocks = [("double", 0, 2.0), ("double", 1, 2.0), ("double", 2, 3.0), ("single", 0, 3.0), ("single", 1, 3.0)]
    for block_type, index, factor in blocks:
        group = (block_type, index)
        decision = Measurement(factor, 0.01 * factor, 10, 40)
        calibration.decide(key(group=group, layer=group), lambda d=decision: d, lambda: None)
    line = calibration.report()
    assert "ToDo auto, Flux.1 / Flux.2: double 0-1: factor 2, error <= 2.0%; double 2: factor 3" in line
    assert "single 0-1: factor 3, error <= 3.0%" in line


def test_a_render_opens_a_calibration_and_reports_it_when_it_closes(caplog):
    store = CalibrationStore("SD15 UNet", "fidelity", 0.03)
    outside = store.current()
    assert store.current() is not outside  # outside a render: a fresh one per model call
    calibration = store.open()
    assert store.current() is calibration
    calibration.decide(key(), lambda: Measurement(2.0, 0.02, 16, 64), lambda: None)
    with caplog.at_level(logging.INFO, logger="comfyui_todo"):
        store.close(calibration)
    assert store.current() is not calibration and len(caplog.records) == 1 and "depth 1: factor 2" in caplog.text


def test_noise_bands_are_thirds_of_the_schedule():
    bands = NoiseBands.of(lambda percent: 10.0 * (1 - percent))  # sigma 10 at the start, 0 at the end
    assert [bands.band(s) for s in (10.0, 6.67, 6.66, 3.34, 3.33, 0.0)] == [0, 0, 1, 1, 2, 2]


def test_blocks_without_indices_are_numbered_in_call_order():
    call = CallCalibration(Calibration("SD3", "fidelity", 0.03), 0, ())
    assert [call.layer_key({})[1] for _ in range(3)] == [(None, 0), (None, 1), (None, 2)]
    assert call.layer_key({"block_type": "single", "block_index": 4}) == (("single", 4), ("single", 4))


# --- through the overrides ----------------------------------------------------------------------------------------


def unet_options(height, width, calibration, band=0, branch=(1, 0)):
    return {
        "activations_shape": [1, 16, height, width],
        "original_shape": [1, 4, height, width],
        "block": ("input", 1),
        "block_index": 0,
        CALIBRATION_KEY: CallCalibration(calibration, band, branch),
    }


@pytest.mark.parametrize("cells, reduced", [(0.3, False), (40.0, True)])
def test_the_unet_override_acts_on_its_measured_choice(cells, reduced):
    height, width = 24, 32
    q, k, v = local_layer(height, width, cells)
    override = ToDoUNetAttention(ToDoAttn1Patch(ToDoConfig.create(mode="fidelity", max_error=0.03)))
    calibration = Calibration("SD15 UNet", "fidelity", 0.03)
    out = override(sdpa_attention, q, k, v, 2, transformer_options=unet_options(height, width, calibration))
    (decision,) = calibration.decisions.values()
    assert (decision.factor > 1) is reduced
    k_small = downsample_tokens(k, height, width, decision.factor)
    v_small = downsample_tokens(v, height, width, decision.factor)
    assert torch.equal(out, sdpa_attention(q, k_small, v_small, 2))
    rows = sample_rows(height * width, SAMPLED_ROWS, stable_seed((("input", 1), 0), height, width))
    sampled_error = relative_error(out[0, rows].double(), exact_attention(q, k, v, 2)[0, rows])
    assert sampled_error <= 0.03 + 1e-4  # the plan holds the budget on the sampled rows


def test_the_unet_override_reports_the_error_of_auto_mode_without_changing_its_factor():
    height, width = 24, 32
    q, k, v = local_layer(height, width, 2.0)
    config = ToDoConfig.create(mode="auto", native_resolution=64, report_error=True)
    override = ToDoUNetAttention(ToDoAttn1Patch(config))
    calibration = Calibration("SD15 UNet", "auto", None)
    out = override(sdpa_attention, q, k, v, 2, transformer_options=unet_options(height, width, calibration))
    (decision,) = calibration.decisions.values()
    auto = config.factor_for(ToDoAttn1Patch(config).grid_for(q, k, v, unet_options(height, width, calibration)))
    assert decision.factor == auto > 1 and decision.error > 0
    expected = sdpa_attention(
        q, downsample_tokens(k, height, width, auto), downsample_tokens(v, height, width, auto), 2
    )
    assert torch.equal(out, expected)


def test_the_unet_override_leaves_flagged_cross_attention_alone():
    height, width = 24, 32
    q, k, v = local_layer(height, width, 40.0)
    override = ToDoUNetAttention(ToDoAttn1Patch(ToDoConfig.create(mode="fidelity")))
    calibration = Calibration("SD15 UNet", "fidelity", 0.03)
    options = {**unet_options(height, width, calibration), "todo_cross_attention": True}
    assert torch.equal(override(sdpa_attention, q, k, v, 2, transformer_options=options), sdpa_attention(q, k, v, 2))
    assert not calibration.decisions


def flux_call(text: int, height: int, width: int, cells: float, heads: int = 2, dim: int = 8):
    """Flux-style joint attention ``[B, H, text + h*w, d]`` with a local image part and random text tokens."""
    q_img, k_img, v_img = local_layer(height, width, cells, heads, dim)
    generator = torch.Generator().manual_seed(5)
    q_txt, k_txt, v_txt = (torch.randn(1, text, heads * dim, generator=generator) for _ in range(3))
    joined = (torch.cat(pair, 1).view(1, text + height * width, heads, dim).transpose(1, 2) for pair in (
        (q_txt, q_img), (k_txt, k_img), (v_txt, v_img)))  # fmt: skip
    return tuple(joined)


@pytest.mark.parametrize("with_mask", [False, True])
def test_the_dit_override_holds_the_budget_with_mass_correction_and_the_callers_mask(with_mask):
    text, height, width, heads = 6, 12, 16, 2
    q, k, v = flux_call(text, height, width, 20.0)
    mask = None
    if with_mask:  # padding: the last two text tokens masked out, as families with text masks pass it
        mask = torch.ones(1, 1, 1, text + height * width, dtype=torch.bool)
        mask[..., text - 2 : text] = False
    config = ToDoConfig.create(mode="fidelity", max_error=0.05)
    override = ToDoAttentionOverride(config, FLUX, BlockSelection.parse("all"))
    calibration = Calibration("Flux", "fidelity", 0.05)
    options = {
        LATENT_INFO_KEY: LatentInfo(1, 2 * height, 2 * width, text),
        "block_type": "double",
        "block_index": 3,
        CALIBRATION_KEY: CallCalibration(calibration, 1, (0,)),
    }
    out = override(sdpa_attention, q, k, v, heads, mask=mask, skip_reshape=True, transformer_options=options)
    (decision,) = calibration.decisions.values()
    assert decision.factor > 1 and 0 < decision.error <= 0.05
    assert decision.tokens == text + height * width
    exact = sdpa_attention(q, k, v, heads, mask, skip_reshape=True)
    rows = sample_rows(
        text + height * width, SAMPLED_ROWS, stable_seed("flux", ("double", 3), (text, 1, height, width, 0))
    )
    assert relative_error(out[:, rows].double(), exact[:, rows].double()) <= 0.05 + 1e-4
    assert relative_error(out.double(), exact.double()) <= 0.05 * 1.3  # and, here, on all rows


def test_the_attn1_patch_leaves_undecided_layers_to_the_override_and_reduces_decided_ones():
    """Measured once on the projected keys, a layer is reduced before the projections on every later call."""
    height, width = 24, 32
    q, k, v = local_layer(height, width, 40.0)
    patch = ToDoAttn1Patch(ToDoConfig.create(mode="fidelity", max_error=0.03))
    override = ToDoUNetAttention(patch)
    calibration = Calibration("SD15 UNet", "fidelity", 0.03)
    options = unet_options(height, width, calibration)
    hidden = q  # the hidden states before the projections (any [B, N, C] tokens)
    assert patch(hidden, hidden, hidden, options) == (hidden, hidden, hidden)  # undecided: every key kept
    override(sdpa_attention, q, k, v, 2, transformer_options=options)  # the first call measures and decides
    (key_, decision) = next(iter(calibration.decisions.items()))
    assert decision.factor > 1 and calibration.calls[key_] == 1
    _, k_small, _ = patch(hidden, hidden, hidden, options)
    assert torch.equal(k_small, downsample_tokens(hidden, height, width, decision.factor))
    assert calibration.calls[key_] == 2
    reduced = override(sdpa_attention, q, k_small, k_small, 2, transformer_options=options)
    assert torch.equal(reduced, sdpa_attention(q, k_small, k_small, 2)) and calibration.calls[key_] == 2
    other_band = unet_options(height, width, calibration, band=2)
    assert patch(hidden, hidden, hidden, other_band) == (hidden, hidden, hidden)  # a new band is measured again


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_measuring_key_subsets_on_the_exact_scores_equals_attending_over_the_reduced_keys(mask_kind):
    """The one-pass measurement (columns of the exact scores) against the reduced call's own keys and mask."""
    from todo_core.dit import SequenceLayout, reduce_keys, select_keys

    layout = SequenceLayout(5, 1, 9, 13, 3)
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, layout.tokens, 8, generator=generator) for _ in range(3))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 1, layout.tokens, generator=generator) > 0.1
        mask[..., layout.prefix :] = True
    elif mask_kind == "float":
        mask = torch.randn(2, 1, layout.tokens, layout.tokens, generator=generator)
    queries = SampledQueries.of(q, 4, True, sample_rows(layout.tokens, 32, 0))
    factors = [1.5, 2.0, 2.5, 3.0, 4.0]
    selections = []
    for factor in factors:
        kept = select_keys(layout, factor, k.device)
        selections.append((kept.indices, kept.log_group_size))
    fast = queries.selection_errors(k, v, mask, selections)
    exact = queries.attend(k, v, mask)
    for factor, error in zip(factors, fast, strict=True):
        k_small, v_small, mask_small = reduce_keys(k, v, mask, layout, factor, 2)
        assert error == pytest.approx(relative_error(queries.attend(k_small, v_small, mask_small), exact), rel=1e-4)


def test_unet_nearest_positions_are_the_tokens_the_patch_keeps():
    from todo_core.dit import SequenceLayout, select_keys

    tokens = torch.arange(35 * 47, dtype=torch.float32).view(1, -1, 1)
    for factor in CANDIDATE_FACTORS:
        positions = select_keys(SequenceLayout(0, 1, 35, 47, 0), factor, tokens.device).indices
        assert torch.equal(downsample_tokens(tokens, 35, 47, factor).view(-1).long(), positions)


def test_a_unet_layer_kept_whole_is_counted_once_per_call():
    """Decided on factor 1, a layer's calls pass the attn1 patch (which counts them) and reach the override whole."""
    height, width = 24, 32
    q, k, v = local_layer(height, width, 0.3)
    patch = ToDoAttn1Patch(ToDoConfig.create(mode="fidelity", max_error=0.03))
    override = ToDoUNetAttention(patch)
    calibration = Calibration("SD15 UNet", "fidelity", 0.03)
    options = unet_options(height, width, calibration)
    for _ in range(3):
        q_in, k_in, v_in = patch(q, k, v, options)
        override(sdpa_attention, q_in, k_in, v_in, 2, transformer_options=options)
    ((key_, decision),) = calibration.decisions.items()
    assert decision.factor == 1.0 and calibration.calls[key_] == 3
