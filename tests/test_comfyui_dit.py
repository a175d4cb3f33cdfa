"""ToDo on diffusion transformers built from ComfyUI's own model classes, run through ComfyUI's sampler.

Tiny random-weight Flux, SD3, Qwen-Image and Wan models (few blocks, small
width): bit-identical at factor 1; image keys reduced where configured, text
keys and queries never; odd latent sizes; batch and CFG; block selection;
mass correction; unsupported DiTs left alone; no double reduction; sigma range.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from comfy_support import apply_node, import_comfyui
from dit_support import FAMILIES, OVERRIDE_KEY, TEXT_TOKENS, DiTProbe, sample_dit, tiny_dit, token_grid, with_probe

pytestmark = pytest.mark.comfyui

MANUAL_2 = {"mode": "manual", "depth_1_factor": 2.0}
ODD_LATENT = (18, 26)
"""Token grid 9 x 13: the factor 2 divides neither side."""
WAN_FRAMES = 3


@pytest.fixture(scope="module")
def dits():
    import_comfyui()
    return {kind: tiny_dit(kind) for kind in FAMILIES}


def frames_for(kind: str) -> int:
    return WAN_FRAMES if kind == "wan" else 1


def expected_pairs(kind: str, latent_hw: tuple[int, int], factor: int, text: int = TEXT_TOKENS) -> set[tuple[int, int]]:
    """Every (query tokens, key tokens) pair the attention backend should see in one model call."""
    grid_h, grid_w = token_grid(*latent_hw)
    full = grid_h * grid_w
    kept = -(-grid_h // factor) * -(-grid_w // factor)
    frames = frames_for(kind)
    if kind == "wan":  # image-only self-attention per frame; cross-attention to the text, never reduced
        return {(frames * full, frames * kept), (frames * full, text)}
    pairs = {(text + full, text + kept)}  # joint attention: text first, all of it kept
    if kind == "sd3":  # SD3.5's extra image-only self-attention (x_block_self_attn in block 0)
        pairs.add((full, kept))
    return pairs


def run(model, kind: str, latent_hw=ODD_LATENT, **kwargs) -> torch.Tensor:
    return sample_dit(model, *latent_hw, frames=frames_for(kind), **kwargs)


def todo_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "comfyui_todo"]


# (1) factor 1: bit-identical --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize(
    "inputs",
    [
        pytest.param({"mode": "manual", "depth_1_factor": 1.0, "depth_2_factor": 1.0, "depth_3_factor": 1.0}, id="off"),
        # Depth 2 and 3 factors are UNet-only: the override is installed and must still leave every call alone.
        pytest.param({"mode": "manual", "depth_1_factor": 1.0, "depth_2_factor": 2.0}, id="manual-1"),
        pytest.param({"mode": "auto"}, id="auto-detected-native"),
    ],
)
def test_factor_one_is_bit_identical(node, dits, kind, inputs):
    model = dits[kind]
    expected = run(model, kind, steps=2)
    patched = apply_node(node, model, **inputs)
    if inputs.get("depth_2_factor") == 2.0:
        assert OVERRIDE_KEY in patched.model_options["transformer_options"]
    assert torch.equal(run(patched, kind, steps=2), expected)


@pytest.mark.parametrize("kind", FAMILIES)
def test_auto_mode_is_identical_at_native_size_and_reduces_above_it(node, dits, kind):
    # native 128 px = a 16 x 16 latent = an 8 x 8 token grid: the budget is 64 image keys.
    model, probe = with_probe(dits[kind])
    patched = apply_node(node, model, mode="auto", native_resolution=128)
    assert torch.equal(run(patched, kind, (16, 16)), run(dits[kind], kind, (16, 16)))
    assert probe.calls and all(c.q_tokens == c.kv_tokens for c in probe.self_attention())
    probe.reset()
    run(patched, kind, (32, 32))  # twice the native side: factor 2, 16 x 16 tokens -> 8 x 8
    assert {(c.q_tokens, c.kv_tokens) for c in probe.calls} == expected_pairs(kind, (32, 32), 2)


# (2) factor 2: image keys reduced, text keys and queries kept ------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("latent_hw", [ODD_LATENT, (17, 9), (16, 16)], ids=["18x26", "17x9", "16x16"])
def test_factor_two_reduces_image_keys_only(node, dits, kind, latent_hw):
    unpatched, unpatched_probe = with_probe(dits[kind])
    expected = run(unpatched, kind, latent_hw)
    assert {(c.q_tokens, c.kv_tokens) for c in unpatched_probe.calls} == expected_pairs(kind, latent_hw, 1)

    model, probe = with_probe(dits[kind])
    out = run(apply_node(node, model, **MANUAL_2), kind, latent_hw)
    assert {(c.q_tokens, c.kv_tokens) for c in probe.calls} == expected_pairs(kind, latent_hw, 2)
    assert len(probe.calls) == len(unpatched_probe.calls)
    assert out.shape == expected.shape and torch.isfinite(out).all()
    assert not torch.equal(out, expected)


def test_wan_cross_attention_is_never_reduced_even_when_as_long_as_the_image(node, dits):
    # One frame of an 8 x 10 latent = 20 image tokens, and 20 text tokens: shapes alone cannot tell
    # cross-attention from self-attention. (Wan's text encoder pads every prompt to 512 tokens: a 512 x 256
    # image, or 2 frames at 256 x 256, has exactly as many image tokens.) The node flags the cross-attention
    # modules' calls, so each block reduces its self-attention and keeps every text key.
    model, probe = with_probe(dits["wan"])
    sample_dit(apply_node(node, model, **MANUAL_2), 8, 10, text_tokens=20)
    pairs = [(c.q_tokens, c.kv_tokens) for c in probe.calls]
    blocks = dits["wan"].model.diffusion_model.blocks
    assert pairs == [(20, 6), (20, 20)] * len(blocks), "per block: self-attention reduced, then all 20 text keys"
    sample_dit(dits["wan"], 8, 10, text_tokens=20)  # ComfyUI takes the object patches off for the plain model
    assert type(vars(blocks[0].cross_attn).get("forward")).__name__ != "CrossAttentionFlag"


def test_wan_temporal_factor_reduces_frames_as_well(node, dits):
    model, probe = with_probe(dits["wan"])
    out = run(apply_node(node, model, **MANUAL_2, temporal_factor=2.0), "wan", (16, 16))
    # 3 frames of 8 x 8 tokens: frames 0 and 2 kept, each with 4 x 4 of its tokens.
    assert {(c.q_tokens, c.kv_tokens) for c in probe.calls} == {(3 * 64, 2 * 16), (3 * 64, TEXT_TOKENS)}
    assert torch.isfinite(out).all()
    off_in_time, time_probe = with_probe(dits["wan"])
    run(apply_node(node, off_in_time, mode="manual", depth_1_factor=1.0, temporal_factor=3.0), "wan", (16, 16))
    assert {(c.q_tokens, c.kv_tokens) for c in time_probe.calls} == {(3 * 64, 64), (3 * 64, TEXT_TOKENS)}


# (3) batch and CFG ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
def test_batch_and_cfg(node, dits, kind):
    model, probe = with_probe(dits[kind])
    patched = apply_node(node, model, **MANUAL_2)
    expected = expected_pairs(kind, ODD_LATENT, 2)

    plain = run(patched, kind, batch=2, cfg=1.0)
    assert {c.batch for c in probe.calls} == {2}, "CFG 1 runs the positive conditioning only"
    assert {(c.q_tokens, c.kv_tokens) for c in probe.calls} == expected
    rows_without_cfg = sum(c.batch for c in probe.calls)
    probe.reset()

    guided = run(patched, kind, batch=2, cfg=4.0)
    assert {c.batch for c in probe.calls} <= {2, 4}  # positive and negative, batched together when memory allows
    assert sum(c.batch for c in probe.calls) == 2 * rows_without_cfg
    assert {(c.q_tokens, c.kv_tokens) for c in probe.calls} == expected
    assert guided.shape == plain.shape and torch.isfinite(guided).all() and torch.isfinite(plain).all()
    assert not torch.equal(guided, plain)


# (4) dit_blocks ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "blocks", "reduced"),
    [
        ("flux", "single", {("single", 0), ("single", 1)}),
        ("flux", "double:0", {("double", 0)}),
        ("flux", "double, single:1", {("double", 0), ("double", 1), ("single", 1)}),
        ("qwen_image", "1", {("double", 1)}),
        ("wan", "0", {("double", 0)}),
    ],
)
def test_dit_blocks_selects_blocks(node, dits, kind, blocks, reduced):
    model, probe = with_probe(dits[kind])
    run(apply_node(node, model, dit_blocks=blocks, **MANUAL_2), kind)
    unreduced, reduced_pairs = expected_pairs(kind, ODD_LATENT, 1), expected_pairs(kind, ODD_LATENT, 2)
    (full_pair,), (kept_pair,) = unreduced - reduced_pairs, reduced_pairs - unreduced
    for call in probe.calls:
        pair = (call.q_tokens, call.kv_tokens)
        if kind == "wan" and call.kv_tokens == TEXT_TOKENS:
            continue
        if (call.block_type, call.block_index) in reduced:
            assert pair == kept_pair, call
        else:
            assert pair == full_pair, call


def test_dit_blocks_on_sd3_acts_everywhere_with_one_warning_per_render(node, dits, caplog):
    model, probe = with_probe(dits["sd3"])
    patched = apply_node(node, model, dit_blocks="0", **MANUAL_2)
    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        run(patched, "sd3", steps=2)
        assert len([w for w in todo_warnings(caplog) if "block indices" in w]) == 1
        run(patched, "sd3", steps=2)
        assert len([w for w in todo_warnings(caplog) if "block indices" in w]) == 2
    assert {(c.q_tokens, c.kv_tokens) for c in probe.calls} == expected_pairs("sd3", ODD_LATENT, 2)


# (5) mass correction -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flux", "qwen_image", "sd3"])
def test_joint_attention_gets_the_mass_correction_mask(node, dits, kind):
    model, probe = with_probe(dits[kind])
    run(apply_node(node, model, **MANUAL_2), kind, (16, 16))  # an 8 x 8 grid: the factor divides it
    joint = [c for c in probe.calls if c.q_tokens == TEXT_TOKENS + 64]
    assert joint and all(c.kv_tokens == TEXT_TOKENS + 16 for c in joint)
    assert all(c.mask_shape is not None and c.mask_shape[-1] == TEXT_TOKENS + 16 for c in joint)


def test_image_only_attention_on_a_divisible_grid_needs_no_mask(node, dits):
    model, probe = with_probe(dits["wan"])
    run(apply_node(node, model, **MANUAL_2), "wan", (16, 16))
    own = [c for c in probe.calls if c.kv_tokens != TEXT_TOKENS]
    assert own and all(c.kv_tokens == WAN_FRAMES * 16 and c.mask_shape is None for c in own)
    probe.reset()
    run(apply_node(node, model, **MANUAL_2), "wan", ODD_LATENT)  # 9 x 13: border groups are smaller
    own = [c for c in probe.calls if c.kv_tokens != TEXT_TOKENS]
    assert own and all(c.mask_shape is not None and c.mask_shape[-1] == c.kv_tokens for c in own)


# (6) DiTs this file's first version found unsupported now act (every family: test_family_images.py) ---------------


@pytest.mark.parametrize("kind", ["lumina2", "auraflow"])
def test_lumina2_and_auraflow_now_act_without_a_warning(node, kind, caplog):
    import_comfyui()
    model, probe = with_probe(tiny_dit(kind))
    expected = sample_dit(model, 16, 16)
    unpatched = [(c.q_tokens, c.kv_tokens) for c in probe.calls]
    probe.reset()
    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        out = sample_dit(apply_node(node, model, **MANUAL_2), 16, 16)
    assert not todo_warnings(caplog)
    assert not torch.equal(out, expected)
    reduced = [(q, kv) for (q, kv), c in zip(unpatched, probe.calls, strict=True) if c.kv_tokens == kv - (64 - 16)]
    assert reduced, "the 8 x 8 image grid lost 48 of its 64 keys in some call"


# (7) applying twice; the input model is never changed ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_applying_twice_reduces_once_and_never_mutates_the_input(node, dits, kind):
    model, probe = with_probe(dits[kind])
    options_before = copy.copy(model.model_options)
    transformer_before = dict(model.model_options["transformer_options"])
    wrappers_before = copy.deepcopy(model.wrappers)

    once = apply_node(node, model, mode="manual", depth_1_factor=3.0)
    twice = apply_node(node, once, **MANUAL_2)
    assert model.model_options == options_before
    assert model.model_options["transformer_options"] == transformer_before
    assert model.model_options["transformer_options"][OVERRIDE_KEY] is probe
    assert model.wrappers == wrappers_before
    once_transformer = dict(once.model_options["transformer_options"])

    run(twice, kind)
    assert {(c.q_tokens, c.kv_tokens) for c in probe.calls} == expected_pairs(kind, ODD_LATENT, 2)
    assert once.model_options["transformer_options"] == once_transformer
    probe.reset()
    run(once, kind)
    assert {(c.q_tokens, c.kv_tokens) for c in probe.calls} == expected_pairs(kind, ODD_LATENT, 3)


# (8) sigma range -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_start_percent_leaves_the_first_step_unreduced(node, dits, kind):
    model, probe = with_probe(dits[kind])
    patched = apply_node(node, model, start_percent=0.5, **MANUAL_2)
    # Every family's percent_to_sigma(0.5) lies between these two steps.
    run(patched, kind, sigmas=torch.tensor([1.0, 0.3, 0.0]))
    first = {(c.q_tokens, c.kv_tokens) for c in probe.calls if c.sigma == 1.0}
    second = {(c.q_tokens, c.kv_tokens) for c in probe.calls if c.sigma is not None and abs(c.sigma - 0.3) < 1e-6}
    assert first == expected_pairs(kind, ODD_LATENT, 1)
    assert second == expected_pairs(kind, ODD_LATENT, 2)


def test_probe_is_shared_by_clones():
    probe = DiTProbe()
    assert copy.deepcopy({"x": probe})["x"] is probe


@pytest.mark.parametrize(
    "backend", ["attention_basic", "attention_sub_quad", "attention_split", "attention_pytorch", "attention_sage"]
)
@pytest.mark.parametrize("skip_reshape", [True, False])
def test_every_comfyui_backend_computes_the_mass_corrected_oracle(backend, skip_reshape):
    """The correction mask is honoured by each of ComfyUI's own backends (or SDPA stands in for one that cannot)."""
    import_comfyui()
    import comfy.ldm.modules.attention as attention_module

    from todo_core import ToDoConfig
    from todo_core.dit import (
        DIT_FAMILIES,
        LATENT_INFO_KEY,
        BlockSelection,
        LatentInfo,
        ToDoAttentionOverride,
        resolve_layout,
        select_keys,
    )

    if backend == "attention_sage":  # SageAttention needs CUDA: a stand-in that ignores the mask as it does

        def attention_sage(q, k, v, heads, mask=None, **kwargs):
            return attention_module.attention_pytorch(q, k, v, heads, **kwargs)

        function = attention_sage
    else:
        function = getattr(attention_module, backend)
    latent = LatentInfo(1, 18, 22, 5)  # token grid 9 x 11: uneven border groups
    layout = resolve_layout(5 + 99, latent, DIT_FAMILIES["flux"])
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, layout.tokens, 16, generator=generator) for _ in range(3))
    selection = select_keys(layout, 2, torch.device("cpu"))
    groups = selection.log_group_size.exp().round().long()
    full_positions = torch.repeat_interleave(torch.arange(len(groups)), groups)  # group-replaced keys, any order
    expected = (
        torch.nn.functional.scaled_dot_product_attention(
            q, k[:, :, selection.indices[full_positions]], v[:, :, selection.indices[full_positions]]
        )
        .transpose(1, 2)
        .reshape(2, layout.tokens, -1)
    )
    if not skip_reshape:
        q, k, v = (t.transpose(1, 2).reshape(2, layout.tokens, -1) for t in (q, k, v))
    override = ToDoAttentionOverride(
        ToDoConfig.create(mode="manual", depth_1_factor=2), DIT_FAMILIES["flux"], BlockSelection.parse("all")
    )
    out = override(function, q, k, v, 2, skip_reshape=skip_reshape, transformer_options={LATENT_INFO_KEY: latent})
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# half precision through the sampler -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flux", "wan"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dits_through_the_sampler(node, kind, dtype):
    from dit_support import with_dtype_probe

    model = tiny_dit(kind, dtype=dtype)  # the build checks that its plain render is finite
    assert model.model.get_dtype() == dtype
    plain = run(model, kind)
    probed, probe = with_dtype_probe(model)
    out = run(apply_node(node, probed, **MANUAL_2), kind)
    assert out.shape == plain.shape and out.dtype == plain.dtype and torch.isfinite(out).all()
    assert not torch.equal(out, plain)
    assert {(c.q_tokens, c.kv_tokens) for c in probe.calls} == expected_pairs(kind, ODD_LATENT, 2)
    # The attention runs in the model's dtype, the mass-correction mask (9 x 13 tokens: uneven groups) too.
    assert {d[:3] for d in probe.dtypes} == {(dtype, dtype, dtype)}
    masks = {d[3] for d in probe.dtypes if len(d) == 4}
    assert masks == {dtype}, "the reduced calls carry a mask in the model's dtype"
