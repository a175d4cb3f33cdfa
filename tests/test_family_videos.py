"""ToDo on every video DiT family of ComfyUI v0.8.0, through ComfyUI's sampler, on tiny models of its own classes.

For each family (``tests/tiny_video_dits.py``), several frames: the keys each
attention call gets are counted at the backend before and after ToDo. Video
self-attention (alone, or joint with the text for HunyuanVideo and Mochi)
loses exactly the image keys the factor drops in every frame; text, reference,
motion, guide and audio tokens are all kept; cross-attention, text refiners
and LTX-2's audio and audio-video calls are untouched. Factor 1 and auto at
the native size are bit-identical.
"""

from __future__ import annotations

import logging

import pytest
import torch
from comfy_support import apply_node, import_comfyui
from dit_support import LazyModels, check_key_counts, with_probe
from tiny_video_dits import TEXT_TOKENS, TINY_VIDEO_DITS, build, ltxav_audio_latents, pixels_per_cell, sample
from tiny_video_dits import token_grid as video_grid

pytestmark = pytest.mark.comfyui

MANUAL_2 = {"mode": "manual", "depth_1_factor": 2.0}
OFF = {"mode": "manual", "depth_1_factor": 1.0}
FRAMES = 3
KINDS = sorted(TINY_VIDEO_DITS)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def odd_size(kind: str) -> tuple[int, int]:
    """A size not divisible by the factor in tokens: odd latent sides where the family takes them."""
    tiny = TINY_VIDEO_DITS[kind]
    if tiny.min_size > 6:
        return 10, 14  # Wan S2V: 8 cells at least, even; a 5 x 7 token grid
    return (9, 13) if tiny.spatial_multiple == 1 else (6, 10)


def image_sequence(kind: str, height: int, width: int, frames: int, text: int, **extras) -> tuple[int, int]:
    """(key length of the calls that hold the video grid, frames of the grid ToDo reduces in them).

    Written from each family's code as measured on these models, not from ToDo's table.
    """
    t, h, w = video_grid(kind, height, width, frames)
    cells = h * w
    if kind == "hunyuan_video":  # [reference frame][video][text]; the reference is kept whole
        return t * cells + text + (cells if extras.get("ref_latent") else 0), t
    if kind == "hunyuan_video15":  # [video][vision][byT5][LLM text]
        return t * cells + extras.get("vision_tokens", 0) + extras.get("byt5_tokens", 0) + text, t
    if kind == "mochi":  # [video][text cropped to its real tokens]
        return t * cells + text - extras.get("masked_text", 0), t
    if kind == "ltxv":  # [video][guide frames], guide tokens with a negative denoise mask dropped
        total = (t + extras.get("guides", 0)) * cells - extras.get("drop_guide_tokens", 0)
        return total, total // cells
    if kind in ("ltxav", "kandinsky5", "cosmos", "cosmos_predict2_video"):
        return t * cells, t
    # Wan: [reference frame (ref_conv)][video][concatenated frames][HuMo reference][S2V reference + motion]
    length = (t + extras.get("time_dim_concat", 0)) * cells
    length += cells if extras.get("reference_latent") or (kind == "wan_humo" and extras.get("reference", True)) else 0
    if kind == "wan_s2v":
        from tiny_video_dits import s2v_motion_tokens

        length += cells + s2v_motion_tokens(height, width)
        return length, t  # reference and motion tokens are not whole frames of the grid: the video's t frames
    return length, length // cells


def check_reduction(kind, unpatched, patched, height, width, frames, factor=2, temporal=1, text=TEXT_TOKENS, **extras):
    _, h, w = video_grid(kind, height, width, frames)
    cells, kept_cells = h * w, ceil_div(h, factor) * ceil_div(w, factor)
    length, image_frames = image_sequence(kind, height, width, frames, text, **extras)
    dropped = image_frames * cells - ceil_div(image_frames, temporal) * kept_cells

    def dropped_keys(_, call) -> int:
        return dropped if call.q_tokens == call.kv_tokens == length else 0

    return check_key_counts(unpatched, patched, dropped_keys, f"the {kind} video grid")


@pytest.fixture(scope="module")
def models():
    import_comfyui()
    return LazyModels(build)


def probed(node, base, kind, height, width, frames, inputs=None, **kwargs):
    """``(output, probe)`` of a render, ToDo applied after the probe so that it calls the probe with its keys."""
    clone, probe = with_probe(base)
    patched = clone if inputs is None else apply_node(node, clone, **inputs)
    return sample(patched, kind, height, width, frames, **kwargs), probe


def latent(out) -> torch.Tensor:
    return out.unbind()[0] if hasattr(out, "unbind") and not isinstance(out, torch.Tensor) else out


def todo_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "comfyui_todo"]


@pytest.mark.parametrize("kind", KINDS)
def test_factor_one_and_auto_at_the_native_size_are_bit_identical(node, models, kind, caplog):
    side = 8  # latent cells: 4 x 4 or 8 x 8 tokens per frame
    expected = latent(sample(models[kind], kind, side, side, 2, steps=2))
    native = side * pixels_per_cell(kind)[1]
    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        for inputs in (OFF, {"mode": "auto", "native_resolution": native}):
            out = latent(sample(apply_node(node, models[kind], **inputs), kind, side, side, 2, steps=2))
            assert torch.equal(out, expected), inputs
    assert not todo_warnings(caplog)


@pytest.mark.parametrize("kind", KINDS)
def test_factor_two_reduces_every_frame_and_keeps_all_other_tokens(node, models, kind, caplog):
    height, width = odd_size(kind)
    plain, unpatched = probed(node, models[kind], kind, height, width, FRAMES)
    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        out, probe = probed(node, models[kind], kind, height, width, FRAMES, MANUAL_2)
    check_reduction(kind, unpatched, probe, height, width, FRAMES)
    plain, out = latent(plain), latent(out)
    assert out.shape == plain.shape and torch.isfinite(out).all() and not torch.equal(out, plain)
    assert not todo_warnings(caplog), "every call was placed or knowingly passed"


@pytest.mark.parametrize("kind", KINDS)
def test_batch_two_with_cfg(node, models, kind):
    height, width = odd_size(kind)
    _, unpatched = probed(node, models[kind], kind, height, width, 2, batch=2, cfg=2.0)
    _, probe = probed(node, models[kind], kind, height, width, 2, MANUAL_2, batch=2, cfg=2.0)
    check_reduction(kind, unpatched, probe, height, width, 2)


@pytest.mark.parametrize(
    ("kind", "extras"),
    [
        pytest.param("hunyuan_video", {"ref_latent": True}, id="hunyuan-video-reference-latent"),
        pytest.param("hunyuan_video15", {"byt5_tokens": 3, "vision_tokens": 4}, id="hunyuan-video15-glyph-vision"),
        pytest.param("ltxv", {"guides": 1}, id="ltxv-guide-frame"),
        pytest.param("ltxv", {"guides": 1, "drop_guide_tokens": 5}, id="ltxv-guide-tokens-dropped"),
        pytest.param("mochi", {"masked_text": 2}, id="mochi-text-cropped"),
        pytest.param("wan_t2v", {"reference_latent": True}, id="wan-reference-before"),
        pytest.param("wan_t2v", {"time_dim_concat": 1}, id="wan-time-dim-concat"),
        pytest.param("wan_vace", {"vace_frames": 2}, id="wan-vace-two-contexts"),
    ],
)
def test_reference_guide_and_extra_tokens(node, models, kind, extras):
    height, width = (6, 10) if extras.get("reference_latent") else odd_size(kind)
    _, unpatched = probed(node, models[kind], kind, height, width, FRAMES, **extras)
    _, probe = probed(node, models[kind], kind, height, width, FRAMES, MANUAL_2, **extras)
    check_reduction(kind, unpatched, probe, height, width, FRAMES, **extras)


@pytest.mark.parametrize("kind", ["hunyuan_video", "ltxv", "kandinsky5"])
def test_temporal_factor_reduces_frames_too(node, models, kind):
    height, width = odd_size(kind)
    frames = 5
    _, unpatched = probed(node, models[kind], kind, height, width, frames)
    inputs = {**MANUAL_2, "temporal_factor": 2.0}
    _, probe = probed(node, models[kind], kind, height, width, frames, inputs)
    check_reduction(kind, unpatched, probe, height, width, frames, temporal=2)


def test_ltx2_audio_and_audio_video_attention_are_untouched(node, models):
    """Audio self-attention as long as the video would look like it: the node flags LTX-2's audio modules."""
    kind, height, width = "ltxav", 3, 3  # 9 video tokens per frame
    frames = 2
    video = frames * height * width
    assert ltxav_audio_latents(frames) != video  # the default audio length differs: make it equal
    _, unpatched = probed(node, models[kind], kind, height, width, frames, audio_latents=video)
    _, probe = probed(node, models[kind], kind, height, width, frames, MANUAL_2, audio_latents=video)
    pairs = [(b.q_tokens, b.kv_tokens, a.kv_tokens) for b, a in zip(unpatched.calls, probe.calls, strict=True)]
    video_self = [p for p in pairs if p[0] == p[1] == video]
    # Per layer: video self (reduced), audio self (as long as the video, kept), and the four cross calls kept.
    assert sorted({p[2] for p in video_self}) == [frames * 2 * 2, video]
    assert all(after == kv for q, kv, after in pairs if (q, kv) != (video, video))
