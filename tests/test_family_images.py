"""ToDo on every image DiT family of ComfyUI v0.8.0, through ComfyUI's sampler, on tiny models of its own classes.

For each family (``tests/tiny_image_dits.py``) the keys each attention call
gets are counted at the backend, before and after ToDo: the calls that hold
the image grid (the family's joint attention, its image-only refiners) lose
exactly the image keys the factor drops, while text, registers, padding and
reference tokens are all kept, and every other call (text refiners,
cross-attention) is untouched. Factor 1 and auto at the native size are
bit-identical; odd sizes, batch 2 with CFG, reference images and editing
inputs are covered; the families ToDo cannot reach are left unchanged with one
warning saying why.
"""

from __future__ import annotations

import logging

import pytest
import torch
from comfy_support import apply_node, import_comfyui
from dit_support import LazyModels, check_key_counts, with_probe
from tiny_image_dits import TEXT_TOKENS, TINY_IMAGE_DITS, CallProbe, build, probed_sample, sample

pytestmark = pytest.mark.comfyui

MANUAL_2 = {"mode": "manual", "depth_1_factor": 2.0}
OFF = {"mode": "manual", "depth_1_factor": 1.0}
ACTING = [
    "flux2",
    "chroma",
    "chroma_radiance",
    "lumina2",
    "zimage",
    "hidream",
    "hunyuan_image21",
    "hunyuan_image21_refiner",
    "auraflow",
    "omnigen2",
    "kandinsky5_image",
    "cosmos_predict2",
]
STEPPING_ASIDE = {"pixart": "PixArt", "hunyuan_dit": "HunyuanDiT", "stable_cascade_c": "Stable Cascade stage C"}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    return ceil_div(a, multiple) * multiple


def odd_size(kind: str) -> tuple[int, int]:
    """An odd latent size the family accepts: not divisible by the patch or the factor."""
    if kind == "chroma_radiance":
        return 55, 79  # pixels: a 4 x 5 token grid of 16 px patches, both sides padded
    if TINY_IMAGE_DITS[kind].divisor == 2:
        return 18, 26  # Kandinsky 5 and Cosmos Predict2 need even sides: 9 x 13 tokens
    return (9, 13) if TINY_IMAGE_DITS[kind].patch == (1, 1) else (18, 26)


def image_calls(kind: str, grid: int, text: int, **extras) -> set[int]:
    """Key lengths of the calls that hold the image grid, per family, as its model code builds them.

    ``grid``: image tokens; ``text``: ``c_crossattn`` length. Written from the
    layouts measured on these models (tiny_image_dits.key_layout), not from ToDo's table.
    """
    refs = extras.get("references", ())
    if kind == "flux2":  # [text left-padded to >= 512][grid][reference grids, patch 1]
        return {max(512, text) + grid + sum(h * w for h, w in refs)}
    if kind in ("chroma", "chroma_radiance", "hunyuan_image21_refiner"):
        return {text + grid}
    if kind == "lumina2":  # image refiner [grid]; joint [text][grid]
        return {grid, text + grid}
    if kind == "zimage":  # both runs padded to a multiple of 32 with learned tokens
        padding = round_up(grid, 32) - grid
        return {grid + padding, round_up(text, 32) + grid + padding}
    if kind == "hidream":  # [grid][T5][Llama last layer][Llama layer of the block]
        return {grid + text + 2 * extras.get("llama_tokens", text + 3)}
    if kind == "hunyuan_image21":  # [grid][text][ByT5]
        return {grid + text + extras.get("byt5_tokens", 3)}
    if kind == "auraflow":  # [8 registers][text][grid]
        return {8 + text + grid}
    if kind == "omnigen2":  # noise refiner [grid]; joint [text][reference grids][grid]
        return {grid, text + sum(ceil_div(h, 2) * ceil_div(w, 2) for h, w in refs) + grid}
    if kind in ("kandinsky5_image", "cosmos_predict2"):  # visual self-attention [grid]
        return {grid}
    raise KeyError(kind)


def grid_tokens(kind: str, height: int, width: int, edit: bool = False) -> tuple[int, int]:
    gh, gw = TINY_IMAGE_DITS[kind].grid(height, width * (2 if edit else 1))
    return gh, gw


def reference_refiner_calls(kind: str, calls, grid: int, **extras) -> set[int]:
    """OmniGen2 refines a reference as large as the image in calls of the image's length, after the image's own
    refiner calls (omnigen2.py: noise refiner, then ref refiner): ToDo leaves the references whole."""
    references = extras.get("references", ())
    if kind != "omnigen2" or not any(-(-h // 2) * -(-w // 2) == grid for h, w in references):
        return set()
    same = [i for i, c in enumerate(calls) if c.block_type is None and c.q_tokens == c.kv_tokens == grid]
    return set(same[len(same) // 2 :])


def check_reduction(kind, unpatched, patched, height, width, factor=2, text=TEXT_TOKENS, edit=False, **extras):
    """Every call of the patched run: image calls lose exactly the dropped image keys, the rest are untouched."""
    gh, gw = grid_tokens(kind, height, width, edit)
    full = gh * gw
    kept = ceil_div(gh, factor) * ceil_div(gw, factor)
    images = image_calls(kind, full, text, **extras)
    references = reference_refiner_calls(kind, unpatched.calls, full, **extras)

    def dropped(index, call) -> int:
        is_image = call.q_tokens == call.kv_tokens and call.kv_tokens in images and index not in references
        return full - kept if is_image else 0

    return check_key_counts(unpatched, patched, dropped, f"the {kind} image grid")


@pytest.fixture(scope="module")
def models():
    import_comfyui()
    return LazyModels(build)


def todo_sample(node, base, kind: str, height: int, width: int, inputs: dict, **kwargs):
    """ToDo applied on a probed clone of ``base`` (the probe is registered first, so ToDo calls it with the keys it
    kept), then sampled: ``(output, probe)``."""
    clone, probe = with_probe(base, CallProbe())
    return sample(apply_node(node, clone, **inputs), kind, height, width, **kwargs), probe


def todo_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "comfyui_todo"]


@pytest.mark.parametrize("kind", ACTING)
def test_factor_one_and_auto_at_the_native_size_are_bit_identical(node, models, kind, caplog):
    tiny = TINY_IMAGE_DITS[kind]
    cells = 8 * tiny.patch[0]  # an 8 x 8 token grid
    expected = sample(models[kind], kind, cells, cells, steps=2)
    native = cells * tiny.pixels_per_cell
    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        for inputs in (OFF, {"mode": "auto", "native_resolution": native}):
            patched = apply_node(node, models[kind], **inputs)
            assert torch.equal(sample(patched, kind, cells, cells, steps=2), expected), inputs
    assert not todo_warnings(caplog)


@pytest.mark.parametrize("kind", ACTING)
def test_auto_keeps_the_native_count_at_twice_the_side(node, models, kind):
    tiny = TINY_IMAGE_DITS[kind]
    cells = 8 * tiny.patch[0]
    auto = {"mode": "auto", "native_resolution": cells * tiny.pixels_per_cell}
    _, unpatched = probed_sample(models[kind], kind, 2 * cells, 2 * cells)
    _, probe = todo_sample(node, models[kind], kind, 2 * cells, 2 * cells, auto)
    check_reduction(kind, unpatched, probe, 2 * cells, 2 * cells)  # 16 x 16 tokens -> 8 x 8: the native 64


@pytest.mark.parametrize("kind", ACTING)
def test_factor_two_at_an_odd_size_reduces_image_keys_only(node, models, kind, caplog):
    height, width = odd_size(kind)
    plain, unpatched = probed_sample(models[kind], kind, height, width)
    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        out, probe = todo_sample(node, models[kind], kind, height, width, MANUAL_2)
    check_reduction(kind, unpatched, probe, height, width)
    assert out.shape == plain.shape and torch.isfinite(out).all() and not torch.equal(out, plain)
    assert not todo_warnings(caplog), "every call was placed or knowingly passed"


@pytest.mark.parametrize("kind", ACTING)
def test_batch_two_with_cfg(node, models, kind):
    height, width = odd_size(kind)
    _, unpatched = probed_sample(models[kind], kind, height, width, batch=2, cfg=2.0)
    _, probe = todo_sample(node, models[kind], kind, height, width, MANUAL_2, batch=2, cfg=2.0)
    assert {c.batch for c in probe.calls} == {4}  # cond and uncond of two images in one call
    check_reduction(kind, unpatched, probe, height, width)


@pytest.mark.parametrize(
    ("kind", "extras"),
    [
        pytest.param("flux2", {"references": ((6, 8), (5, 5))}, id="flux2-two-references"),
        pytest.param("omnigen2", {"references": ((14, 10), (9, 9))}, id="omnigen2-two-references"),
        pytest.param("omnigen2", {"references": ((18, 26),)}, id="omnigen2-reference-as-large-as-the-image"),
        pytest.param("hidream", {"edit": True}, id="hidream-e1-edit"),
        pytest.param("hunyuan_image21", {"byt5_tokens": 0}, id="hunyuan-image21-without-glyph-text"),
    ],
)
def test_reference_images_and_editing_inputs(node, models, kind, extras):
    height, width = odd_size(kind)
    _, unpatched = probed_sample(models[kind], kind, height, width, **extras)
    _, probe = todo_sample(node, models[kind], kind, height, width, MANUAL_2, **extras)
    check_reduction(kind, unpatched, probe, height, width, **extras)


@pytest.mark.parametrize("kind", ["zimage", "flux2", "omnigen2"])
def test_text_lengths_around_the_padding(node, models, kind):
    """Z-Image pads the text to 32, Flux.2 to at least 512: long and short texts place the grid alike."""
    height, width = odd_size(kind)
    for text in (1, 31, 33, 600):
        _, unpatched = probed_sample(models[kind], kind, height, width, text_tokens=text)
        _, probe = todo_sample(node, models[kind], kind, height, width, MANUAL_2, text_tokens=text)
        check_reduction(kind, unpatched, probe, height, width, text=text)


@pytest.mark.parametrize("kind", sorted(STEPPING_ASIDE))
def test_families_out_of_reach_step_aside_with_one_warning_saying_why(node, models, kind, caplog):
    tiny = TINY_IMAGE_DITS[kind]
    side = max(tiny.min_cells, 18)
    expected, unpatched = probed_sample(models[kind], kind, side, side)
    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        out, probe = todo_sample(node, models[kind], kind, side, side, MANUAL_2)
    warnings = todo_warnings(caplog)
    assert len(warnings) == 1 and STEPPING_ASIDE[kind] in warnings[0] and "left unchanged" in warnings[0]
    assert torch.equal(out, expected)
    assert [(c.q_tokens, c.kv_tokens) for c in probe.calls] == [(c.q_tokens, c.kv_tokens) for c in unpatched.calls]
