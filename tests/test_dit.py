"""DiT support in todo_core: sequence layouts, the mass-corrected key reduction against an exact oracle, blocks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from todo_core import ConfigError, ToDoConfig
from todo_core.dit import (
    DIT_FAMILIES,
    LATENT_INFO_KEY,
    BlockSelection,
    LatentInfo,
    SequenceLayout,
    ToDoAttentionOverride,
    reduce_keys,
    resolve_layout,
    sdpa_attention,
    select_keys,
)
from todo_core.patch import IN_WINDOW_KEY, _warned_kinds

FLUX = DIT_FAMILIES["flux"]
WAN = DIT_FAMILIES["wan"]


def naive_group_starts(side: int, factor: float) -> list[int]:
    """Rows kept by nearest sampling, computed the slow way: floor(i * f) for ceil(side / f) rows."""
    count = math.ceil(side / factor - 1e-9)
    return [min(side - 1, math.floor(i * factor + 1e-9)) for i in range(count)]


def representative(side: int, factor: float) -> list[int]:
    """For every row: the kept row of its group (the last kept row not after it)."""
    starts = naive_group_starts(side, factor)
    return [max(s for s in starts if s <= row) for row in range(side)]


def oracle_keys(layout: SequenceLayout, factor: float, temporal_factor: float = 1) -> torch.Tensor:
    """Full-length key positions where every image key is replaced by its group's kept key."""
    rows, cols = representative(layout.height, factor), representative(layout.width, factor)
    frames = representative(layout.frames, temporal_factor)
    positions = list(range(layout.prefix))
    for frame in range(layout.frames):
        base = layout.prefix + frames[frame] * layout.height * layout.width
        positions += [
            base + rows[r] * layout.width + cols[c] for r in range(layout.height) for c in range(layout.width)
        ]
    start = layout.prefix + layout.image_tokens
    positions += list(range(start, start + layout.suffix))
    return torch.tensor(positions)


def attention(q, k, v, mask=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v


def random_qkv(layout: SequenceLayout, heads: int = 2, dim: int = 8, seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, heads, layout.tokens, dim)
    return tuple(torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("factor", [2, 3, 4, 1.5, 2.5])
@pytest.mark.parametrize(
    "layout",
    [
        SequenceLayout(5, 1, 8, 8, 0),  # text first, grid divides
        SequenceLayout(7, 1, 9, 13, 0),  # uneven border groups
        SequenceLayout(3, 1, 11, 6, 4),  # reference tokens after the image
        SequenceLayout(0, 3, 5, 7, 0),  # video frames, image only
    ],
)
def test_mass_corrected_attention_equals_the_group_replaced_oracle(layout, factor):
    q, k, v = random_qkv(layout)
    k_small, v_small, mask = reduce_keys(k, v, None, layout, factor, sequence_dim=2)
    positions = oracle_keys(layout, factor)
    expected = attention(q, k[:, :, positions], v[:, :, positions])
    torch.testing.assert_close(attention(q, k_small, v_small, mask), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("frames", "temporal_factor"), [(5, 2), (4, 2), (6, 3), (7, 1.5)])
def test_temporal_groups_equal_the_oracle_too(frames, temporal_factor):
    layout = SequenceLayout(0, frames, 5, 7, 0)
    q, k, v = random_qkv(layout)
    k_small, v_small, mask = reduce_keys(k, v, None, layout, 2, 2, temporal_factor=temporal_factor)
    assert k_small.shape[2] == math.ceil(frames / temporal_factor - 1e-9) * 3 * 4
    positions = oracle_keys(layout, 2, temporal_factor)
    expected = attention(q, k[:, :, positions], v[:, :, positions])
    torch.testing.assert_close(attention(q, k_small, v_small, mask), expected, rtol=1e-10, atol=1e-10)


def test_uncorrected_subsampling_drifts_from_the_oracle():
    """Without the log(group size) bias the text keys get f² times too much weight: the test above could fail."""
    layout = SequenceLayout(5, 1, 8, 8, 0)
    q, k, v = random_qkv(layout)
    k_small, v_small, mask = reduce_keys(k, v, None, layout, 2, sequence_dim=2, mass_correction=False)
    assert mask is None
    expected = attention(q, k[:, :, oracle_keys(layout, 2)], v[:, :, oracle_keys(layout, 2)])
    assert (attention(q, k_small, v_small) - expected).abs().max() > 1e-3


@settings(max_examples=60, deadline=None)
@given(
    prefix=st.integers(0, 6),
    frames=st.integers(1, 2),
    height=st.integers(1, 17),
    width=st.integers(1, 17),
    suffix=st.integers(0, 3),
    factor=st.sampled_from([1.25, 2, 3, 4, 8]),
)
def test_kept_keys_and_group_sizes_match_the_naive_reference(prefix, frames, height, width, suffix, factor):
    layout = SequenceLayout(prefix, frames, height, width, suffix)
    selection = select_keys(layout, factor, torch.device("cpu"))
    rows, cols = naive_group_starts(height, factor), naive_group_starts(width, factor)
    kept, sizes = list(range(prefix)), [1] * prefix
    row_sizes = [b - a for a, b in zip(rows, [*rows[1:], height], strict=True)]
    col_sizes = [b - a for a, b in zip(cols, [*cols[1:], width], strict=True)]
    for frame in range(frames):
        base = prefix + frame * height * width
        for r, rs in zip(rows, row_sizes, strict=True):
            for c, cs in zip(cols, col_sizes, strict=True):
                kept.append(base + r * width + c)
                sizes.append(rs * cs)
    kept += list(range(prefix + frames * height * width, layout.tokens))
    sizes += [1] * suffix
    assert selection.indices.tolist() == kept
    torch.testing.assert_close(selection.log_group_size, torch.tensor(sizes, dtype=torch.float32).log())
    assert sum(sizes) == layout.tokens  # the groups partition the keys


def test_uniform_image_only_groups_need_no_mask_and_keep_the_callers_mask():
    layout = SequenceLayout(0, 1, 8, 8, 0)
    _q, k, v = random_qkv(layout)
    _, _, mask = reduce_keys(k, v, None, layout, 2, sequence_dim=2)
    assert mask is None  # a constant bias cancels in the softmax: the backend keeps its mask-free kernel
    own = torch.zeros(1, 1, 1, layout.tokens, dtype=k.dtype)
    own[..., 0] = -math.inf
    _, _, mask = reduce_keys(k, v, own, layout, 2, sequence_dim=2)
    assert mask.shape[-1] == 16 and mask[..., 0].item() == -math.inf and mask[..., 1:].eq(0).all()


def test_boolean_masks_become_additive_and_are_reduced_with_the_keys():
    layout = SequenceLayout(2, 1, 4, 4, 0)
    _q, k, v = random_qkv(layout)
    keep = torch.ones(1, layout.tokens, dtype=torch.bool)
    keep[0, 1] = False  # a padded text token
    _, _, mask = reduce_keys(k, v, keep, layout, 2, sequence_dim=2)
    assert mask.dtype == k.dtype and mask.shape[-1] == 2 + 4
    assert mask[..., 1].item() == -math.inf
    torch.testing.assert_close(mask[..., 2:].reshape(-1), torch.full((4,), math.log(4), dtype=k.dtype))


@pytest.mark.parametrize(
    ("n_tokens", "latent", "family", "expected"),
    [
        (77 + 64 * 64, LatentInfo(1, 128, 128, 77), FLUX, SequenceLayout(77, 1, 64, 64, 0)),
        (77 + 64 * 64, LatentInfo(1, 127, 128, 77), FLUX, SequenceLayout(77, 1, 64, 64, 0)),  # odd side: padded
        (512 + 2 * 4096, LatentInfo(1, 128, 128, 512), FLUX, SequenceLayout(512, 1, 64, 64, 4096)),  # Kontext
        (64 * 64, LatentInfo(1, 128, 128, 333), DIT_FAMILIES["sd3"], SequenceLayout(0, 1, 64, 64, 0)),
        (21 * 30 * 52, LatentInfo(21, 60, 104, 512), WAN, SequenceLayout(0, 21, 30, 52, 0)),
        (77 + 100, LatentInfo(1, 128, 128, 77), FLUX, None),  # fewer tokens than the grid
        (1001, LatentInfo(3, 60, 104, 0), WAN, None),
    ],
)
def test_layouts(n_tokens, latent, family, expected):
    assert resolve_layout(n_tokens, latent, family) == expected


def test_block_selection():
    assert BlockSelection.parse("all").is_all and BlockSelection.parse("  ").is_all
    selection = BlockSelection.parse("double, single:0-9, 30")
    assert selection.contains("double", 18)
    assert selection.contains("single", 9) and not selection.contains("single", 10)
    assert selection.contains("single", 30)
    assert BlockSelection.parse("single 3-4").contains("single", 4)
    for bad in ("doubles", "3-1", "a-b", "1,,2", 5):
        with pytest.raises(ConfigError, match="dit_blocks"):
            BlockSelection.parse(bad)


def sdpa_backend(q, k, v, heads, mask=None, skip_reshape=False, **kwargs):
    """A stand-in for a ComfyUI attention backend with its calling convention."""
    if not skip_reshape:
        b, _n, _ = q.shape
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_reshape else out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1])


def flux_override(**config):
    return ToDoAttentionOverride(ToDoConfig.create(mode="manual", **config), FLUX, BlockSelection.parse("all"))


def test_override_reduces_only_the_image_keys_of_joint_attention():
    latent = LatentInfo(1, 18, 22, 6)  # grid 9 x 11: uneven border groups
    layout = resolve_layout(6 + 99, latent, FLUX)
    q, k, v = random_qkv(layout, dtype=torch.float32)
    seen = []

    def backend(q, k, v, heads, mask=None, **kwargs):
        seen.append((k.shape[2], None if mask is None else mask.shape))
        return sdpa_backend(q, k, v, heads, mask=mask, **kwargs)

    options = {LATENT_INFO_KEY: latent}
    out = flux_override(depth_1_factor=2)(backend, q, k, v, 2, skip_reshape=True, transformer_options=options)
    assert seen == [(6 + 5 * 6, (1, 1, 1, 6 + 5 * 6))]
    positions = oracle_keys(layout, 2)
    torch.testing.assert_close(out, attention(q, k[:, :, positions], v[:, :, positions]), rtol=1e-5, atol=1e-5)


def test_override_flat_layout_positional_mask_and_an_inner_override():
    latent = LatentInfo(1, 8, 8, 3)
    layout = resolve_layout(3 + 16, latent, FLUX)
    q, k, v = (t.transpose(1, 2).reshape(2, layout.tokens, -1) for t in random_qkv(layout, dtype=torch.float32))
    inner_calls = []

    def inner(attention_fn, *args, **kwargs):
        inner_calls.append(args[1].shape[1])
        return attention_fn(*args, **kwargs)

    override = ToDoAttentionOverride(
        ToDoConfig.create(mode="manual", depth_1_factor=2), FLUX, BlockSelection.parse("all"), inner=inner
    )
    out = override(sdpa_backend, q, k, v, 2, None, transformer_options={LATENT_INFO_KEY: latent})
    assert inner_calls == [3 + 4]
    assert out.shape == q.shape


def test_override_passes_through_what_it_must_not_touch(caplog):
    latent = LatentInfo(1, 16, 16, 4)
    layout = resolve_layout(4 + 64, latent, FLUX)
    q, k, v = random_qkv(layout, dtype=torch.float32)
    calls = []

    def backend(q, k, v, heads, **kwargs):
        calls.append(k.shape[2])
        return q

    override = ToDoAttentionOverride(
        ToDoConfig.create(mode="manual", depth_1_factor=2),
        FLUX,
        BlockSelection.parse("single"),
    )
    base = {LATENT_INFO_KEY: latent, "block_type": "single", "block_index": 0}
    override(backend, q, k, v, 2, skip_reshape=True, transformer_options={**base, IN_WINDOW_KEY: True})
    override(backend, q, k, v, 2, skip_reshape=True, transformer_options={**base, IN_WINDOW_KEY: False})
    override(backend, q, k, v, 2, skip_reshape=True, transformer_options={**base, "block_type": "double"})
    override(backend, q, k, v, 2, skip_reshape=True, transformer_options={})  # no latent recorded
    override(backend, q, k[:, :, :10], v[:, :, :10], 2, skip_reshape=True, transformer_options=base)  # cross
    assert calls == [4 + 16, 68, 68, 68, 10]

    _warned_kinds.clear()
    with caplog.at_level("WARNING", logger="comfyui_todo"):
        render = torch.tensor([1.0, 0.0])
        for _ in range(5):
            override(
                backend,
                q[:, :, :50],
                k[:, :, :50],
                v[:, :, :50],
                2,
                skip_reshape=True,
                transformer_options={**base, "sample_sigmas": render},
            )
    assert calls[-5:] == [50] * 5
    assert len([r for r in caplog.records if "does not hold" in r.message]) == 1


def test_identity_and_auto_budget():
    layout = SequenceLayout(4, 1, 64, 64, 0)
    auto = ToDoAttentionOverride(ToDoConfig.create(native_resolution=1024), FLUX, BlockSelection.parse("all"))
    assert auto.factor_for(layout) == 1.0  # 1024 px Flux: 64 x 64 tokens, as trained
    assert auto.factor_for(SequenceLayout(4, 1, 128, 128, 0)) == 2.0  # 2048 px
    manual = flux_override(depth_1_factor=1)
    assert manual.factor_for(layout) == 1.0


@pytest.mark.parametrize("skip_reshape", [True, False])
@pytest.mark.parametrize(("dim", "backend_runs"), [(8, True), (128, False)])
def test_backends_that_ignore_masks_keep_running_where_the_correction_folds(skip_reshape, dim, backend_runs, caplog):
    """SageAttention 2 drops masks: it gets the correction in a folded channel, or (heads of 128) SDPA runs instead."""
    latent = LatentInfo(1, 8, 8, 3)
    layout = resolve_layout(3 + 16, latent, FLUX)
    q, k, v = random_qkv(layout, dim=dim, dtype=torch.float32)
    if not skip_reshape:
        q, k, v = (t.transpose(1, 2).reshape(2, layout.tokens, -1) for t in (q, k, v))
    seen = []

    def attention_sage(q, k, v, heads, mask=None, **kwargs):  # SageAttention 2 drops the mask silently
        seen.append((mask, q.shape[-1]))
        return sdpa_attention(q, k, v, heads, **kwargs)

    _warned_kinds.clear()
    with caplog.at_level("WARNING", logger="comfyui_todo"):
        out = flux_override(depth_1_factor=2)(
            attention_sage, q, k, v, 2, skip_reshape=skip_reshape, transformer_options={LATENT_INFO_KEY: latent}
        )
    warned = any("run on PyTorch" in r.message for r in caplog.records)
    if backend_runs:
        assert [(mask, width) for mask, width in seen] == [(None, 16 if skip_reshape else 32)]  # heads 8 -> 16
        assert not warned
    else:
        assert seen == []
        assert warned
    qh, kh, vh = random_qkv(layout, dim=dim, dtype=torch.float32)
    positions = oracle_keys(layout, 2)
    expected = attention(qh, kh[:, :, positions], vh[:, :, positions]).transpose(1, 2).reshape(2, layout.tokens, -1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_temporal_factor_only_for_video_families():
    config = ToDoConfig.create(mode="manual", depth_1_factor=1, temporal_factor=2)
    assert not config.is_identity
    video = ToDoAttentionOverride(config, WAN, BlockSelection.parse("all"))
    assert video.temporal_factor_for(SequenceLayout(0, 4, 6, 6, 0)) == 2
    assert video.temporal_factor_for(SequenceLayout(0, 1, 6, 6, 0)) == 1  # a single frame: nothing to reduce
    assert (
        ToDoAttentionOverride(config, FLUX, BlockSelection.parse("all")).temporal_factor_for(
            SequenceLayout(0, 4, 6, 6, 0)
        )
        == 1
    )
    with pytest.raises(ConfigError, match="temporal_factor"):
        ToDoConfig.create(temporal_factor=0.5)


DEVICES = [
    "meta",  # no data: only shapes, dtypes and devices, and any CPU tensor mixed in fails
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", [None, "additive", "boolean"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("layout", "temporal_factor", "kept"),
    [(SequenceLayout(3, 1, 9, 13, 2), 1.0, 3 + 5 * 7 + 2), (SequenceLayout(0, 4, 6, 6, 0), 2.0, 2 * 3 * 3)],
)
def test_reduce_keys_keeps_device_and_dtype(device, mask_kind, dtype, layout, temporal_factor, kept):
    k = torch.ones(2, 2, layout.tokens, 8, dtype=dtype, device=device)
    v = torch.ones(2, 2, layout.tokens, 8, dtype=dtype, device=device)
    mask = {
        None: None,
        "additive": torch.zeros(2, 1, 1, layout.tokens, dtype=dtype, device=device),
        "boolean": torch.ones(2, 1, 1, layout.tokens, dtype=torch.bool, device=device),
    }[mask_kind]
    k_small, v_small, out_mask = reduce_keys(k, v, mask, layout, 2, 2, temporal_factor=temporal_factor)
    assert k_small.device == v_small.device == k.device
    assert k_small.dtype == v_small.dtype == dtype
    assert k_small.shape == v_small.shape == (2, 2, kept, 8)
    if out_mask is not None:  # 9 x 13 has uneven groups: corrected; 6 x 6 frames by 2 x 2 x 2: uniform
        # A boolean mask that needs no correction stays boolean (the backends treat those apart); else k's dtype.
        kept_dtype = torch.bool if mask_kind == "boolean" and layout.prefix == 0 else dtype
        assert out_mask.device == k.device and out_mask.dtype == kept_dtype and out_mask.shape[-1] == kept
    assert (out_mask is None) == (mask is None and layout.prefix == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("skip_reshape", [True, False])
def test_override_keeps_the_device_of_its_inputs(device, skip_reshape):
    latent = LatentInfo(1, 18, 26, 4)  # 9 x 13 tokens after 4 text tokens
    layout = resolve_layout(4 + 9 * 13, latent, FLUX)
    shape = (2, 2, layout.tokens, 8) if skip_reshape else (2, layout.tokens, 16)
    q, k, v = (torch.ones(shape, dtype=torch.bfloat16, device=device) for _ in range(3))
    seen = []

    def backend(q, k, v, heads, mask=None, **kwargs):
        seen.append((k.device, k.shape, None if mask is None else (mask.device, mask.dtype)))
        return torch.zeros_like(q)

    options = {LATENT_INFO_KEY: latent}
    out = flux_override(depth_1_factor=2)(backend, q, k, v, 2, skip_reshape=skip_reshape, transformer_options=options)
    assert out.device == q.device
    kept_shape = (2, 2, 4 + 5 * 7, 8) if skip_reshape else (2, 4 + 5 * 7, 16)
    assert seen == [(q.device, kept_shape, (q.device, torch.bfloat16))]
