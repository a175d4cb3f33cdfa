"""Tiny random-weight video diffusion transformers of every video family of ComfyUI, with their conditioning.

Each family is built as a checkpoint loader builds it: the unet config holds the
keys ``comfy.model_detection`` writes (so that ``comfy.supported_models`` picks
the registered config class, :func:`loader_config_class`), the config class makes
the ``comfy.model_base`` model (through its own ``get_model``), and
:func:`comfy_support.random_patcher` draws the weights. Widths and depths are tiny
(one or two blocks, 64 channels): a build and a sampler step take a fraction of a
second on one CPU core, except Wan HuMo and Wan Animate, whose audio projection and
face encoder have built-in sizes (about 40 M parameters each: about a second to draw).

:func:`TinyDiT.conditioning` returns random ComfyUI conditioning with the keys the
family's ``model_base.<Class>.extra_conds`` reads (as the family's text encoder
and its ``...ToVideo`` node write them), and :func:`sample` runs ComfyUI's own
sampler (``comfy.sample.sample``) on it from the latent the family uses: 5-D
``[B, C, F, H, W]``, or for LTX-2 (LTXAV) a nested video + audio latent that the
sampler packs into ``[B, 1, N]``.

:class:`VideoProbe` records every attention call that reaches ComfyUI's
``optimized_attention_override`` with its calling convention (token dimension,
mask, keyword arguments, block information); :func:`with_apply_model_recorder`
records what an ``APPLY_MODEL`` wrapper sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from comfy_support import random_patcher
from dit_support import CONTEXT_DIM, TEXT_TOKENS, WAN_TINY, DiTProbe, with_probe

POOLED_CLIP_L = 768
"""HunyuanVideo 1.0's ``vec_in_dim``: the detector always writes 768 (CLIP-L's pooled output)."""
KANDINSKY_POOLED = 24
"""Kandinsky 5's pooled text width (``in_text_dim2``; CLIP-L's 768 in the released models)."""
BYT5_DIM = 1472
"""ByT5-small's width: HunyuanVideo 1.5's ``byt5_in`` mapper has it built in."""
SIGLIP_DIM = 1152
"""SigLIP's width: HunyuanVideo 1.5's ``vision_in_dim`` (``supported_models.HunyuanVideo15`` matches on it)."""
CLIP_H_DIM = 1280
"""CLIP-H's width: Wan's i2v ``img_emb`` projection has it built in (257 tokens from a real image)."""
LTXAV_AUDIO_CHANNELS, LTXAV_AUDIO_BINS = 8, 16
"""LTX-2 audio latent ``[B, 8, T_audio, 16]``: the model unpatchifies with these built-in sizes."""
LTXAV_AUDIO_LATENTS_PER_SECOND = 25
"""LTX-2's audio VAE: 16 kHz, hop 160, 4x latent downsampling = 25 audio latents per second."""


def _mapping(config: dict) -> Mapping:
    return MappingProxyType(config)


# --------------------------------------------------------------------------------------------------------------------
# Unet configs: the keys comfy.model_detection writes for each family, with tiny widths.
# --------------------------------------------------------------------------------------------------------------------

HUNYUAN_VIDEO_TINY = {
    "image_model": "hunyuan_video",
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "vec_in_dim": POOLED_CLIP_L,
    "axes_dim": [8, 12, 12],
    "meanflow": False,
    "context_in_dim": CONTEXT_DIM,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "theta": 256,
    "qkv_bias": True,
    "byt5": False,
    "guidance_embed": True,
    "use_cond_type_embedding": False,
    "vision_in_dim": None,
    "meanflow_sum": False,
}
HUNYUAN_VIDEO15_TINY = {
    **HUNYUAN_VIDEO_TINY,
    # 32 latent channels + 32 image-condition channels + 1 mask channel (model_base.HunyuanVideo15.concat_cond).
    "in_channels": 65,
    "out_channels": 32,
    "patch_size": [1, 1, 1],
    "vec_in_dim": None,
    "byt5": True,
    "guidance_embed": False,
    "use_cond_type_embedding": True,
    "vision_in_dim": SIGLIP_DIM,
    "meanflow_sum": True,
}
LTXV_TINY = {
    "image_model": "ltxv",
    "in_channels": 128,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "cross_attention_dim": 32,  # = heads * head_dim: the text is projected to the model width first
    "caption_channels": CONTEXT_DIM,
}
LTXAV_TINY = {
    **LTXV_TINY,
    "image_model": "ltxav",
    "audio_in_channels": LTXAV_AUDIO_CHANNELS * LTXAV_AUDIO_BINS,
    "audio_attention_head_dim": 8,
    "audio_num_attention_heads": 2,
    "audio_cross_attention_dim": 16,  # = audio heads * audio head_dim (also the width of the a2v/v2a RoPE)
}
KANDINSKY5_TINY = {
    "image_model": "kandinsky5",
    "model_dim": 64,
    "axes_dims": (8, 12, 12),
    "time_dim": 32,
    "ff_dim": 128,
    # (16 latent + 16 image + 1 mask channels) * patch (1, 2, 2): model_base.Kandinsky5.concat_cond
    "visual_embed_dim": 132,
    "num_text_blocks": 1,
    "num_visual_blocks": 2,
    "in_text_dim": CONTEXT_DIM,
    "in_text_dim2": KANDINSKY_POOLED,
}
COSMOS_TINY = {
    "image_model": "cosmos",
    "max_img_h": 240,
    "max_img_w": 240,
    "max_frames": 128,
    "in_channels": 16,
    "out_channels": 16,
    "patch_spatial": 2,
    "patch_temporal": 1,
    "model_channels": 64,
    "block_config": "FA-CA-MLP",
    "concat_padding_mask": True,
    "pos_emb_cls": "rope3d",
    "pos_emb_learnable": False,
    "pos_emb_interpolation": "crop",
    "block_x_format": "THWBD",
    "affline_emb_norm": True,
    "use_adaln_lora": True,
    "adaln_lora_dim": 16,
    "num_blocks": 2,
    "num_heads": 2,
    "crossattn_emb_channels": CONTEXT_DIM,
    "extra_per_block_abs_pos_emb": True,
    "rope_h_extrapolation_ratio": 1.0,
    "rope_w_extrapolation_ratio": 1.0,
    "rope_t_extrapolation_ratio": 2.0,
    "extra_per_block_abs_pos_emb_type": "learnable",
}
COSMOS_PREDICT2_I2V_TINY = {
    "image_model": "cosmos_predict2",
    "max_img_h": 240,
    "max_img_w": 240,
    "max_frames": 128,
    "in_channels": 17,  # 16 latent + the inverted denoise mask (model_base.CosmosPredict2, image_to_video)
    "out_channels": 16,
    "patch_spatial": 2,
    "patch_temporal": 1,
    "model_channels": 64,
    "concat_padding_mask": True,
    "crossattn_emb_channels": CONTEXT_DIM,
    "pos_emb_cls": "rope3d",
    "pos_emb_learnable": True,
    "pos_emb_interpolation": "crop",
    "min_fps": 1,
    "max_fps": 30,
    "use_adaln_lora": True,
    "adaln_lora_dim": 16,
    "num_blocks": 2,
    "num_heads": 2,
    "extra_per_block_abs_pos_emb": False,
    "rope_h_extrapolation_ratio": 3.0,
    "rope_w_extrapolation_ratio": 3.0,
    "rope_t_extrapolation_ratio": 1.0,
    "extra_h_extrapolation_ratio": 1.0,
    "extra_w_extrapolation_ratio": 1.0,
    "extra_t_extrapolation_ratio": 1.0,
    "rope_enable_fps_modulation": False,
}
MOCHI_TINY = {
    "image_model": "mochi_preview",
    "depth": 2,
    "patch_size": 2,
    "num_heads": 2,
    "hidden_size_x": 64,
    "hidden_size_y": 32,
    "mlp_ratio_x": 192.0,  # AsymmetricJointBlock asserts hidden_size_x * mlp_ratio_x == 1536 * 8
    "mlp_ratio_y": 4.0,
    "learn_sigma": False,
    "in_channels": 12,
    "qk_norm": True,
    "qkv_bias": False,
    "out_bias": True,
    "attn_drop": 0.0,
    "patch_embed_bias": True,
    "posenc_preserve_area": True,
    "timestep_mlp_bias": True,
    "attend_to_padding": False,
    "timestep_scale": 1000.0,
    "use_t5": True,
    "t5_feat_dim": CONTEXT_DIM,
    "t5_token_length": 256,
    "rope_theta": 10000.0,
}
WAN_BASE_TINY = {**WAN_TINY, "text_len": 512, "freq_dim": 32}
WAN_T2V_REF_TINY = {**WAN_BASE_TINY, "in_dim_ref_conv": 16}
"""Wan 2.1 T2V with the ``ref_conv`` of the Fun reference models: ``reference_latent`` tokens are prepended."""
WAN_VACE_TINY = {**WAN_BASE_TINY, "model_type": "vace", "vace_in_dim": 96, "vace_layers": 1}
WAN_CAMERA_TINY = {**WAN_BASE_TINY, "model_type": "camera", "in_dim": 32}
WAN_S2V_TINY = {**WAN_BASE_TINY, "model_type": "s2v"}
WAN_HUMO_TINY = {**WAN_BASE_TINY, "model_type": "humo"}
WAN_ANIMATE_TINY = {**WAN_BASE_TINY, "model_type": "animate", "in_dim": 36}


# --------------------------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """The latent the conditioning is made for (conditions such as reference latents have its spatial size)."""

    height: int
    width: int
    frames: int


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


def _text_mask(text_tokens: int, masked_text: int) -> torch.Tensor:
    """A text encoder's attention mask: 1 for real tokens, 0 for the ``masked_text`` padding tokens at the end."""
    mask = torch.ones(1, text_tokens, dtype=torch.long)  # sd1_clip returns integer masks
    if masked_text:
        mask[:, -masked_text:] = 0
    return mask


def _clip_vision(tokens: int, width: int, generator: torch.Generator, attribute: str):
    """A ``comfy.clip_vision.Output`` with one hidden-state attribute (Wan reads the penultimate, HV 1.5 the last)."""
    import comfy.clip_vision

    output = comfy.clip_vision.Output()
    output[attribute] = _randn(generator, 1, tokens, width)
    return output


def _pair(seed: int, text_tokens: int, text_width: int, extra: Callable[[torch.Generator, bool], dict]):
    """Positive and negative conditioning: independent random text, ``extra(generator, positive)`` keys each."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for positive in (True, False):
        text = _randn(generator, 1, text_tokens, text_width)
        out.append([[text, extra(generator, positive)]])
    return out[0], out[1]


def _hunyuan_video(patcher, seed, text_tokens, size: Size, ref_latent=False, masked_text=0, node_like=True, **_):
    """HunyuanVideo 1.0: LLM text (+ attention_mask when padded), CLIP-L pooled; ``ref_latent`` as the I2V
    "custom" guidance of ``HunyuanImageToVideo`` writes it (the positive only, unless ``node_like`` is False)."""

    def extra(generator, positive):
        out = {"pooled_output": _randn(generator, 1, POOLED_CLIP_L)}
        if masked_text:
            out["attention_mask"] = _text_mask(text_tokens, masked_text)
        if ref_latent and (positive or not node_like):
            out["ref_latent"] = _randn(generator, 1, 16, 1, size.height, size.width)
        return out

    return _pair(seed, text_tokens, CONTEXT_DIM, extra)


def _hunyuan_video15(patcher, seed, text_tokens, size: Size, byt5_tokens=0, vision_tokens=0, masked_text=0, **_):
    """HunyuanVideo 1.5: Qwen-2.5-VL text (pooled_output None), glyph byT5 tokens, SigLIP image tokens (I2V)."""

    def extra(generator, positive):
        out = {"pooled_output": None}
        if masked_text:
            out["attention_mask"] = _text_mask(text_tokens, masked_text)
        if byt5_tokens:
            out["conditioning_byt5small"] = _randn(generator, 1, byt5_tokens, BYT5_DIM)
        if vision_tokens:
            out["clip_vision_output"] = _clip_vision(vision_tokens, SIGLIP_DIM, generator, "last_hidden_state")
        return out

    return _pair(seed, text_tokens, CONTEXT_DIM, extra)


def _ltxv(patcher, seed, text_tokens, size: Size, masked_text=0, frame_rate=25.0, **_):
    """LTXV 0.9.x: T5 text with the attention mask its encoder always returns, LTXVConditioning's frame rate.
    Guide frames (``guides``) are added to the latent by :func:`_ltxv_guides`."""

    def extra(generator, positive):
        return {"attention_mask": _text_mask(text_tokens, masked_text), "frame_rate": frame_rate}

    return _pair(seed, text_tokens, CONTEXT_DIM, extra)


def _ltxav(patcher, seed, text_tokens, size: Size, frame_rate=25.0, **_):
    """LTX-2: the Gemma connector's video and audio text side by side along the width (2 x caption_channels)."""
    return _pair(seed, text_tokens, 2 * CONTEXT_DIM, lambda generator, positive: {"frame_rate": frame_rate})


def _kandinsky5(patcher, seed, text_tokens, size: Size, **_):
    """Kandinsky 5: Qwen-2.5-VL text and CLIP-L pooled output (encode_adm reads ``pooled_output``)."""
    return _pair(
        seed,
        text_tokens,
        CONTEXT_DIM,
        lambda generator, positive: {"pooled_output": _randn(generator, 1, KANDINSKY_POOLED)},
    )


def _cosmos(patcher, seed, text_tokens, size: Size, frame_rate=None, **_):
    """Cosmos 1 and Cosmos Predict2: T5 text; ``fps`` from an optional frame rate."""
    extra = {} if frame_rate is None else {"frame_rate": frame_rate}
    return _pair(seed, text_tokens, CONTEXT_DIM, lambda generator, positive: dict(extra))


def _mochi(patcher, seed, text_tokens, size: Size, masked_text=0, **_):
    """Mochi: T5 text and its attention mask (``num_tokens`` = real tokens: the text the joint attention keeps)."""
    return _pair(
        seed,
        text_tokens,
        CONTEXT_DIM,
        lambda generator, positive: {"attention_mask": _text_mask(text_tokens, masked_text)},
    )


def _wan(
    patcher,
    seed,
    text_tokens,
    size: Size,
    time_dim_concat=0,
    reference_latent=False,
    clip_vision_tokens=0,
    **_,
):
    """Wan 2.1 T2V: UMT5 text; ``time_dim_concat`` latent frames (appended along time); a reference latent
    for ``ref_conv`` (prepended); CLIP-H vision tokens for the i2v cross-attention (Camera, Animate)."""

    def extra(generator, positive):
        out = {}
        if time_dim_concat:
            out["time_dim_concat"] = _randn(generator, 1, 16, time_dim_concat, size.height, size.width)
        if reference_latent:
            out["reference_latents"] = [_randn(generator, 1, 16, 1, size.height, size.width)]
        if clip_vision_tokens:
            out["clip_vision_output"] = _clip_vision(
                clip_vision_tokens, CLIP_H_DIM, generator, "penultimate_hidden_states"
            )
        return out

    return _pair(seed, text_tokens, CONTEXT_DIM, extra)


def _wan_vace(patcher, seed, text_tokens, size: Size, vace_frames=0, **kwargs):
    """Wan VACE: ``vace_frames`` control inputs (WanVaceToVideo); none = the zero control extra_conds builds."""
    positive, negative = _wan(patcher, seed, text_tokens, size, **kwargs)
    if vace_frames:
        generator = torch.Generator().manual_seed(seed + 7)
        frames = [_randn(generator, 1, 32, size.frames, size.height, size.width) for _ in range(vace_frames)]
        masks = [torch.ones(1, 64, size.frames, size.height, size.width) for _ in range(vace_frames)]
        for cond in (positive, negative):
            cond[0][1].update({"vace_frames": frames, "vace_mask": masks, "vace_strength": [1.0] * vace_frames})
    return positive, negative


def _wan_camera(patcher, seed, text_tokens, size: Size, camera=True, **kwargs):
    """Wan Fun Camera: Plücker camera embedding ``[1, 24, F, 8H, 8W]`` (WanCameraEmbedding) per latent frame."""
    positive, negative = _wan(patcher, seed, text_tokens, size, **kwargs)
    if camera:
        generator = torch.Generator().manual_seed(seed + 7)
        conditions = _randn(generator, 1, 24, size.frames, 8 * size.height, 8 * size.width)
        for cond in (positive, negative):
            cond[0][1]["camera_conditions"] = conditions
    return positive, negative


def _wan_s2v(patcher, seed, text_tokens, size: Size, reference=True, motion=True, audio=False, **kwargs):
    """Wan 2.2 S2V as WanSoundImageToVideo writes it: a control video (always), a reference image latent
    (appended tokens), 19 reference-motion latent frames (FramePack tokens appended), optional audio features."""
    positive, negative = _wan(patcher, seed, text_tokens, size, **kwargs)
    generator = torch.Generator().manual_seed(seed + 7)
    shared = {"control_video": torch.zeros(1, 16, size.frames, size.height, size.width)}
    if reference:
        shared["reference_latents"] = [_randn(generator, 1, 16, 1, size.height, size.width)]
    if motion:
        shared["reference_motion"] = _randn(generator, 1, 16, 19, size.height, size.width)
    for cond in (positive, negative):
        cond[0][1].update(shared)
    if audio:  # 25 wav2vec layers of 1024 features, 4 per latent frame; the negative gets zeros
        features = _randn(generator, 1, 25, 1024, 4 * size.frames)
        positive[0][1]["audio_embed"] = features
        negative[0][1]["audio_embed"] = features * 0.0
    return positive, negative


def _wan_humo(patcher, seed, text_tokens, size: Size, reference=True, audio=True, **kwargs):
    """Wan HuMo (1.7B layout) as WanHuMoImageToVideo writes it with audio: a reference latent (appended tokens)
    and per-latent-frame audio windows ``[1, F, 8, 5, 1280]`` (16 audio tokens per frame after audio_proj)."""
    positive, negative = _wan(patcher, seed, text_tokens, size, **kwargs)
    generator = torch.Generator().manual_seed(seed + 7)
    if reference:
        ref = _randn(generator, 1, 16, 1, size.height, size.width)
        positive[0][1]["reference_latents"] = [ref]
        negative[0][1]["reference_latents"] = [torch.zeros_like(ref)]
    if audio:
        features = _randn(generator, 1, size.frames, 8, 5, 1280)
        positive[0][1]["audio_embed"] = features
        negative[0][1]["audio_embed"] = torch.zeros_like(features)
    return positive, negative


def _wan_animate(patcher, seed, text_tokens, size: Size, pose=True, **kwargs):
    """Wan 2.2 Animate as WanAnimateToVideo writes it without a face video: a pose-video latent (added to the
    patch embedding from the second frame on), the reference/background concat (zeros here: extra_conds pads)."""
    positive, negative = _wan(patcher, seed, text_tokens, size, **kwargs)
    if pose:
        generator = torch.Generator().manual_seed(seed + 7)
        pose_latent = _randn(generator, 1, 16, size.frames, size.height, size.width)
        for cond in (positive, negative):
            cond[0][1]["pose_video_latent"] = pose_latent
    return positive, negative


# --------------------------------------------------------------------------------------------------------------------
# Latents
# --------------------------------------------------------------------------------------------------------------------


def _ltxv_guides(patcher, positive, negative, latent, seed, guides=0, guide_strength=1.0, drop_guide_tokens=0, **_):
    """LTXVAddGuide's own ``append_keyframe``: ``guides`` random guide latent frames appended to the latent, their
    pixel coordinates as ``keyframe_idxs``, a noise mask; ``drop_guide_tokens`` guide tokens get a negative mask
    (as a guide mask below the strength gives), which LTXVModel drops from the sequence (``grid_mask``)."""
    noise_mask = None
    if not guides:
        return positive, negative, latent, noise_mask
    from comfy_extras.nodes_lt import LTXVAddGuide

    generator = torch.Generator().manual_seed(seed + 11)
    batch, _, frames, height, width = latent.shape
    noise_mask = torch.ones(batch, 1, frames, 1, 1)
    guide = _randn(generator, 1, latent.shape[1], guides, height, width)
    guide_mask = None
    if drop_guide_tokens:
        guide_mask = torch.full((1, 1, guides, height, width), float(guide_strength))
        guide_mask.view(-1)[:drop_guide_tokens] = guide_strength - 1.0  # mask - strength < 0: dropped
    positive, negative, latent, noise_mask = LTXVAddGuide.append_keyframe(
        positive,
        negative,
        0,
        latent,
        noise_mask,
        guide,
        guide_strength,
        (8, 32, 32),  # the LTXV VAE's downscale_index_formula (time, height, width)
        guide_mask=guide_mask,
    )
    return positive, negative, latent, noise_mask


def ltxav_audio_latents(frames: int, frame_rate: float = 25.0) -> int:
    """Audio latent steps for ``frames`` latent video frames, as LTXVEmptyLatentAudio computes them."""
    pixel_frames = (frames - 1) * 8 + 1
    return math.ceil(pixel_frames / frame_rate * LTXAV_AUDIO_LATENTS_PER_SECOND)


# --------------------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyDiT:
    """One video family: how a loader builds it and how its nodes condition it."""

    supported_model: str
    """Class name in ``comfy.supported_models`` (the config class a loader picks for ``unet_config``)."""
    model_base: str
    """Class name in ``comfy.model_base`` (what the config class's ``get_model`` builds)."""
    unet_config: Mapping = field(hash=False)
    conditioning_fn: Callable = field(hash=False, repr=False)
    latent_fn: Callable | None = field(default=None, hash=False, repr=False)
    spatial_multiple: int = 1
    """Latent height and width must be multiples of this (odd sizes crash or are refused: see ``size_note``)."""
    min_size: int = 1
    """Latent height and width must be at least this."""
    size_note: str = ""
    extras: tuple[str, ...] = ()
    """Keyword extras :meth:`conditioning` and :func:`sample` accept for this family."""

    def conditioning(
        self, patcher, seed: int = 0, text_tokens: int = TEXT_TOKENS, *, height=8, width=8, frames=2, **extras
    ):
        """Random (positive, negative) ComfyUI conditioning for a ``height`` x ``width`` x ``frames`` latent."""
        unknown = set(extras) - set(self.extras)
        assert not unknown, f"{self.supported_model} takes no extras {sorted(unknown)} (known: {self.extras})"
        return self.conditioning_fn(patcher, seed, text_tokens, Size(height, width, frames), **extras)


_EVEN_WAN = "odd sizes: the extra input is embedded without padding while the video is padded (length mismatch)"

TINY_VIDEO_DITS: dict[str, TinyDiT] = {
    "hunyuan_video": TinyDiT(
        "HunyuanVideo",
        "HunyuanVideo",
        _mapping(HUNYUAN_VIDEO_TINY),
        _hunyuan_video,
        spatial_multiple=2,
        size_note="patch 2 padded on the way in, floor-divided on the way out: odd sizes fail to unpatchify",
        extras=("ref_latent", "masked_text", "node_like"),
    ),
    "hunyuan_video15": TinyDiT(
        "HunyuanVideo15",
        "HunyuanVideo15",
        _mapping(HUNYUAN_VIDEO15_TINY),
        _hunyuan_video15,
        extras=("byt5_tokens", "vision_tokens", "masked_text"),
    ),
    "ltxv": TinyDiT(
        "LTXV",
        "LTXV",
        _mapping(LTXV_TINY),
        _ltxv,
        latent_fn=_ltxv_guides,
        extras=("masked_text", "frame_rate", "guides", "guide_strength", "drop_guide_tokens"),
    ),
    "ltxav": TinyDiT(
        "LTXAV",
        "LTXAV",
        _mapping(LTXAV_TINY),
        _ltxav,
        extras=("frame_rate", "audio_latents"),
    ),
    "kandinsky5": TinyDiT(
        "Kandinsky5",
        "Kandinsky5",
        _mapping(KANDINSKY5_TINY),
        _kandinsky5,
        spatial_multiple=2,
        size_note="padded to patch 2 but the output is not cropped back: odd sizes return a larger latent",
    ),
    "cosmos": TinyDiT(
        "CosmosT2V",
        "CosmosVideo",
        _mapping(COSMOS_TINY),
        _cosmos,
        spatial_multiple=2,
        size_note="no padding: the patch embedding asserts multiples of 2",
        extras=("frame_rate",),
    ),
    "cosmos_predict2_video": TinyDiT(
        "CosmosI2VPredict2",
        "CosmosPredict2",
        _mapping(COSMOS_PREDICT2_I2V_TINY),
        _cosmos,
        spatial_multiple=2,
        size_note="PatchEmbed asserts multiples of 2",
        extras=("frame_rate",),
    ),
    "mochi": TinyDiT(
        "GenmoMochi",
        "GenmoMochi",
        _mapping(MOCHI_TINY),
        _mochi,
        spatial_multiple=2,
        size_note="PatchEmbed (dynamic_img_pad off) asserts multiples of 2",
        extras=("masked_text",),
    ),
    "wan_t2v": TinyDiT(
        "WAN21_T2V",
        "WAN21",
        _mapping(WAN_T2V_REF_TINY),
        _wan,
        size_note="odd sizes work without a reference; " + _EVEN_WAN,
        extras=("time_dim_concat", "reference_latent"),
    ),
    "wan_vace": TinyDiT(
        "WAN21_Vace",
        "WAN21_Vace",
        _mapping(WAN_VACE_TINY),
        _wan_vace,
        spatial_multiple=2,
        size_note="the VACE context is embedded without padding: " + _EVEN_WAN,
        extras=("vace_frames",),
    ),
    "wan_s2v": TinyDiT(
        "WAN22_S2V",
        "WAN22_S2V",
        _mapping(WAN_S2V_TINY),
        _wan_s2v,
        spatial_multiple=2,
        min_size=8,
        size_note=f"reference and motion latents are embedded without padding: {_EVEN_WAN}; the motion packer's "
        "4x bucket is a (4, 8, 8) convolution: 8 latent cells at least",
        extras=("reference", "motion", "audio"),
    ),
    "wan_humo": TinyDiT(
        "WAN21_HuMo",
        "WAN21_HuMo",
        _mapping(WAN_HUMO_TINY),
        _wan_humo,
        spatial_multiple=2,
        size_note="the reference latent is embedded without padding: " + _EVEN_WAN,
        extras=("reference", "audio"),
    ),
    "wan_animate": TinyDiT(
        "WAN22_Animate",
        "WAN22_Animate",
        _mapping(WAN_ANIMATE_TINY),
        _wan_animate,
        spatial_multiple=2,
        size_note="the pose latent is embedded without padding: " + _EVEN_WAN,
        extras=("clip_vision_tokens", "pose"),
    ),
    "wan_camera": TinyDiT(
        "WAN21_Camera",
        "WAN21_Camera",
        _mapping(WAN_CAMERA_TINY),
        _wan_camera,
        spatial_multiple=2,
        size_note="the camera adapter's stride-2 convolution floors: " + _EVEN_WAN,
        extras=("clip_vision_tokens", "camera"),
    ),
}


PATCH = {
    "hunyuan_video": (1, 2, 2),
    "hunyuan_video15": (1, 1, 1),
    "ltxv": (1, 1, 1),
    "ltxav": (1, 1, 1),
    "kandinsky5": (1, 2, 2),
    "cosmos": (1, 2, 2),
    "cosmos_predict2_video": (1, 2, 2),
    "mochi": (1, 2, 2),
}
"""Latent cells per token (time, height, width); every Wan variant is (1, 2, 2)."""

PIXELS_PER_CELL = {
    "hunyuan_video": (4, 8, 8),
    "hunyuan_video15": (4, 16, 16),
    "ltxv": (8, 32, 32),
    "ltxav": (8, 32, 32),
    "kandinsky5": (4, 8, 8),
    "cosmos": (8, 8, 8),
    "cosmos_predict2_video": (4, 8, 8),
    "mochi": (6, 8, 8),
}
"""Video frames per latent frame (after the first) and pixels per latent cell (height, width), as the family's
empty-latent node computes them (``F = (frames - 1) // t + 1``); every Wan 2.1 variant is (4, 8, 8)."""

EMPTY_LATENT_NODE = {
    "hunyuan_video": ("comfy_extras.nodes_hunyuan", "EmptyHunyuanLatentVideo"),
    "hunyuan_video15": ("comfy_extras.nodes_hunyuan", "EmptyHunyuanVideo15Latent"),
    "ltxv": ("comfy_extras.nodes_lt", "EmptyLTXVLatentVideo"),
    "ltxav": ("comfy_extras.nodes_lt", "EmptyLTXVLatentVideo"),
    "kandinsky5": ("comfy_extras.nodes_hunyuan", "EmptyHunyuanLatentVideo"),
    "cosmos": ("comfy_extras.nodes_cosmos", "EmptyCosmosLatentVideo"),
    "mochi": ("comfy_extras.nodes_mochi", "EmptyMochiLatentVideo"),
    "wan_t2v": ("comfy_extras.nodes_hunyuan", "EmptyHunyuanLatentVideo"),
}
"""The empty-latent node a workflow of the family starts from (Cosmos Predict2 and the conditioned Wan variants
make their latent in their ``...ToVideo`` node, at the same scale)."""


def patch_size(kind: str) -> tuple[int, int, int]:
    return PATCH.get(kind, (1, 2, 2))


def pixels_per_cell(kind: str) -> tuple[int, int, int]:
    return PIXELS_PER_CELL.get(kind, (4, 8, 8))


def token_grid(kind: str, height: int, width: int, frames: int) -> tuple[int, int, int]:
    """The (t, h, w) token grid of the video latent: ``ceil(side / patch)`` per side (every family pads or needs
    multiples)."""
    pt, ph, pw = patch_size(kind)
    return -(-frames // pt), -(-height // ph), -(-width // pw)


def s2v_motion_tokens(height: int, width: int) -> int:
    """Wan S2V FramePack motion tokens: 1 frame at (1, 2, 2), 2 frames at (2, 4, 4), 16 frames at (4, 8, 8)."""
    return (height // 2) * (width // 2) + (height // 4) * (width // 4) + 4 * (height // 8) * (width // 8)


def expected_attention(kind: str, height: int, width: int, frames: int, text_tokens: int = TEXT_TOKENS, **extras):
    """(q tokens, k tokens) -> number of calls in one evaluation of the model on a positive conditioning made by
    :meth:`TinyDiT.conditioning` with ``extras``: the layout of each family as its code builds it."""
    from collections import Counter

    config = TINY_VIDEO_DITS[kind].unet_config
    t, h, w = token_grid(kind, height, width, frames)
    grid, cells = t * h * w, h * w
    text = text_tokens
    calls: Counter = Counter()
    if kind in ("hunyuan_video", "hunyuan_video15"):
        calls[(text, text)] += 2  # the token refiner: text-only self-attention, before the blocks
        joint = grid + text
        if kind == "hunyuan_video":
            joint += cells if extras.get("ref_latent") else 0  # ref_latent tokens (one frame) before the video
        else:
            joint += extras.get("vision_tokens", 0) + extras.get("byt5_tokens", 0)  # [video, vision, byT5, LLM]
        calls[(joint, joint)] += config["depth"] + config["depth_single_blocks"]
    elif kind == "ltxv":
        video = (frames + extras.get("guides", 0)) * height * width - extras.get("drop_guide_tokens", 0)
        calls[(video, video)] += config["num_layers"]
        calls[(video, text)] += config["num_layers"]
    elif kind == "ltxav":
        audio = extras.get("audio_latents") or ltxav_audio_latents(frames)
        for pair in ((grid, grid), (grid, text), (audio, audio), (audio, text), (grid, audio), (audio, grid)):
            calls[pair] += config["num_layers"]
    elif kind == "kandinsky5":
        calls[(text, text)] += config["num_text_blocks"]
        calls[(grid, grid)] += config["num_visual_blocks"]
        calls[(grid, text)] += config["num_visual_blocks"]
    elif kind in ("cosmos", "cosmos_predict2_video"):
        calls[(grid, grid)] += config["num_blocks"]
        calls[(grid, text)] += config["num_blocks"]
    elif kind == "mochi":
        joint = grid + text - extras.get("masked_text", 0)  # [video, text[:num_tokens]]
        calls[(joint, joint)] += config["depth"]
    else:  # Wan
        layers = config["num_layers"]
        seq = (frames + extras.get("time_dim_concat", 0)) * cells
        if kind == "wan_t2v" and extras.get("reference_latent"):
            seq += cells  # ref_conv tokens before the video
        if kind == "wan_s2v":
            seq += cells if extras.get("reference", True) else 0
            seq += s2v_motion_tokens(height, width) if extras.get("motion", True) else 0
        if kind == "wan_humo" and extras.get("reference", True):
            seq += cells
        calls[(seq, seq)] += layers
        calls[(seq, text)] += layers
        if kind in ("wan_camera", "wan_animate"):  # i2v cross-attention: image keys, then the text
            calls[(seq, extras.get("clip_vision_tokens") or text)] += layers
        if kind == "wan_vace":
            contexts = max(1, extras.get("vace_frames", 0))
            calls[(seq, seq)] += config["vace_layers"] * contexts
            calls[(seq, text)] += config["vace_layers"] * contexts
        if kind == "wan_humo" and extras.get("audio", True):
            calls[(cells, 16)] += layers  # per-frame gather: a batch of frames, 16 audio tokens each
    return calls


def classes(kind: str):
    """The (config class, model class) of ``kind``."""
    import comfy.model_base
    import comfy.supported_models

    tiny = TINY_VIDEO_DITS[kind]
    return getattr(comfy.supported_models, tiny.supported_model), getattr(comfy.model_base, tiny.model_base)


def loader_config_class(kind: str):
    """The config class a checkpoint loader picks for ``kind``'s unet config (first match in the models list)."""
    import comfy.supported_models

    unet = dict(TINY_VIDEO_DITS[kind].unet_config)
    return next(c for c in comfy.supported_models.models if c.matches(unet))


def build(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight ``kind`` model in a ModelPatcher on the CPU; every weight and buffer finite."""
    config_class, model_class = classes(kind)

    def get_model(config, device=None):
        """What a loader calls: the config class's own get_model (some pass image_to_video=True)."""
        model = config.get_model({}, "", device=device)
        assert type(model) is model_class, f"{config_class.__name__}.get_model built {type(model).__name__}"
        return model

    # random_patcher's plain render feeds Flux-style conditioning: these families need their own (see sample()).
    patcher = random_patcher(
        config_class, get_model, dict(TINY_VIDEO_DITS[kind].unet_config), dtype, seed=seed, check_render=False
    )
    for name, tensor in patcher.model.state_dict().items():
        assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), f"{kind}: {name} is not finite"
    return patcher


def empty_latent(patcher, kind: str, height: int, width: int, frames: int, batch: int = 1, audio_latents=None):
    """The empty latent of ``kind``: ``[B, C, F, H, W]``; LTX-2 a NestedTensor of that and ``[B, 8, A, 16]`` audio."""
    channels = patcher.get_model_object("latent_format").latent_channels
    video = torch.zeros(batch, channels, frames, height, width)
    if kind != "ltxav":
        return video
    import comfy.nested_tensor

    steps = ltxav_audio_latents(frames) if audio_latents is None else audio_latents
    audio = torch.zeros(batch, LTXAV_AUDIO_CHANNELS, steps, LTXAV_AUDIO_BINS)
    return comfy.nested_tensor.NestedTensor([video, audio])


def sample(
    patcher,
    kind: str,
    height: int,
    width: int,
    frames: int,
    batch: int = 1,
    cfg: float = 1.0,
    steps: int = 1,
    seed: int = 0,
    text_tokens: int = TEXT_TOKENS,
    sampler: str = "euler",
    edit: Callable[[list, list], None] | None = None,
    **extras,
):
    """A real ComfyUI sampler run (``comfy.sample.sample``) from the empty latent of ``kind`` on random conditioning.

    ``edit(positive, negative)`` may change the conditioning in place before sampling. Returns the sampled latent
    (a NestedTensor of video and audio for LTX-2).
    """
    import comfy.sample

    tiny = TINY_VIDEO_DITS[kind]
    audio_latents = extras.pop("audio_latents", None) if kind == "ltxav" else None
    latent_extras = {k: extras.pop(k) for k in ("guides", "guide_strength", "drop_guide_tokens") if k in extras}
    positive, negative = tiny.conditioning(
        patcher, seed, text_tokens, height=height, width=width, frames=frames, **extras
    )
    if edit is not None:
        edit(positive, negative)
    latent = empty_latent(patcher, kind, height, width, frames, batch, audio_latents)
    noise_mask = None
    if tiny.latent_fn is not None:
        positive, negative, latent, noise_mask = tiny.latent_fn(
            patcher, positive, negative, latent, seed, **latent_extras
        )
    noise = comfy.sample.prepare_noise(latent, seed + 1)
    return comfy.sample.sample(
        patcher,
        noise,
        steps,
        cfg,
        sampler,
        "simple",
        positive,
        negative,
        latent,
        noise_mask=noise_mask,
        disable_pbar=True,
        seed=seed,
    )


def finite(latent) -> bool:
    """Every value of a sampled latent (or of each part of a nested one) is finite."""
    parts = latent.unbind() if getattr(latent, "is_nested", False) else [latent]
    return all(torch.isfinite(part).all() for part in parts)


# --------------------------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CallDetail:
    """How one attention call reaches the backend (through ``optimized_attention_override``)."""

    q_tokens: int
    kv_tokens: int
    q_batch: int
    kv_batch: int
    heads: int
    heads_keyword: bool
    skip_reshape: bool
    skip_output_reshape: bool
    mask_shape: tuple[int, ...] | None
    mask_positional: bool
    attn_precision: bool
    """``attn_precision`` passed as a keyword (its value may be None)."""
    block_type: str | None
    block_index: int | None
    has_block_info: bool
    """``block_type`` is in transformer_options when the call is made."""
    kwargs: tuple[str, ...]
    """Keyword arguments other than transformer_options and the wrapper's own marker."""

    def kind(self) -> tuple:
        """Everything but the block index: calls of one kind differ only in the block they come from."""
        return (
            self.q_tokens,
            self.kv_tokens,
            self.q_batch,
            self.kv_batch,
            self.heads_keyword,
            self.skip_reshape,
            self.skip_output_reshape,
            self.mask_shape,
            self.mask_positional,
            self.attn_precision,
            self.block_type,
            self.has_block_info,
            self.kwargs,
        )


@dataclass
class VideoProbe(DiTProbe):
    """A :class:`dit_support.DiTProbe` that also records each call's convention (:class:`CallDetail`)."""

    details: list[CallDetail] = field(default_factory=list)
    keep_queries: bool = False
    """Also keep each call's queries, as ``[B, L, channels]`` (to find which tokens an input reaches)."""
    queries: list[torch.Tensor] = field(default_factory=list)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, attention, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        dim = 2 if skip_reshape else 1
        positional_mask = len(args) >= 2
        mask = args[1] if positional_mask else kwargs.get("mask")
        heads = kwargs["heads"] if "heads" in kwargs else args[0]
        self.details.append(
            CallDetail(
                q_tokens=q.shape[dim],
                kv_tokens=k.shape[dim],
                q_batch=q.shape[0],
                kv_batch=k.shape[0],
                heads=int(heads),
                heads_keyword="heads" in kwargs,
                skip_reshape=skip_reshape,
                skip_output_reshape=bool(kwargs.get("skip_output_reshape", False)),
                mask_shape=None if mask is None else tuple(mask.shape),
                mask_positional=positional_mask and mask is not None,
                attn_precision="attn_precision" in kwargs,
                block_type=options.get("block_type"),
                block_index=options.get("block_index"),
                has_block_info="block_type" in options,
                kwargs=tuple(
                    sorted(k for k in kwargs if k not in ("transformer_options", "_inside_attn_wrapper", "heads"))
                ),
            )
        )
        if self.keep_queries:
            tokens_last = q.movedim(dim, 1) if skip_reshape else q
            self.queries.append(tokens_last.reshape(q.shape[0], q.shape[dim], -1).detach().clone())
        return super().__call__(attention, q, k, v, *args, **kwargs)

    def reset(self) -> None:
        super().reset()
        self.details.clear()
        self.queries.clear()

    def kinds(self) -> dict[tuple, list[int | None]]:
        """Calls grouped by :meth:`CallDetail.kind`, in first-seen order, with the block indices of each."""
        out: dict[tuple, list[int | None]] = {}
        for call in self.details:
            out.setdefault(call.kind(), []).append(call.block_index)
        return out


def with_video_probe(patcher, keep_queries: bool = False) -> tuple[object, VideoProbe]:
    """A clone of ``patcher`` with a :class:`VideoProbe` registered as its attention override."""
    return with_probe(patcher, VideoProbe(keep_queries=keep_queries))


def changed_tokens(first: torch.Tensor, second: torch.Tensor) -> list[int]:
    """Positions along the sequence where two ``[B, L, C]`` query tensors differ."""
    differs = (first - second).abs().amax(dim=(0, 2)) > 1e-6
    return differs.nonzero().flatten().tolist()


@dataclass
class ApplyModelCall:
    """What an APPLY_MODEL wrapper receives."""

    x_shape: tuple[int, ...]
    context_shape: tuple[int, ...] | None
    c_concat_shape: tuple[int, ...] | None
    latent_shapes: tuple[tuple[int, ...], ...] | None
    keys: tuple[str, ...]


def with_apply_model_recorder(patcher) -> tuple[object, list[ApplyModelCall]]:
    """A clone of ``patcher`` with an APPLY_MODEL wrapper that records x, c_crossattn and the extra keyword keys."""
    import comfy.patcher_extension

    calls: list[ApplyModelCall] = []

    def record(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        shapes = kwargs.get("latent_shapes")
        calls.append(
            ApplyModelCall(
                tuple(x.shape),
                None if c_crossattn is None else tuple(c_crossattn.shape),
                None if c_concat is None else tuple(c_concat.shape),
                None if shapes is None else tuple(tuple(s) for s in shapes),
                tuple(sorted(kwargs)),
            )
        )
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    clone = patcher.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "tiny-video-recorder", record)
    return clone, calls
