"""The tiny image DiTs of :mod:`tiny_image_dits`: built as a loader builds them, sampled by ComfyUI, probed.

What every family's attention calls look like in one model call (one sampler step at CFG 1) is
pinned down here: the number of calls of each kind, their query and key lengths as functions of
the token grid and the text length, the calling convention, and, position by position, which
input each key comes from (:func:`tiny_image_dits.key_layout`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
from comfy_support import import_comfyui
from tiny_image_dits import (
    TINY_IMAGE_DITS,
    build,
    family,
    first_of_each_kind,
    key_layout,
    latent_shape,
    probed_sample,
    sample,
    segments,
)

pytestmark = pytest.mark.comfyui

KINDS = list(TINY_IMAGE_DITS)
REACHING = [kind for kind in KINDS if family(kind).reaches_override]


@functools.cache
def tiny(kind: str):
    """One build per family for the whole module."""
    import_comfyui()
    return build(kind)


@pytest.fixture(scope="module", autouse=True)
def _release_the_models():
    yield
    tiny.cache_clear()  # while ComfyUI is still importable: a ModelPatcher left to the interpreter's exit warns


def odd_size(kind: str) -> tuple[int, int]:
    """The size each family is sampled at: odd cell counts (whole patches padded) where the family takes them."""
    spec = family(kind)
    if kind == "chroma_radiance":
        return 41, 57  # pixels: a partial 16-pixel patch on both sides
    if spec.min_cells > 1:
        return spec.min_cells, spec.min_cells + 4
    if spec.divisor > 1:
        return 18, 26  # 9 x 13 tokens: an odd token grid
    return 9, 13


# ---------------------------------------------------------------------------------------------------------------
# Building and sampling
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_loader_picks_the_same_config_class(kind):
    """``model_config_from_unet_config`` (what a checkpoint loader calls) picks the family's config class."""
    import_comfyui()
    import comfy.model_base
    import comfy.model_detection
    import comfy.supported_models

    spec = family(kind)
    config = comfy.model_detection.model_config_from_unet_config({**spec.unet_config, **spec.full_width})
    assert type(config) is getattr(comfy.supported_models, spec.config)
    patcher = tiny(kind)
    assert type(patcher.model) is getattr(comfy.model_base, spec.model)
    assert type(patcher.model.model_config) is getattr(comfy.supported_models, spec.config)
    assert sum(p.numel() for p in patcher.model.diffusion_model.parameters()) < 10_000_000


@pytest.mark.parametrize("kind", KINDS)
def test_samples_a_finite_latent_at_an_odd_size(kind):
    height, width = odd_size(kind)
    patcher = tiny(kind)
    out = sample(patcher, kind, height, width, steps=2)
    assert out.shape == latent_shape_out(patcher, 1, height, width)
    assert torch.isfinite(out).all()
    assert out.abs().amax() > 0


def latent_shape_out(patcher, batch, height, width):
    """The sampled latent's shape: the refiner's ``process_latent_out`` turns 64 channels into 32."""
    shape = latent_shape(patcher, batch, height, width)
    if patcher.model.model_config.__class__.__name__ == "HunyuanImage21Refiner":
        return (batch, 32, *shape[2:])
    return shape


@pytest.mark.parametrize("kind", [kind for kind in KINDS if family(kind).divisor > 1])
def test_families_that_need_even_latents_fail_on_odd_ones(kind):
    """Kandinsky 5 does not crop its padded output, Cosmos Predict2's patch embedding asserts, PixArt's unpatchify
    asserts: their latent sides must be even."""
    height, width = odd_size(kind)
    with pytest.raises((AssertionError, RuntimeError)):
        sample(tiny(kind), kind, height + 1, width + 1)


def test_pixart_needs_a_mean_latent_side_above_32():
    """PixArt's position embedding divides by ``round(mean side / 64) * 64 // 2``: zero below 33 cells."""
    with pytest.raises(ZeroDivisionError):
        sample(tiny("pixart"), "pixart", 32, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_two_with_cfg_two_batches_cond_and_uncond_into_one_call(kind):
    height, width = odd_size(kind)
    extras = {"references": [(4, 6)]} if kind in ("flux2", "omnigen2") else {}
    patcher = tiny(kind)
    out, probe = probed_sample(patcher, kind, height, width, batch=2, cfg=2.0, **extras)
    assert out.shape == latent_shape_out(patcher, 2, height, width)
    assert torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])
    if family(kind).reaches_override:
        assert probe.records and {r.batch for r in probe.records} == {4}
    else:
        assert probe.records == []


@pytest.mark.parametrize("kind", KINDS)
def test_the_probe_sees_calls_exactly_where_the_override_is_reached(kind):
    """PixArt and HunyuanDiT call ``optimized_attention`` without ``transformer_options``: nothing reaches the
    override. Stable Cascade C does pass it (``cascade/common.py``), so its calls do reach it."""
    height, width = odd_size(kind)
    _, probe = probed_sample(tiny(kind), kind, height, width)
    if family(kind).reaches_override:
        assert probe.records
    else:
        assert probe.records == []
        assert probe.calls == []


# ---------------------------------------------------------------------------------------------------------------
# The attention calls of one model call
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """Calls of one kind in one model call: ``count`` calls of this block type with these lengths; ``layout``:
    the first call's key segments (label, length) as :func:`tiny_image_dits.key_layout` finds them."""

    block_type: str | None
    q: int
    k: int
    count: int
    layout: tuple[tuple[str, int], ...]


def joint(block_type, count, *layout):
    length = sum(n for _, n in layout if n)
    return Kind(block_type, length, length, count, tuple((label, n) for label, n in layout if n))


def mixed(block_type, count, length):
    """Calls whose keys every input has reached (single-stream blocks after double-stream ones)."""
    return Kind(block_type, length, length, count, ())


def up(n: int, multiple: int) -> int:
    return n + (-n) % multiple


def expected(kind: str, size: tuple[int, int], text: int, **extras) -> list[Kind]:
    """The call kinds of one model call of the tiny ``kind`` at a latent ``size``, in order of first appearance."""
    grid = family(kind).grid(*size)
    g = math.prod(grid)
    if kind == "flux2":  # text left-padded with zeros to 512; references after the target grid
        refs = sum(h * w for h, w in extras.get("references", ()))
        layout = [("const", max(512 - text, 0)), ("text", text), ("noise", g), ("ref", refs)]
        return [joint("double", 2, *layout), mixed("single", 2, max(512, text) + g + refs)]
    if kind in ("chroma", "chroma_radiance"):
        layout = [("text", text), ("noise", g)]
        return [joint("double", 2, *layout), mixed("single", 2, text + g)]
    if kind == "lumina2":  # text-only and image-only refiners first, without block info
        return [
            joint(None, 1, ("text", text)),
            joint(None, 1, ("noise", g)),
            joint("double", 2, ("text", text), ("noise", g)),
        ]
    if kind == "zimage":  # text and image each padded to a multiple of 32 with learned tokens
        tp, gp = up(text, 32), up(g, 32)
        return [
            joint(None, 1, ("text", text), ("const", tp - text)),
            joint(None, 1, ("noise", g), ("const", gp - g)),
            joint("double", 2, ("text", tp), ("noise", gp)),
        ]
    if kind == "hidream":  # image first; T5, then the last Llama layer and the block's Llama layer
        llama = extras.get("llama_tokens", text + 3)
        if extras.get("edit"):  # E1: the source beside the target along the width, then patched row by row
            width = size[1]
            columns = [
                "+".join(
                    part for part, inside in (("noise", 2 * j < width), ("image_cond", 2 * j + 1 >= width)) if inside
                )
                for j in range(width)
            ]
            layout = segments(columns * grid[0])
            length = grid[0] * width
        else:
            layout, length = [("noise", g)], g
        length += text + 2 * llama
        return [Kind(None, length, length, 4, (*layout, ("text", text), ("llama", 2 * llama)))]
    if kind == "hunyuan_image21":  # a text-only token refiner; image first, ByT5 glyph text after the LLM text
        byt5 = extras.get("byt5_tokens", 3)
        layout = [("noise", g), ("text", text), ("byt5", byt5)]
        return [joint(None, 2, ("text", text)), joint("double", 2, *layout), mixed("single", 2, g + text + byt5)]
    if kind == "hunyuan_image21_refiner":
        layout = [("noise+image_cond", g), ("text", text)]
        return [joint(None, 2, ("text", text)), joint("double", 2, *layout), mixed("single", 2, g + text)]
    if kind == "auraflow":  # 8 learned register tokens before the text; no block info
        return [joint(None, 2, ("const", 8), ("text", text), ("noise", g))]
    if kind == "omnigen2":  # refiners: text, target, references; main: text, references, target LAST
        refs = sum(-(-h // 2) * -(-w // 2) for h, w in extras.get("references", ()))
        out = [joint(None, 1, ("text", text)), joint(None, 1, ("noise", g))]
        if refs:
            out.append(joint(None, 1, ("ref", refs)))
        return [*out, joint(None, 2, ("text", text), ("ref", refs), ("noise", g))]
    if kind == "kandinsky5_image":  # text-encoder self-attention; image-only self-attention; cross-attention
        return [
            joint(None, 1, ("text", text)),
            joint("double", 2, ("noise", g)),
            Kind("double", g, text, 2, (("text", text),)),
        ]
    if kind == "cosmos_predict2":  # image-only self-attention and cross-attention, no block info
        return [joint(None, 2, ("noise", g)), Kind(None, g, text, 2, (("text", text),))]
    if kind == "stable_cascade_c":  # queries: the feature map; keys: map, text, 4 pooled, 4 (zero) image tokens
        return [Kind(None, g, g + text + 8, 4, (("noise", g), ("text", text), ("pooled", 4), ("const", 4)))]
    return []


SKIP_RESHAPE = {"hidream": False, "stable_cascade_c": False}
"""``[B, L, heads * dim]`` q/k/v (token dim 1) instead of ``[B, heads, L, dim]``."""

CASES = [
    # kind, latent size, text tokens, extras: one case with the layout, one with other sizes (lengths only)
    *[(kind, odd_size(kind), 5, {}, True) for kind in REACHING],
    *[(kind, (10, 14), 9, {}, False) for kind in REACHING if kind != "chroma_radiance"],
    ("chroma_radiance", (40, 72), 9, {}, False),
    ("flux2", (9, 13), 5, {"references": [(6, 8), (5, 7)]}, True),
    ("flux2", (6, 4), 600, {}, False),  # text over 512 tokens: no padding
    ("omnigen2", (9, 13), 5, {"references": [(6, 8), (5, 7)]}, True),
    ("hidream", (9, 13), 5, {"edit": True}, True),
    ("hidream", (10, 14), 9, {"edit": True, "llama_tokens": 4}, False),
    ("hunyuan_image21", (9, 13), 5, {"byt5_tokens": 0}, False),
]


def call_kinds(records) -> list[tuple]:
    """``(block_type, q, k, count)`` per kind of call, in order of first appearance."""
    counts: dict[tuple, int] = {}
    for record in records:
        key = (record.block_type, record.q_tokens, record.kv_tokens)
        counts[key] = counts.get(key, 0) + 1
    return [(*key, count) for key, count in counts.items()]


@pytest.mark.parametrize(("kind", "size", "text", "extras", "layout"), CASES)
def test_attention_calls_of_one_model_call(kind, size, text, extras, layout):
    """Kinds, counts and lengths of the calls; where ``layout``, also which input each key position comes from."""
    patcher = tiny(kind)
    want = expected(kind, size, text, **extras)
    if layout:
        layouts = key_layout(patcher, kind, *size, text_tokens=text, **extras)
        records = [entry.record for entry in layouts]
        firsts = first_of_each_kind(layouts)
        assert len(firsts) == len(want)
        for first, kind_wanted in zip(firsts, want, strict=True):
            if kind_wanted.layout:  # single-stream calls: every key has mixed every input already
                assert tuple(first.segments) == kind_wanted.layout, first.record
    else:
        _, probe = probed_sample(patcher, kind, *size, text_tokens=text, **extras)
        records = probe.records
    assert call_kinds(records) == [(w.block_type, w.q, w.k, w.count) for w in want]
    for record in records:
        assert record.mask_shape is None
        assert record.skip_reshape == SKIP_RESHAPE.get(kind, True)
        assert record.heads_keyword == (kind == "kandinsky5_image")
        assert record.batch == 1
        assert (record.block_index is None) == (record.block_type is None)
