"""The routes a mass-corrected call takes to the softmax (todo_core/routes.py), each against the exact oracle.

The oracle is attention over the full sequence in which every image key and value is replaced by its group's kept
one (tests/test_dit.py). Every route must equal it in float64; in float32/bfloat16/float16 the routes that need no
mask must stay as close to it as the mask route is.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_dit import attention, oracle_keys, random_qkv

from todo_core import ToDoConfig
from todo_core.dit import (
    APPLIED_KEY,
    DIT_FAMILIES,
    LATENT_INFO_KEY,
    BlockSelection,
    LatentInfo,
    SequenceLayout,
    ToDoAttentionOverride,
    key_groups,
    reduce_keys,
    resolve_layout,
    sdpa_attention,
    select_keys,
)
from todo_core.patch import _warned_kinds
from todo_core.routes import (
    Route,
    attend_folded,
    attend_lse_merged,
    choose_route,
    fold_bias,
    folded_head_dim,
)

LAYOUTS = [
    SequenceLayout(5, 1, 8, 8, 0),  # text first, grid divides: one image group size
    SequenceLayout(7, 1, 9, 13, 0),  # uneven border groups: four sizes and the text
    SequenceLayout(3, 1, 11, 6, 4),  # reference tokens after the image
    SequenceLayout(0, 3, 5, 7, 0),  # video frames, image only, uneven borders
]


def to_caller(t: torch.Tensor, skip_reshape: bool) -> torch.Tensor:
    """``[B, H, L, d]`` -> the caller's convention: as it is, or ``[B, L, H*d]``."""
    return t if skip_reshape else t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def backend_without_masks(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """What SageAttention 2 does with a mask (drops it), on PyTorch SDPA, in ComfyUI's calling convention."""
    return sdpa_attention(q, k, v, heads, None, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)


def reduced(layout: SequenceLayout, factor: float, dtype=torch.float64, dim: int = 8, temporal_factor: float = 1.0):
    q, k, v = random_qkv(layout, dim=dim, dtype=dtype)
    k_small, v_small, mask = reduce_keys(k, v, None, layout, factor, 2, False, temporal_factor)
    assert mask is None
    return q, k, v, k_small, v_small


def expected_output(layout, factor, q, k, v, temporal_factor: float = 1.0) -> torch.Tensor:
    positions = oracle_keys(layout, factor, temporal_factor)
    return attention(q, k[:, :, positions], v[:, :, positions])


# --- choice ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "foreign", "dim_head", "device", "caller_mask", "route"),
    [
        ("attention_pytorch", False, 128, "cuda", False, Route.MASK),
        ("attention_sub_quad", False, 64, "cpu", True, Route.MASK),
        ("attention_xformers", False, 128, "cuda", False, Route.MASK),
        ("attention_flash", False, 128, "cuda", False, Route.FOLD),  # 136 <= 256
        ("attention_flash", False, 256, "cuda", False, Route.SDPA),  # 264 > 256
        ("attention_sage", False, 64, "cuda", False, Route.FOLD),  # 72: Sage pads to 128
        ("attention_sage", False, 120, "cuda", True, Route.FOLD),  # 128 fits
        ("attention_sage", False, 128, "cuda", False, Route.SDPA),  # 136: Sage refuses heads over 128
        ("attention_pytorch", True, 64, "cuda", False, Route.FOLD),  # another pack's override may drop masks
        ("attention_pytorch", True, 128, "cuda", False, Route.SDPA),
        ("attention_pytorch", True, 128, "cpu", False, Route.LSE_MERGE),
        ("attention_pytorch", True, 128, "cpu", True, Route.SDPA),  # only a mask carries the caller's mask
    ],
)
def test_route_choice(backend, foreign, dim_head, device, caller_mask, route):
    assert choose_route(backend, foreign, dim_head, device, caller_mask) is route


def test_folded_head_widths():
    assert [folded_head_dim(d) for d in (8, 40, 64, 120, 128)] == [16, 48, 72, 128, 136]


# --- exactness in float64 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 3, 1.5])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize(("skip_reshape", "skip_output_reshape"), [(True, True), (True, False), (False, False)])
def test_fold_equals_the_oracle_on_a_backend_that_drops_masks(layout, factor, skip_reshape, skip_output_reshape):
    q, k, v, k_small, v_small = reduced(layout, factor)
    selection = select_keys(layout, factor, k.device, k.dtype)
    bias_max = key_groups(layout, factor, k.device).bias_max
    out = attend_folded(
        backend_without_masks,
        to_caller(q, skip_reshape),
        to_caller(k_small, skip_reshape),
        to_caller(v_small, skip_reshape),
        2,
        selection.log_group_size,
        bias_max,
        (None,),
        {"skip_reshape": skip_reshape, "skip_output_reshape": skip_output_reshape},
    )
    expected = expected_output(layout, factor, q, k, v)
    expected = expected if skip_output_reshape else to_caller(expected, False)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("factor", [2, 3, 1.5])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("skip_reshape", [True, False])
def test_lse_merge_equals_the_oracle(layout, factor, skip_reshape):
    q, k, v, k_small, v_small = reduced(layout, factor)
    groups = key_groups(layout, factor, k.device)
    out = attend_lse_merged(
        to_caller(q, skip_reshape),
        to_caller(k_small, skip_reshape),
        to_caller(v_small, skip_reshape),
        2,
        groups.sets,
        skip_reshape,
        skip_output_reshape=False,
    )
    torch.testing.assert_close(out, to_caller(expected_output(layout, factor, q, k, v), False), rtol=1e-10, atol=1e-10)


def test_key_groups_partition_the_kept_keys_by_group_size():
    layout = SequenceLayout(7, 1, 9, 13, 0)
    selection = select_keys(layout, 2, torch.device("cpu"), torch.float64)
    groups = key_groups(layout, 2, torch.device("cpu"))
    positions = torch.cat([p for p, _ in groups.sets]).sort().values
    assert torch.equal(positions, torch.arange(selection.indices.numel()))
    for p, log_size in groups.sets:
        assert torch.all(selection.log_group_size[p] == log_size)
    # text and the corner key (1), the border rows and columns (2), the interior (2 x 2)
    assert sorted(round(torch.tensor(s).exp().item()) for _, s in groups.sets) == [1, 2, 4]
    assert groups.bias_max == pytest.approx(torch.tensor(4.0).log().item())


def test_temporal_groups_fold_exactly():
    layout = SequenceLayout(0, 5, 5, 7, 0)
    q, k, v, k_small, v_small = reduced(layout, 2, temporal_factor=2)
    selection = select_keys(layout, 2, k.device, k.dtype, 2)
    bias_max = key_groups(layout, 2, k.device, 2).bias_max
    out = attend_folded(
        backend_without_masks,
        q,
        k_small,
        v_small,
        2,
        selection.log_group_size,
        bias_max,
        (None,),
        {"skip_reshape": True, "skip_output_reshape": True},
    )
    torch.testing.assert_close(out, expected_output(layout, 2, q, k, v, 2), rtol=1e-10, atol=1e-10)


def test_fold_keeps_the_callers_layout_for_heads_split_values():
    """SD3 hands v over as ``[B, L, H, d]`` without skip_reshape: the fold reads it as such."""
    layout = SequenceLayout(5, 1, 8, 8, 0)
    q, k, _, k_small, v_small = reduced(layout, 2)
    selection = select_keys(layout, 2, k.device, k.dtype)
    v_heads = v_small.transpose(1, 2)  # [B, L, H, d]
    q_f, k_f, v_f, dim_head = fold_bias(
        to_caller(q, False), to_caller(k_small, False), v_heads, selection.log_group_size, 1.4, 2, False
    )
    assert dim_head == 8 and q_f.shape[-1] == k_f.shape[-1] == v_f.shape[-1] == 2 * 16


# --- precision --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1.5), (torch.bfloat16, 2.0), (torch.float16, 2.0)])
def test_fold_is_as_precise_as_the_mask_in_low_precision(dtype, tolerance):
    """Relative error against the float64 oracle, over 4 seeds, head width 64, logits of a realistic spread."""
    layout = SequenceLayout(16, 1, 24, 30, 0)
    fold_errors, mask_errors = [], []
    for seed in range(4):
        q, k, v = (t * 1.5 for t in random_qkv(layout, dim=64, seed=seed))
        expected = expected_output(layout, 2, q, k, v)
        q_low, k_low, v_low = (t.to(dtype) for t in (q, k, v))
        k_small, v_small, mask = reduce_keys(k_low, v_low, None, layout, 2, 2)
        with_mask = sdpa_attention(q_low, k_small, v_small, 2, mask, skip_reshape=True, skip_output_reshape=True)
        k_small, v_small, _ = reduce_keys(k_low, v_low, None, layout, 2, 2, False)
        selection = select_keys(layout, 2, k.device, dtype)
        folded = attend_folded(
            backend_without_masks,
            q_low,
            k_small,
            v_small,
            2,
            selection.log_group_size,
            key_groups(layout, 2, k.device).bias_max,
            (None,),
            {"skip_reshape": True, "skip_output_reshape": True},
        )
        norm = expected.norm()
        mask_errors.append(((with_mask.double() - expected).norm() / norm).item())
        fold_errors.append(((folded.double() - expected).norm() / norm).item())
    assert max(fold_errors) <= tolerance * max(mask_errors) + 1e-6, (fold_errors, mask_errors)


# --- through the override ------------------------------------------------------------------------------------------


def flux_override(inner=None) -> ToDoAttentionOverride:
    config = ToDoConfig.create(mode="manual", depth_1_factor=2)
    return ToDoAttentionOverride(config, DIT_FAMILIES["flux"], BlockSelection.parse("all"), inner)


class MaskDroppingOverride:
    """Another pack's attention-backend patch, as SageAttention patch nodes register one: it runs its own kernel
    (here SDPA with the mask dropped, as SageAttention 2 does) and ignores the function it is handed."""

    def __init__(self) -> None:
        self.widths: list[int] = []

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        self.widths.append(q.shape[-1])
        return backend_without_masks(q, k, v, heads, **{n: kwargs[n] for n in ("skip_reshape",) if n in kwargs})


@pytest.mark.parametrize(("dim", "route"), [(8, Route.FOLD), (128, Route.LSE_MERGE)])
def test_an_override_that_drops_masks_stays_exact(dim, route, caplog):
    latent = LatentInfo(1, 18, 22, 6)  # a 9 x 11 grid: uneven borders
    layout = resolve_layout(6 + 99, latent, DIT_FAMILIES["flux"])
    q, k, v = random_qkv(layout, dim=dim)
    inner = MaskDroppingOverride()
    _warned_kinds.clear()
    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        out = flux_override(inner)(
            sdpa_attention, q, k, v, 2, skip_reshape=True, transformer_options={LATENT_INFO_KEY: latent}
        )
    expected = to_caller(expected_output(layout, 2, q, k, v), False)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    warned = [r for r in caplog.records if "run on PyTorch" in r.getMessage()]
    if route is Route.FOLD:
        assert inner.widths == [16] and not warned  # the override ran, on heads folded from 8 to 16
    else:
        assert inner.widths == [] and len(warned) == 1


def test_an_override_gets_the_callers_own_mask_and_the_correction_folded():
    latent = LatentInfo(1, 16, 16, 5)
    layout = resolve_layout(5 + 64, latent, DIT_FAMILIES["flux"])
    q, k, v = random_qkv(layout)
    caller_mask = torch.zeros(layout.tokens, dtype=torch.float64)
    caller_mask[1] = -torch.inf  # the model masks one text token
    seen = []

    def mask_honouring_override(func, q, k, v, heads, mask=None, **kwargs):
        seen.append(None if mask is None else mask.shape)
        return sdpa_attention(q, k, v, heads, mask.view(1, 1, 1, -1), skip_reshape=kwargs.get("skip_reshape", False))

    out = flux_override(mask_honouring_override)(
        sdpa_attention, q, k, v, 2, caller_mask, skip_reshape=True, transformer_options={LATENT_INFO_KEY: latent}
    )
    kept = select_keys(layout, 2, k.device, k.dtype).indices.numel()
    assert seen == [(kept,)]
    positions = oracle_keys(layout, 2)
    expected = attention(q, k[:, :, positions], v[:, :, positions], caller_mask[positions])
    torch.testing.assert_close(out, to_caller(expected, False), rtol=1e-10, atol=1e-10)


def test_todo_inside_another_override_inside_todo_acts_once():
    """A node after ToDo that keeps ToDo's override inside its own, re-wrapped by ToDo at sampling time."""
    latent = LatentInfo(1, 16, 16, 5)
    layout = resolve_layout(5 + 64, latent, DIT_FAMILIES["flux"])
    q, k, v = random_qkv(layout)
    inner_todo = flux_override()
    seen = []

    def keeps_the_previous_override(func, *args, **kwargs):
        seen.append((args[1].shape[2], bool(kwargs["transformer_options"].get(APPLIED_KEY))))
        return inner_todo(func, *args, **kwargs)

    options = {LATENT_INFO_KEY: latent}
    out = flux_override(keeps_the_previous_override)(
        sdpa_attention, q, k, v, 2, skip_reshape=True, transformer_options=options
    )
    kept = select_keys(layout, 2, k.device, k.dtype).indices.numel()
    assert seen == [(kept, True)]
    assert APPLIED_KEY not in options  # the caller's options are never changed
    torch.testing.assert_close(out, to_caller(expected_output(layout, 2, q, k, v), False), rtol=1e-10, atol=1e-10)
