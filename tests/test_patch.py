"""The attn1 patch callable in isolation: what it reduces, what it passes through, what it never touches."""

from __future__ import annotations

import logging

import pytest
import torch

from todo_core import DownsampleMethod, ToDoAttn1Patch, ToDoConfig, downsample_tokens
from todo_core.patch import IN_WINDOW_KEY, SigmaWindow, _warned_kinds, run_todo_last


def options(height: int, width: int, depth_scale: int = 1, sigma: float | None = None) -> dict:
    extra = {
        "original_shape": [2, 4, height * depth_scale, width * depth_scale],
        "activations_shape": [2, 320, height, width],
        "block": ("input", 1),
        "n_heads": 8,
        "dim_head": 40,
    }
    if sigma is not None:
        extra["sigmas"] = torch.tensor([sigma, sigma])
    return extra


def hidden(batch: int, height: int, width: int, channels: int = 16, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, height * width, channels, generator=torch.Generator().manual_seed(1)).to(dtype)


MANUAL_2 = ToDoConfig.create("manual", 2.0, 1.0, 1.0)


def test_queries_untouched_keys_values_reduced():
    n = hidden(2, 135, 240)
    q, k, v = ToDoAttn1Patch(MANUAL_2)(n, n, n, options(135, 240))
    assert q is n
    assert k.shape == v.shape == (2, 68 * 120, 16)
    torch.testing.assert_close(k, downsample_tokens(n, 135, 240, 2.0))


def test_separate_value_tensor_is_reduced_on_its_own():
    n, value = hidden(1, 16, 16), hidden(1, 16, 16) * 3
    _, k, v = ToDoAttn1Patch(MANUAL_2)(n, n, value, options(16, 16))
    torch.testing.assert_close(v, downsample_tokens(value, 16, 16, 2.0))
    assert not torch.equal(k, v)


def test_only_configured_depths_are_reduced():
    patch = ToDoAttn1Patch(MANUAL_2)
    n = hidden(1, 32, 32)
    for scale in (2, 4, 8):  # depths 2, 3, 4
        _, k, v = patch(n, n, n, options(32, 32, depth_scale=scale))
        assert k is n and v is n


@pytest.mark.parametrize("method", list(DownsampleMethod))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_keeps_dtype_device_and_never_mutates(method, dtype):
    n = hidden(2, 17, 30, dtype=dtype)
    before = n.clone()
    config = ToDoConfig.create("manual", 2.0, 1.0, 1.0, method=method)
    _, k, v = ToDoAttn1Patch(config)(n, n, n, options(17, 30))
    assert k.dtype == v.dtype == dtype and k.device == n.device
    assert k.shape[1] == 9 * 15
    assert torch.equal(n, before)


def test_identity_at_factor_one_returns_the_same_objects():
    n = hidden(2, 64, 64)
    patch = ToDoAttn1Patch(ToDoConfig.create("manual", 1.0, 1.0, 1.0))
    out = patch(n, n, n, options(64, 64))
    assert all(t is n for t in out)


def test_auto_mode_is_a_noop_at_native_resolution():
    n = hidden(1, 64, 64)
    out = ToDoAttn1Patch(ToDoConfig.create(native_resolution=512))(n, n, n, options(64, 64))
    assert all(t is n for t in out)


def test_sigma_range():
    config = ToDoConfig.create("manual", 2.0, 1.0, 1.0, start_percent=0.0, end_percent=0.5)
    patch = ToDoAttn1Patch(config)
    window = SigmaWindow.between(14.6, 1.0)
    assert window.contains(10.0) and window.contains(14.6) and window.contains(1.0)
    assert not window.contains(0.5) and not window.contains(20.0)
    n = hidden(1, 8, 8)
    # The node's model-call wrapper compares the sigma once per model call and records the answer.
    assert patch(n, n, n, {**options(8, 8, sigma=10.0), IN_WINDOW_KEY: True})[1].shape[1] == 16
    assert patch(n, n, n, {**options(8, 8, sigma=0.5), IN_WINDOW_KEY: False})[1] is n
    assert patch(n, n, n, options(8, 8, sigma=20.0))[1].shape[1] == 16, "nothing recorded: the whole schedule"


def test_cross_attention_context_passes_through():
    # disable_self_attn blocks give attn1 the text context: other width, other length.
    n, text = hidden(2, 16, 16), hidden(2, 7, 11, channels=24)
    out = ToDoAttn1Patch(MANUAL_2)(n, text, text, options(16, 16))
    assert out[1] is text and out[2] is text


def test_temporal_tokens_pass_through_with_one_warning(caplog):
    _warned_kinds.clear()
    frames = hidden(2 * 16 * 16, 1, 14)  # [(b h w), frames, C]
    patch = ToDoAttn1Patch(MANUAL_2)
    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        for _ in range(5):
            out = patch(frames, frames, frames, options(16, 16))
            assert all(t is frames for t in out)
        other_block = options(8, 8)
        patch(frames[:, :, :8], frames[:, :, :8], frames[:, :, :8], other_block)
    assert len([r for r in caplog.records if "do not form the latent grid" in r.message]) == 1


def test_merged_queries_still_get_reduced_keys():
    # A previous patch (ToMe) merged q; k/v still hold the full grid.
    n = hidden(2, 16, 16)
    merged_q = n[:, :100]
    q, k, _ = ToDoAttn1Patch(MANUAL_2)(merged_q, n, n, options(16, 16))
    assert q is merged_q and k.shape[1] == 64


def test_tiled_queries_get_keys_that_split_evenly_or_none():
    n = hidden(1, 16, 16)
    tiled_q = n.reshape(4, 64, 16)  # HyperTile before ToDo: 4 tiles
    _, k, _ = ToDoAttn1Patch(MANUAL_2)(tiled_q, n, n, options(16, 16))
    assert k.shape[1] == 64 and k.shape[1] % 4 == 0
    odd = hidden(1, 15, 15)
    tiled_q = odd.reshape(9, 25, 16)  # 64 reduced keys do not split in 9
    out = ToDoAttn1Patch(MANUAL_2)(tiled_q, odd, odd, options(15, 15))
    assert out[1] is odd


def test_patch_holds_no_state_between_calls():
    patch = ToDoAttn1Patch(MANUAL_2)
    state_before = dict(vars(patch))
    small, large = hidden(1, 8, 8), hidden(2, 40, 24)
    first = patch(small, small, small, options(8, 8))[1]
    patch(large, large, large, options(40, 24))
    again = patch(small, small, small, options(8, 8))[1]
    torch.testing.assert_close(first, again)
    assert vars(patch) == state_before


def test_run_todo_last_moves_every_todo_patch_to_the_end_without_mutation():
    def other(q, k, v, extra_options):
        return q, k, v

    todo_a, todo_b = ToDoAttn1Patch(MANUAL_2), ToDoAttn1Patch(MANUAL_2)
    chain = [todo_a, other, todo_b, other]
    options = {"patches": {"attn1_patch": chain, "attn2_patch": [other]}, "sigmas": 1}
    reordered = run_todo_last(options)
    assert reordered["patches"]["attn1_patch"] == [other, other, todo_a, todo_b]
    assert reordered["patches"]["attn2_patch"] == [other] and reordered["sigmas"] == 1
    assert options["patches"]["attn1_patch"] is chain and chain == [todo_a, other, todo_b, other]


def test_run_todo_last_returns_the_same_dict_when_nothing_moves():
    def other(q, k, v, extra_options):
        return q, k, v

    for chain in ([other, ToDoAttn1Patch(MANUAL_2)], [other], []):
        options = {"patches": {"attn1_patch": chain}}
        assert run_todo_last(options) is options
    assert run_todo_last({}) == {}


def test_blocks_whose_attn1_is_replaced_keep_every_key():
    """PAG and SAG replace attn1 in the middle block and need all of its keys there."""
    from todo_core.patch import prepare_unet_options

    replace = {"attn1": {("middle", 1, 0): object(), ("input", 4): object()}}
    prepared = prepare_unet_options(
        {"patches": {"attn1_patch": [ToDoAttn1Patch(MANUAL_2)]}, "patches_replace": replace}
    )
    patch = prepared["patches"]["attn1_patch"][0]
    n = hidden(1, 16, 16)
    extras = {key: value for key, value in prepared.items() if key not in ("patches", "patches_replace")}
    for block, index, untouched in ((("middle", 1), 0, True), (("middle", 1), 1, False), (("input", 4), 3, True)):
        call_options = {**extras, **options(16, 16), "block": block, "block_index": index}
        assert (patch(n, n, n, call_options)[1] is n) == untouched, (block, index)
    assert "todo_attn1_replaced" not in prepare_unet_options({"patches": {}})


@pytest.mark.parametrize(
    "device",
    [
        "meta",  # no data: only shapes, dtypes and devices, and any CPU tensor mixed in fails
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
    ],
)
@pytest.mark.parametrize("method", list(DownsampleMethod))
@pytest.mark.parametrize(("mode", "expected"), [("manual", 90 * 160), ("auto", 48 * 85)])
def test_patch_keeps_the_device_of_its_inputs(device, method, mode, expected):
    """Whole schedule (a sigma window reads the sigma's value, which a meta tensor has not)."""
    n = torch.ones(2, 135 * 240, 16, dtype=torch.float16, device=device)
    value = torch.ones(2, 135 * 240, 16, dtype=torch.float16, device=device)
    config = ToDoConfig.create(mode, 1.5, 1.0, 1.0, method=method, native_resolution=512)
    q, k, v = ToDoAttn1Patch(config)(n, n, value, options(135, 240))
    assert q is n
    assert k.device == v.device == n.device and k.dtype == v.dtype == torch.float16
    assert k.shape == v.shape == (2, expected, 16)  # factor 1.5: 90 x 160; auto at 512 px: 48 x 85 (factor 240 / 85)
