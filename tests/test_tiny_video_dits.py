"""Tiny random-weight video DiTs of every ComfyUI video family: built as a loader builds them, sampled by
ComfyUI's sampler, and the attention calls each makes through ``optimized_attention_override``."""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import tiny_video_dits as tv
import torch
from comfy_support import import_comfyui
from dit_support import TEXT_TOKENS

pytestmark = pytest.mark.comfyui

KINDS = (
    "hunyuan_video",
    "hunyuan_video15",
    "ltxv",
    "ltxav",
    "kandinsky5",
    "cosmos",
    "cosmos_predict2_video",
    "mochi",
    "wan_t2v",
    "wan_vace",
    "wan_s2v",
    "wan_humo",
    "wan_animate",
    "wan_camera",
)


@pytest.fixture(autouse=True)
def _comfyui():
    import_comfyui()


_BUILT: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _BUILT.clear()


def built(kind: str):
    """One build per family for the whole file (sampling never changes the weights)."""
    if kind not in _BUILT:
        _BUILT[kind] = tv.build(kind)
    return _BUILT[kind]


def small_size(kind: str) -> tuple[int, int]:
    """A small latent each family takes: odd where it allows, else even (Wan S2V: 8 cells at least)."""
    tiny = tv.TINY_VIDEO_DITS[kind]
    if tiny.min_size > 1:
        return tiny.min_size, tiny.min_size + 2
    return (5, 7) if tiny.spatial_multiple == 1 else (4, 6)


def test_the_registry_has_every_video_family():
    assert tuple(tv.TINY_VIDEO_DITS) == KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_a_loader_picks_the_registered_config_class_and_model_class(kind):
    tiny = tv.TINY_VIDEO_DITS[kind]
    assert tv.loader_config_class(kind).__name__ == tiny.supported_model
    assert type(built(kind).model).__name__ == tiny.model_base


@pytest.mark.parametrize("kind", KINDS)
def test_two_builds_with_the_same_seed_are_identical(kind):
    first, second = built(kind).model.state_dict(), tv.build(kind).model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("kind", KINDS)
def test_samples_finite_video_of_three_frames_at_the_smallest_size(kind):
    height, width = small_size(kind)
    out = tv.sample(built(kind), kind, height, width, 3)
    video = out.unbind()[0] if kind == "ltxav" else out
    channels = built(kind).get_model_object("latent_format").latent_channels
    assert video.shape == (1, channels, 3, height, width)
    assert tv.finite(out)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_two_with_cfg_two_is_finite_and_one_batched_model_call(kind):
    height, width = small_size(kind)
    patcher, calls = tv.with_apply_model_recorder(built(kind))
    patcher, probe = tv.with_video_probe(patcher)
    out = tv.sample(patcher, kind, height, width, 2, batch=2, cfg=2.0)
    assert tv.finite(out)
    assert len(calls) == 1, "positive and negative of the same shapes run as one batch"
    assert calls[0].x_shape[0] == 4 and calls[0].context_shape == (4, TEXT_TOKENS, calls[0].context_shape[2])
    assert probe.details and {d.q_batch for d in probe.details} <= {4, 4 * 3}  # HuMo: batch x (2 frames + ref)


EVEN_SETTINGS = ((4, 6, 2, 5), (6, 10, 3, 7))
ODD_SETTINGS = ((4, 6, 2, 5), (5, 7, 3, 6))
"""(height, width, frames, text tokens): two latents of different sizes, frame counts and text lengths; the second
odd for the families that take odd sizes."""

EXTRAS = [
    ("hunyuan_video", {"ref_latent": True}),
    ("hunyuan_video15", {"byt5_tokens": 3, "vision_tokens": 4}),
    ("ltxv", {"guides": 1}),
    ("ltxv", {"guides": 1, "drop_guide_tokens": 5}),
    ("ltxav", {"audio_latents": 4}),
    ("mochi", {"masked_text": 2}),
    ("wan_t2v", {"time_dim_concat": 1, "reference_latent": True}),
    ("wan_vace", {"vace_frames": 2}),
    ("wan_camera", {"clip_vision_tokens": 257}),
    ("wan_animate", {"clip_vision_tokens": 9}),
    ("wan_s2v", {"motion": False}),
    ("wan_humo", {"audio": False}),
]


def cases():
    for kind, extras in [(kind, {}) for kind in KINDS] + EXTRAS:
        odd = tv.TINY_VIDEO_DITS[kind].spatial_multiple == 1 and not extras.get("reference_latent")
        for height, width, frames, text in ODD_SETTINGS if odd else EVEN_SETTINGS:
            if kind == "wan_s2v":
                height, width = height + 8, width + 8
            label = "-".join(f"{k}={v}" for k, v in extras.items())
            yield pytest.param(
                kind, extras, height, width, frames, text, id=f"{kind}-{label}-{height}x{width}x{frames}-T{text}"
            )


@pytest.mark.parametrize(("kind", "extras", "height", "width", "frames", "text"), list(cases()))
def test_attention_calls_follow_the_token_layout(kind, extras, height, width, frames, text):
    """Every attention call of one model evaluation, by (q, k) token counts, as the family's layout predicts."""
    patcher, probe = tv.with_video_probe(built(kind))
    tv.sample(patcher, kind, height, width, frames, text_tokens=text, **extras)
    seen = Counter((call.q_tokens, call.kv_tokens) for call in probe.details)
    assert seen == tv.expected_attention(kind, height, width, frames, text, **extras)


CONVENTIONS = {
    # kind: {(skip_reshape, heads keyword, skip_output_reshape, attn_precision keyword, block info), ...}
    "hunyuan_video": {(True, False, False, False, False), (True, False, False, False, True)},
    "hunyuan_video15": {(True, False, False, False, False), (True, False, False, False, True)},
    "ltxv": {(False, False, False, True, False)},
    "ltxav": {(False, False, False, True, False)},
    "kandinsky5": {(True, True, False, False, False), (True, True, False, False, True)},
    "cosmos": {(True, False, True, False, False)},
    "cosmos_predict2_video": {(True, False, False, False, False)},
    "mochi": {(True, False, False, False, False)},
    "wan_t2v": {(False, True, False, False, True)},
    "wan_vace": {(False, True, False, False, True)},
    "wan_s2v": {(False, True, False, False, True)},
    "wan_humo": {(False, True, False, False, True), (True, True, True, False, True)},
    "wan_animate": {(False, True, False, False, True)},
    "wan_camera": {(False, True, False, False, True)},
}


@pytest.mark.parametrize("kind", KINDS)
def test_calling_conventions_of_each_family(kind):
    height, width = small_size(kind)
    patcher, probe = tv.with_video_probe(built(kind))
    tv.sample(patcher, kind, height, width, 2)
    seen = {
        (d.skip_reshape, d.heads_keyword, d.skip_output_reshape, d.attn_precision, d.has_block_info)
        for d in probe.details
    }
    assert seen == CONVENTIONS[kind]
    # the calls without block information are the text-only ones (HunyuanVideo's token refiner, Kandinsky's text
    # encoder blocks) or all of them (LTX, Cosmos, Mochi)
    text = {(d.q_tokens, d.kv_tokens) for d in probe.details if not d.has_block_info}
    if kind in ("hunyuan_video", "hunyuan_video15", "kandinsky5"):
        assert text == {(TEXT_TOKENS, TEXT_TOKENS)}
    masks = {d.mask_shape for d in probe.details}
    assert masks == ({(1, 1, 1, TEXT_TOKENS), None} if kind == "ltxv" else {None})


def test_masks_reach_the_override_with_their_shapes():
    """HunyuanVideo passes a key mask over [video, text] by keyword; LTXV the text mask positionally (cross-attn)."""
    patcher, probe = tv.with_video_probe(built("hunyuan_video"))
    tv.sample(patcher, "hunyuan_video", 4, 6, 2, masked_text=2)
    joint = 2 * 2 * 3 + TEXT_TOKENS
    assert {(d.mask_shape, d.mask_positional) for d in probe.details} == {
        ((1, 1, TEXT_TOKENS, TEXT_TOKENS), False),
        ((1, 1, joint), False),
    }
    patcher, probe = tv.with_video_probe(built("ltxv"))
    tv.sample(patcher, "ltxv", 4, 6, 2, masked_text=2)
    cross = [d for d in probe.details if d.kv_tokens == TEXT_TOKENS]
    assert {(d.mask_shape, d.mask_positional) for d in cross} == {((1, 1, 1, TEXT_TOKENS), True)}


def queries(kind, call, height, width, frames, edit=None, **extras):
    patcher, probe = tv.with_video_probe(built(kind), keep_queries=True)
    tv.sample(patcher, kind, height, width, frames, edit=edit, **extras)
    return probe.queries[call]


def shifted(tensor: torch.Tensor) -> torch.Tensor:
    """A different value along every channel (a constant shift would vanish in the LayerNorms of the mappers)."""
    return tensor + torch.linspace(0.5, 1.5, tensor.shape[-1])


def perturb(key, index=None, positive_only=True):
    """An ``edit`` changing one conditioning tensor (one element of a list with ``index``)."""

    def edit(positive, negative):
        for cond in (positive,) if positive_only else (positive, negative):
            if key == "text":
                cond[0][0] = shifted(cond[0][0])
            elif index is None:
                value = cond[0][1][key]
                if hasattr(value, "last_hidden_state"):
                    value.last_hidden_state = shifted(value.last_hidden_state)
                else:
                    cond[0][1][key] = shifted(value)
            else:
                cond[0][1][key] = [shifted(t) for t in cond[0][1][key]]

    return edit


ORDER = [
    # kind, extras, call index of the first joint/self attention, input changed, tokens it reaches (h=2, w=3, F=2)
    ("hunyuan_video", {}, 2, "text", range(12, 12 + TEXT_TOKENS)),
    ("hunyuan_video", {"ref_latent": True}, 2, "ref_latent", range(0, 6)),
    ("hunyuan_video15", {"byt5_tokens": 3, "vision_tokens": 4}, 2, "clip_vision_output", range(48, 52)),
    ("hunyuan_video15", {"byt5_tokens": 3, "vision_tokens": 4}, 2, "conditioning_byt5small", range(52, 55)),
    ("hunyuan_video15", {"byt5_tokens": 3, "vision_tokens": 4}, 2, "text", range(55, 55 + TEXT_TOKENS)),
    ("wan_t2v", {"reference_latent": True, "time_dim_concat": 1}, 0, "reference_latents", range(0, 6)),
    ("wan_t2v", {"reference_latent": True, "time_dim_concat": 1}, 0, "time_dim_concat", range(18, 24)),
    ("wan_humo", {}, 0, "reference_latents", range(12, 18)),
]


@pytest.mark.parametrize(("kind", "extras", "call", "key", "tokens"), ORDER, ids=[f"{o[0]}-{o[3]}" for o in ORDER])
def test_where_each_input_sits_in_the_sequence(kind, extras, call, key, tokens):
    """Changing one input changes exactly its own tokens of the first joint attention's queries."""
    height, width = 4, 6
    index = 0 if key == "reference_latents" else None
    first = queries(kind, call, height, width, 2, **extras)
    second = queries(kind, call, height, width, 2, edit=perturb(key, index), **extras)
    assert tv.changed_tokens(first, second) == list(tokens)


def test_s2v_reference_and_motion_tokens_follow_the_video():
    grid, ref = 2 * 4 * 5, 4 * 5
    total = grid + ref + tv.s2v_motion_tokens(8, 10)
    first = queries("wan_s2v", 0, 8, 10, 2)
    assert first.shape[1] == total
    by_ref = queries("wan_s2v", 0, 8, 10, 2, edit=perturb("reference_latents", 0, positive_only=False))
    by_motion = queries("wan_s2v", 0, 8, 10, 2, edit=perturb("reference_motion", positive_only=False))
    assert tv.changed_tokens(first, by_ref) == list(range(grid, grid + ref))
    assert tv.changed_tokens(first, by_motion) == list(range(grid + ref, total))


def test_ltxav_packs_video_and_audio_for_apply_model():
    patcher, calls = tv.with_apply_model_recorder(built("ltxav"))
    tv.sample(patcher, "ltxav", 4, 6, 2)
    video, audio = (1, 128, 2, 4, 6), (1, 8, tv.ltxav_audio_latents(2), 16)
    (call,) = calls
    assert call.latent_shapes == (video, audio)
    assert call.x_shape == (1, 1, 128 * 2 * 4 * 6 + 8 * 9 * 16)


def test_ltxv_guides_are_extra_latent_frames():
    patcher, calls = tv.with_apply_model_recorder(built("ltxv"))
    tv.sample(patcher, "ltxv", 4, 6, 2, guides=1)
    assert calls[0].x_shape == (1, 128, 3, 4, 6)
    assert {"keyframe_idxs", "denoise_mask"} <= set(calls[0].keys)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_latent_nodes_give_the_pixels_per_cell(kind):
    entry = tv.EMPTY_LATENT_NODE.get(kind)
    if entry is None:
        pytest.skip("the family's latent comes from its ...ToVideo node (needs a VAE)")
    node = getattr(importlib.import_module(entry[0]), entry[1])
    t, h, w = tv.pixels_per_cell(kind)
    output = node.execute(width=7 * w, height=5 * h, length=2 * t + 1, batch_size=1)
    latent = (output.result if hasattr(output, "result") else output)[0]["samples"]
    channels = built(kind).get_model_object("latent_format").latent_channels
    assert tuple(latent.shape) == (1, channels, 3, 5, 7)


@pytest.mark.parametrize("kind", [k for k in KINDS if tv.TINY_VIDEO_DITS[k].spatial_multiple == 2])
def test_odd_latent_sizes_are_refused(kind):
    """The families marked ``spatial_multiple=2`` cannot sample an odd latent (see each ``size_note``)."""
    assert tv.TINY_VIDEO_DITS[kind].spatial_multiple == 2
    size = 9 if kind == "wan_s2v" else 5
    with pytest.raises((RuntimeError, AssertionError)):
        tv.sample(built(kind), kind, size, size + 2, 2)


def test_comfyui_bugs_the_tiny_models_find():
    """Known ComfyUI 0.8.0 failures: HunyuanVideo's ref_latent with batch > 1 (in-place write to expanded ids);
    HunyuanVideo's text mask in a model call of batch > 1 (the joint key mask is made with batch 1: also CFG > 1
    when positive and negative batch together); HunyuanVideo 1.5 with a text mask and byT5 or vision tokens (the
    mask does not cover them); HuMo with the zero audio WanHuMoImageToVideo writes without an audio input (one
    audio frame too many)."""
    with pytest.raises(RuntimeError, match="single memory location"):
        tv.sample(built("hunyuan_video"), "hunyuan_video", 4, 6, 2, batch=2, ref_latent=True)
    with pytest.raises(RuntimeError, match="expanded size"):
        tv.sample(built("hunyuan_video"), "hunyuan_video", 4, 6, 2, cfg=2.0, masked_text=2)
    with pytest.raises(RuntimeError, match="must match"):
        tv.sample(built("hunyuan_video15"), "hunyuan_video15", 4, 6, 2, masked_text=2, byt5_tokens=3)

    def node_zero_audio(positive, negative):
        for cond in (positive, negative):
            cond[0][1]["audio_embed"] = torch.zeros(1, 2 + 1, 8, 5, 1280)

    with pytest.raises(RuntimeError, match="invalid for input"):
        tv.sample(built("wan_humo"), "wan_humo", 4, 6, 2, audio=False, edit=node_zero_audio)


def test_s2v_audio_attention_bypasses_the_override(monkeypatch):
    """Wan S2V's audio injector calls attention without transformer_options: the override never sees it."""
    import comfy.ldm.wan.model as wan

    unseen = []
    original = wan.optimized_attention

    def counting(q, k, v, *args, **kwargs):
        if "optimized_attention_override" not in (kwargs.get("transformer_options") or {}):
            unseen.append((q.shape, k.shape))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(wan, "optimized_attention", counting)
    patcher, probe = tv.with_video_probe(built("wan_s2v"))
    tv.sample(patcher, "wan_s2v", 8, 10, 2, audio=True)
    assert unseen == [(torch.Size([2, 20, 64]), torch.Size([2, 5, 64]))]  # per frame: 4 x 5 tokens, 4 + 1 audio
    assert Counter((d.q_tokens, d.kv_tokens) for d in probe.details) == tv.expected_attention(
        "wan_s2v", 8, 10, 2, audio=True
    )
