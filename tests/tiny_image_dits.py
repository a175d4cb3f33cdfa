"""Tiny random-weight models of the image diffusion transformers of ComfyUI v0.8.0 that ToDo does not cover yet.

Every family is built as a checkpoint loader builds it: its ``comfy.supported_models``
config class around a tiny ``unet_config`` (the keys ``comfy.model_detection`` would
have read from a checkpoint, at a few blocks of small width) and its
``comfy.model_base`` class (:func:`build`, through :func:`comfy_support.random_patcher`).
Its :attr:`TinyDiT.conditioning` draws seeded random conditioning with exactly the keys
the family's ``model_base.<Class>.extra_conds`` reads (``pooled_output`` always present,
as ``CLIPTextEncode`` always sets it), so :func:`sample` runs ComfyUI's real sampler
(``comfy.sample.sample``) on it.

The text width (``TEXT_DIM``) and the pooled width (``POOLED_DIM``) are the same for all
families; the text length is a parameter. A config class is instantiated directly, so
classes that a loader picks by a width (``ZImage``: ``dim`` 3840, ``Kandinsky5Image``:
``model_dim`` 2560) are used at the tiny width.

:class:`CallProbe` records every attention call that reaches ComfyUI's
``optimized_attention_override`` with its calling convention, and
:func:`key_layout` finds empirically which key positions of each call come from the
text, from the latent, from reference latents or from nothing that varies (learned
registers, padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from comfy_support import random_patcher
from dit_support import DiTProbe, with_probe

TEXT_TOKENS = 5
"""Default length of the random text context (``c_crossattn``) of every conditioning."""
TEXT_DIM = 32
"""Width of the random text context (the text encoder's hidden width) of every tiny model."""
POOLED_DIM = 24
"""Width of pooled text vectors and of the secondary text streams (HiDream's Llama, Kandinsky's CLIP)."""
BYT5_DIM = 1472
"""HunyuanImage 2.1's ByT5 glyph-text width: fixed in ``HunyuanVideo``'s ``ByT5Mapper``."""
CASCADE_CLIP_IMG_DIM = 768
"""Stable Cascade C's image-embedding width: ``model_base.StableCascade_C`` feeds zeros of this width."""


# ---------------------------------------------------------------------------------------------------------------
# Tiny unet configs: the keys model_detection.detect_unet_config sets for each family, at tiny sizes.
# ---------------------------------------------------------------------------------------------------------------

FLUX2_TINY = {
    "image_model": "flux2",
    "in_channels": 128,
    "out_channels": 128,
    "vec_in_dim": None,
    "context_in_dim": TEXT_DIM,
    "hidden_size": 64,
    "mlp_ratio": 3.0,
    "num_heads": 2,
    "depth": 2,
    "depth_single_blocks": 2,
    "axes_dim": [8, 8, 8, 8],
    "theta": 2000,
    "patch_size": 1,
    "qkv_bias": False,
    "guidance_embed": True,
    "txt_ids_dims": [3],
    "global_modulation": True,
    "mlp_silu_act": True,
    "ops_bias": False,
    "default_ref_method": "index",
    "ref_index_scale": 10.0,
}
CHROMA_TINY = {
    "image_model": "chroma",
    "in_channels": 64,  # 16 latent channels x 2x2 patch, as model_detection stores it
    "out_channels": 64,
    "context_in_dim": TEXT_DIM,
    "hidden_size": 64,
    "mlp_ratio": 2.0,
    "num_heads": 2,
    "depth": 2,
    "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "in_dim": 64,  # the approximator's input: 16 + 16 timestep/guidance + 32 modulation-index features
    "out_dim": 64,  # = hidden_size
    "hidden_dim": 32,
    "n_layers": 1,
    "txt_ids_dims": [],
    "vec_in_dim": None,
}
CHROMA_RADIANCE_TINY = {
    **CHROMA_TINY,
    "image_model": "chroma_radiance",
    "in_channels": 3,
    "out_channels": 3,
    "patch_size": 16,
    "nerf_hidden_size": 16,
    "nerf_mlp_ratio": 2,
    "nerf_depth": 1,
    "nerf_max_freqs": 4,
    "nerf_tile_size": 512,
    "nerf_final_head_type": "conv",
    "nerf_embedder_dtype": torch.float32,
    "use_x0": False,
}
LUMINA2_TINY = {
    "image_model": "lumina2",
    "patch_size": 2,
    "in_channels": 16,
    "dim": 64,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 1,  # grouped-query attention, as Lumina 2 (24 heads, 8 KV heads)
    "multiple_of": 16,
    "ffn_dim_multiplier": 4.0,
    "qk_norm": True,
    "cap_feat_dim": TEXT_DIM,
    "axes_dims": [8, 12, 12],
    "axes_lens": [300, 512, 512],
    "rope_theta": 10000.0,
}
ZIMAGE_TINY = {
    "image_model": "lumina2",
    "patch_size": 2,
    "in_channels": 16,
    "dim": 256,  # z_image_modulation needs dim >= 256: its t_embedder always outputs 256 features
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 4,
    "n_kv_heads": 4,
    "ffn_dim_multiplier": 8.0 / 3.0,
    "qk_norm": True,
    "cap_feat_dim": TEXT_DIM,
    "axes_dims": [16, 24, 24],
    "axes_lens": [1536, 512, 512],
    "rope_theta": 256.0,
    "z_image_modulation": True,
    "time_scale": 1000.0,
    "pad_tokens_multiple": 32,
}
HIDREAM_LLAMA_LAYERS = 2
"""Hidden-state layers of the random Llama conditioning (``conditioning_llama3`` is ``[B, layers, L, width]``)."""
HIDREAM_TINY = {
    "image_model": "hidream",
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "caption_channels": [TEXT_DIM, POOLED_DIM],  # [T5 width, Llama width]
    "text_emb_dim": POOLED_DIM,
    "num_routed_experts": 4,
    "num_activated_experts": 2,
    "axes_dims_rope": [16, 8, 8],
    "max_resolution": [128, 128],
    "llama_layers": [0, 1, 1, 1],  # one Llama layer per double and single block
}
HUNYUAN_IMAGE21_TINY = {
    "image_model": "hunyuan_video",
    "in_channels": 64,
    "out_channels": 64,
    "patch_size": [1, 1],
    "vec_in_dim": None,
    "axes_dim": [16, 16],
    "context_in_dim": TEXT_DIM,
    "hidden_size": 64,
    "mlp_ratio": 2.0,
    "num_heads": 2,
    "depth": 2,
    "depth_single_blocks": 2,
    "theta": 256,
    "qkv_bias": True,
    "guidance_embed": False,
    "byt5": True,
    "meanflow": False,
    "use_cond_type_embedding": False,
    "vision_in_dim": None,
    "meanflow_sum": False,
}
HUNYUAN_IMAGE21_REFINER_TINY = {
    **HUNYUAN_IMAGE21_TINY,
    "in_channels": 128,  # 64 latent + 64 concat_cond channels
    "patch_size": [1, 1, 1],
    "axes_dim": [8, 12, 12],
    "byt5": False,
    "meanflow": True,
}
AURAFLOW_TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "patch_size": 2,
    "dim": 64,
    "n_layers": 2,
    "n_double_layers": 1,
    "n_heads": 2,
    "global_conddim": 64,
    "cond_seq_dim": TEXT_DIM,
    "max_seq": 16 * 16,
}
OMNIGEN2_TINY = {
    "image_model": "omnigen2",
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": None,
    "hidden_size": 64,
    "num_layers": 2,
    "num_refiner_layers": 1,
    "num_attention_heads": 2,
    "num_kv_heads": 1,
    "multiple_of": 16,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "axes_dim_rope": [8, 12, 12],
    "axes_lens": [1024, 1664, 1664],
    "text_feat_dim": TEXT_DIM,
    "timestep_scale": 1000.0,
}
KANDINSKY5_IMAGE_TINY = {
    "image_model": "kandinsky5",
    "in_visual_dim": 16,
    "out_visual_dim": 16,
    "in_text_dim": TEXT_DIM,
    "in_text_dim2": POOLED_DIM,
    "time_dim": 32,
    "model_dim": 64,
    "ff_dim": 128,
    "visual_embed_dim": 64,  # 16 channels x 1x2x2 patch: the image model has no concat channels
    "patch_size": (1, 2, 2),
    "num_text_blocks": 1,
    "num_visual_blocks": 2,
    "axes_dims": (8, 12, 12),
    "rope_scale_factor": (1.0, 1.0, 1.0),
}
COSMOS_PREDICT2_TINY = {
    "image_model": "cosmos_predict2",
    "max_img_h": 240,
    "max_img_w": 240,
    "max_frames": 128,
    "in_channels": 16,
    "out_channels": 16,
    "patch_spatial": 2,
    "patch_temporal": 1,
    "concat_padding_mask": True,
    "model_channels": 64,
    "num_blocks": 2,
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "crossattn_emb_channels": TEXT_DIM,
    "pos_emb_cls": "rope3d",
    "pos_emb_learnable": True,
    "pos_emb_interpolation": "crop",
    "min_fps": 1,
    "max_fps": 30,
    "use_adaln_lora": True,
    "adaln_lora_dim": 16,
    "extra_per_block_abs_pos_emb": False,
    "rope_h_extrapolation_ratio": 4.0,
    "rope_w_extrapolation_ratio": 4.0,
    "rope_t_extrapolation_ratio": 1.0,
    "extra_h_extrapolation_ratio": 1.0,
    "extra_w_extrapolation_ratio": 1.0,
    "extra_t_extrapolation_ratio": 1.0,
    "rope_enable_fps_modulation": False,
}
PIXART_TINY = {
    "image_model": "pixart_alpha",
    "num_heads": 2,
    "patch_size": 2,
    "hidden_size": 96,  # the micro-condition embedders take a third each
    "in_channels": 4,
    "depth": 2,
    "model_max_length": 16,
    "input_size": 32,
    "micro_condition": True,
    "caption_channels": TEXT_DIM,
}
HUNYUAN_DIT_TEXT = 4
"""CLIP and mT5 lengths of the tiny HunyuanDiT: its text is ``[CLIP, mT5]`` of (at least) these lengths."""
HUNYUAN_DIT_TINY = {
    "image_model": "hydit1",
    "input_size": 32,
    "patch_size": 2,
    "in_channels": 4,
    "hidden_size": 64,
    "depth": 2,  # an even depth: the long skips pair block i with block depth - 1 - i
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "text_states_dim": TEXT_DIM,
    "text_states_dim_t5": TEXT_DIM,
    "text_len": HUNYUAN_DIT_TEXT,
    "text_len_t5": HUNYUAN_DIT_TEXT,
    "size_cond": True,
    "use_style_cond": True,
}
STABLE_CASCADE_C_TINY = {
    "stable_cascade_stage": "c",
    "c_in": 16,
    "c_out": 16,
    "c_r": 64,
    "c_cond": 32,
    "c_hidden": [32, 32],
    "nhead": [2, 2],
    "blocks": [[1, 1], [1, 1]],
    "block_repeat": [[1, 1], [1, 1]],
    "level_config": ["CTA", "CTA"],
    "c_clip_text": TEXT_DIM,
    "c_clip_text_pooled": POOLED_DIM,
    "c_clip_img": CASCADE_CLIP_IMG_DIM,
    "c_clip_seq": 4,
}


# ---------------------------------------------------------------------------------------------------------------
# Conditioning: the keys each model_base.<Class>.extra_conds reads, drawn at random.
# ---------------------------------------------------------------------------------------------------------------

Conditioning = list  # ComfyUI conditioning: [[cross_attn, {key: value}], ...]


def _randn(generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def _conds(one: Callable[[], list]) -> tuple[Conditioning, Conditioning]:
    """Positive and negative conditioning drawn one after the other from the same generator."""
    return [one()], [one()]


def _text_only(patcher, seed, text_tokens=TEXT_TOKENS, batch=1, latent_shape=None, pooled=False, **extras):
    """``c_crossattn`` (``cross_attn``) and ``pooled_output`` (None unless the family reads it)."""
    assert not extras, f"unknown extras {sorted(extras)}"
    generator = torch.Generator().manual_seed(seed)
    return _conds(
        lambda: [
            _randn(generator, batch, text_tokens, TEXT_DIM),
            {"pooled_output": _randn(generator, batch, POOLED_DIM) if pooled else None},
        ]
    )


def _with_mask(patcher, seed, text_tokens=TEXT_TOKENS, batch=1, latent_shape=None, **extras):
    """Text plus the all-ones ``attention_mask`` an LLM text encoder returns for an unpadded prompt."""
    positive, negative = _text_only(patcher, seed, text_tokens, batch, latent_shape, **extras)
    for cond in positive + negative:
        cond[1]["attention_mask"] = torch.ones(batch, text_tokens, dtype=torch.long)
    return positive, negative


def _pooled(patcher, seed, text_tokens=TEXT_TOKENS, batch=1, latent_shape=None, **extras):
    return _text_only(patcher, seed, text_tokens, batch, latent_shape, pooled=True, **extras)


def _reference_latents(generator, channels: int, batch: int, references) -> list[torch.Tensor]:
    """``reference_latents`` as ``ReferenceLatent`` sets them: one latent ``[B, C, h, w]`` per reference."""
    return [_randn(generator, batch, channels, h, w) for h, w in references]


def _flux2(patcher, seed, text_tokens=TEXT_TOKENS, batch=1, latent_shape=None, references=(), **extras):
    """Flux.2: Mistral text (left-padded to 512 tokens by ``extra_conds``), guidance, optional reference latents.

    ``references``: ``(h, w)`` latent sizes of reference images, set on positive and negative (as
    ``ReferenceLatent`` on both), so that CFG batches them into one call.
    """
    positive, negative = _text_only(patcher, seed, text_tokens, batch, latent_shape, **extras)
    generator = torch.Generator().manual_seed(seed + 7)
    if references:
        for cond in positive + negative:
            cond[1]["reference_latents"] = _reference_latents(generator, 128, batch, references)
    return positive, negative


def _omnigen2(patcher, seed, text_tokens=TEXT_TOKENS, batch=1, latent_shape=None, references=(), **extras):
    """OmniGen2: Qwen2.5-VL text with its all-ones mask, optional reference latents (16 channels)."""
    positive, negative = _with_mask(patcher, seed, text_tokens, batch, latent_shape, **extras)
    generator = torch.Generator().manual_seed(seed + 7)
    if references:
        for cond in positive + negative:
            cond[1]["reference_latents"] = _reference_latents(generator, 16, batch, references)
    return positive, negative


def _hidream(patcher, seed, text_tokens=TEXT_TOKENS, batch=1, latent_shape=None, llama_tokens=None, edit=False):
    """HiDream: T5 (``c_crossattn``), Llama-3.1 hidden states of every layer, pooled CLIP-L+G.

    ``llama_tokens``: length of the Llama stream (default ``text_tokens + 3``, so both lengths can be told apart).
    ``edit``: HiDream-E1, a source latent (``concat_latent_image``) that the model puts beside the target.
    """
    llama_tokens = text_tokens + 3 if llama_tokens is None else llama_tokens
    generator = torch.Generator().manual_seed(seed)

    def one():
        extra = {
            "pooled_output": _randn(generator, batch, POOLED_DIM),
            "conditioning_llama3": _randn(generator, batch, HIDREAM_LLAMA_LAYERS, llama_tokens, POOLED_DIM),
        }
        return [_randn(generator, batch, text_tokens, TEXT_DIM), extra]

    positive, negative = _conds(one)
    if edit:
        assert latent_shape is not None, "the E1 source latent has the noise's shape"
        source = _randn(generator, 1, *latent_shape[1:])
        for cond in positive + negative:
            cond[1]["concat_latent_image"] = source
    return positive, negative


def _hunyuan_image21(patcher, seed, text_tokens=TEXT_TOKENS, batch=1, latent_shape=None, byt5_tokens=3, **extras):
    """HunyuanImage 2.1: Qwen2.5-VL text with its mask, ByT5 glyph text (``byt5_tokens``, 0 for a prompt without
    quoted text, where the text encoder sets no ``conditioning_byt5small``)."""
    positive, negative = _with_mask(patcher, seed, text_tokens, batch, latent_shape, **extras)
    generator = torch.Generator().manual_seed(seed + 7)
    if byt5_tokens:
        for cond in positive + negative:
            cond[1]["conditioning_byt5small"] = _randn(generator, batch, byt5_tokens, BYT5_DIM)
    return positive, negative


def _hunyuan_image21_refiner(patcher, seed, text_tokens=TEXT_TOKENS, batch=1, latent_shape=None, source=True):
    """The refiner: text with its mask and (``HunyuanRefinerLatent``) the base image's latent as
    ``concat_latent_image`` (32 channels, one frame: the refiner VAE's latent before ``process_in``)."""
    positive, negative = _with_mask(patcher, seed, text_tokens, batch, latent_shape)
    if source:
        assert latent_shape is not None, "the source latent has the noise's size"
        generator = torch.Generator().manual_seed(seed + 7)
        image = _randn(generator, 1, 32, 1, *latent_shape[-2:])
        for cond in positive + negative:
            cond[1]["concat_latent_image"] = image
            cond[1]["noise_augmentation"] = 0.1
    return positive, negative


def _hunyuan_dit(patcher, seed, text_tokens=TEXT_TOKENS, batch=1, latent_shape=None):
    """HunyuanDiT: CLIP (``c_crossattn``) and mT5 states with their masks (both at least ``HUNYUAN_DIT_TEXT``)."""
    tokens = max(text_tokens, HUNYUAN_DIT_TEXT)
    generator = torch.Generator().manual_seed(seed)

    def one():
        extra = {
            "pooled_output": None,
            "attention_mask": torch.ones(batch, tokens),
            "conditioning_mt5xl": _randn(generator, batch, tokens, TEXT_DIM),
            "attention_mask_mt5xl": torch.ones(batch, tokens),
        }
        return [_randn(generator, batch, tokens, TEXT_DIM), extra]

    return _conds(one)


# ---------------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyDiT:
    """One image DiT family of ComfyUI v0.8.0, tiny."""

    config: str
    """Its ``comfy.supported_models`` class."""
    model: str
    """Its ``comfy.model_base`` class."""
    unet_config: dict
    conditioning: Callable
    """``conditioning(patcher, seed, text_tokens=TEXT_TOKENS, batch=1, latent_shape=None, **extras)`` ->
    ``(positive, negative)`` ComfyUI conditioning."""
    patch: tuple[int, int]
    """Latent cells per token along (h, w)."""
    pixels_per_cell: int
    """Image pixels per latent cell along each side (what the family's VAE / empty-latent node divides by)."""
    divisor: int = 1
    """Latent sides must be multiples of this (the model fails on other sizes); 1: any size (padded to patches)."""
    min_cells: int = 1
    """Smallest latent side it accepts (PixArt's position embedding divides by ``round(mean side / 64)``)."""
    reaches_override: bool = True
    """False: its attention calls never go through ``optimized_attention_override``."""
    plain_render: bool = False
    """Whether :func:`comfy_support.plain_render`'s generic conditioning can feed it."""
    extras: tuple[str, ...] = ()
    """Names of the optional keyword arguments its ``conditioning`` accepts."""
    perturbations: tuple[str, ...] = field(default=("text", "noise"))
    """Inputs :func:`key_layout` varies one at a time to label the key positions."""
    full_width: dict = field(default_factory=dict)
    """The ``unet_config`` values the family's config class matches on that the tiny model shrinks: with them,
    ``comfy.model_detection.model_config_from_unet_config`` picks :attr:`config` for :attr:`unet_config`."""

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of a ``height`` x ``width``-cell latent: every family pads to whole patches."""
        return -(-height // self.patch[0]), -(-width // self.patch[1])


TINY_IMAGE_DITS: dict[str, TinyDiT] = {
    "flux2": TinyDiT(
        "Flux2",
        "Flux2",
        FLUX2_TINY,
        _flux2,
        (1, 1),
        16,
        plain_render=False,
        extras=("references",),
        perturbations=("text", "noise", "ref"),
    ),
    "chroma": TinyDiT("Chroma", "Chroma", CHROMA_TINY, _text_only, (2, 2), 8),
    "chroma_radiance": TinyDiT("ChromaRadiance", "ChromaRadiance", CHROMA_RADIANCE_TINY, _text_only, (16, 16), 1),
    "lumina2": TinyDiT("Lumina2", "Lumina2", LUMINA2_TINY, _with_mask, (2, 2), 8, plain_render=True),
    "zimage": TinyDiT(
        "ZImage",
        "Lumina2",
        ZIMAGE_TINY,
        _with_mask,
        (2, 2),
        8,
        plain_render=True,
        full_width={"dim": 3840},
    ),
    "hidream": TinyDiT(
        "HiDream",
        "HiDream",
        HIDREAM_TINY,
        _hidream,
        (2, 2),
        8,
        extras=("llama_tokens", "edit"),
        perturbations=("text", "llama", "noise", "image_cond"),
    ),
    "hunyuan_image21": TinyDiT(
        "HunyuanImage21",
        "HunyuanImage21",
        HUNYUAN_IMAGE21_TINY,
        _hunyuan_image21,
        (1, 1),
        32,
        extras=("byt5_tokens",),
        perturbations=("text", "byt5", "noise"),
    ),
    "hunyuan_image21_refiner": TinyDiT(
        "HunyuanImage21Refiner",
        "HunyuanImage21Refiner",
        HUNYUAN_IMAGE21_REFINER_TINY,
        _hunyuan_image21_refiner,
        (1, 1),
        16,
        extras=("source",),
        perturbations=("text", "noise", "image_cond"),
    ),
    "auraflow": TinyDiT(
        "AuraFlow",
        "AuraFlow",
        AURAFLOW_TINY,
        _text_only,
        (2, 2),
        8,
        plain_render=True,
        full_width={"cond_seq_dim": 2048},
    ),
    "omnigen2": TinyDiT(
        "Omnigen2",
        "Omnigen2",
        OMNIGEN2_TINY,
        _omnigen2,
        (2, 2),
        8,
        extras=("references",),
        perturbations=("text", "noise", "ref"),
    ),
    "kandinsky5_image": TinyDiT(
        "Kandinsky5Image",
        "Kandinsky5Image",
        KANDINSKY5_IMAGE_TINY,
        _pooled,
        (2, 2),
        8,
        divisor=2,
        full_width={"model_dim": 2560},
    ),
    "cosmos_predict2": TinyDiT(
        "CosmosT2IPredict2",
        "CosmosPredict2",
        COSMOS_PREDICT2_TINY,
        _text_only,
        (2, 2),
        8,
        divisor=2,
        plain_render=True,
    ),
    "pixart": TinyDiT(
        "PixArtAlpha",
        "PixArt",
        PIXART_TINY,
        _text_only,
        (2, 2),
        8,
        divisor=2,
        min_cells=34,
        reaches_override=False,
    ),
    "hunyuan_dit": TinyDiT(
        "HunyuanDiT1",
        "HunyuanDiT",
        HUNYUAN_DIT_TINY,
        _hunyuan_dit,
        (2, 2),
        8,
        reaches_override=False,
    ),
    "stable_cascade_c": TinyDiT(
        "Stable_Cascade_C",
        "StableCascade_C",
        STABLE_CASCADE_C_TINY,
        _pooled,
        (1, 1),
        42,
        perturbations=("text", "pooled", "noise"),
    ),
}
"""Short family name -> :class:`TinyDiT`. ``pixels_per_cell`` of Stable Cascade C is its default compression
(42: a 1024² image is a 24x24 prior latent). PixArt and HunyuanDiT call ``optimized_attention`` without
``transformer_options`` (``pixart/blocks.py``, ``hydit/attn_layers.py``): nothing of theirs reaches the override.
Stable Cascade C passes it down to every attention (``cascade/common.py``): its calls do reach it."""


def family(kind: str) -> TinyDiT:
    return TINY_IMAGE_DITS[kind]


def build(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight ``kind`` model in a ModelPatcher on the CPU, checked finite on a small render."""
    import comfy.model_base
    import comfy.supported_models

    spec = family(kind)
    config_class = getattr(comfy.supported_models, spec.config)
    model_class = getattr(comfy.model_base, spec.model)
    patcher = random_patcher(
        config_class, model_class, dict(spec.unet_config), dtype, seed=seed, check_render=spec.plain_render
    )
    if not spec.plain_render:  # random_patcher's generic render cannot condition it: render it with its own keys
        cells = max(2 * spec.patch[0], spec.divisor, spec.min_cells)
        with torch.random.fork_rng(devices=[]):
            out = sample(patcher, kind, cells, cells)
        assert torch.isfinite(out).all(), f"a plain render of the tiny {kind} is not finite"
    return patcher


def latent_shape(patcher, batch: int, height: int, width: int) -> tuple[int, ...]:
    """The empty latent the family samples from: 4-D, or 5-D with one frame where the latent format is 3-D
    (Cosmos Predict2, the HunyuanImage refiner: 64 channels, as the KSampler node widens the refiner's empty
    32-channel latent). ChromaRadiance's "latent" is the RGB image itself."""
    latent_format = patcher.get_model_object("latent_format")
    channels = latent_format.latent_channels
    if latent_format.latent_dimensions == 3:
        return (batch, channels, 1, height, width)
    return (batch, channels, height, width)


def sample(
    patcher,
    kind: str,
    height: int,
    width: int,
    batch: int = 1,
    cfg: float = 1.0,
    steps: int = 1,
    seed: int = 0,
    text_tokens: int = TEXT_TOKENS,
    noise_seed: int | None = None,
    conditioning: tuple[Conditioning, Conditioning] | None = None,
    **extras,
) -> torch.Tensor:
    """ComfyUI's sampler (Euler, simple schedule) from an empty ``height`` x ``width``-cell latent.

    ``extras`` go to the family's conditioning (reference latents, edit source, ...);
    ``conditioning`` replaces it; ``noise_seed`` (default ``seed + 1``) draws the noise.
    """
    import comfy.sample

    shape = latent_shape(patcher, batch, height, width)
    if conditioning is None:
        conditioning = family(kind).conditioning(patcher, seed, text_tokens, latent_shape=shape, **extras)
    positive, negative = conditioning
    noise_seed = seed + 1 if noise_seed is None else noise_seed
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed))
    return comfy.sample.sample(
        patcher,
        noise,
        steps,
        cfg,
        "euler",
        "simple",
        positive,
        negative,
        torch.zeros(shape),
        disable_pbar=True,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------------------------
# Probing the attention calls
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CallRecord:
    """One attention call as ``optimized_attention_override`` receives it."""

    index: int
    q_tokens: int
    kv_tokens: int
    batch: int
    skip_reshape: bool
    heads: int
    heads_keyword: bool
    mask_shape: tuple[int, ...] | None
    mask_positional: bool
    block_type: str | None
    block_index: int | None
    other_kwargs: tuple[str, ...]
    keys: torch.Tensor | None = None
    """``[B, L, features]`` copy of k (only when the probe keeps keys)."""

    @property
    def signature(self) -> tuple:
        return (self.block_type, self.q_tokens, self.kv_tokens, self.skip_reshape, self.mask_shape)


@dataclass
class CallProbe(DiTProbe):
    """A :class:`dit_support.DiTProbe` that also records each call's convention, and its keys if asked."""

    records: list[CallRecord] = field(default_factory=list)
    keep_keys: bool = False

    def __call__(self, attention, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        sequence_dim = 2 if skip_reshape else 1
        mask_positional = len(args) >= 2
        mask = args[1] if mask_positional else kwargs.get("mask")
        heads = args[0] if args else kwargs.get("heads")
        keys = None
        if self.keep_keys:
            keys = (k.transpose(1, 2) if skip_reshape else k).detach().flatten(2).clone()
        known = {"transformer_options", "skip_reshape", "mask", "heads", "_inside_attn_wrapper"}
        self.records.append(
            CallRecord(
                len(self.records),
                q.shape[sequence_dim],
                k.shape[sequence_dim],
                q.shape[0],
                skip_reshape,
                int(heads),
                "heads" in kwargs,
                None if mask is None else tuple(mask.shape),
                mask_positional and mask is not None,
                options.get("block_type"),
                options.get("block_index"),
                tuple(sorted(set(kwargs) - known)),
                keys,
            )
        )
        return super().__call__(attention, q, k, v, *args, **kwargs)

    def reset(self) -> None:
        super().reset()
        self.records.clear()


def probed_sample(patcher, kind: str, height: int, width: int, keep_keys: bool = False, **kwargs):
    """:func:`sample` on a probed clone: ``(output, probe)``."""
    clone, probe = with_probe(patcher, CallProbe(keep_keys=keep_keys))
    out = sample(clone, kind, height, width, **kwargs)
    return out, probe


_PERTURBED_KEY = {
    "pooled": "pooled_output",
    "llama": "conditioning_llama3",
    "byt5": "conditioning_byt5small",
    "ref": "reference_latents",
    "image_cond": "concat_latent_image",
}
"""The conditioning key each non-text, non-noise perturbation redraws."""


def _perturbed(conditioning, what: str, generator) -> tuple[Conditioning, Conditioning]:
    """A copy of ``conditioning`` with one input redrawn (same shapes)."""
    out = []
    for conds in conditioning:
        new = []
        for tensor, extra in conds:
            extra = dict(extra)
            if what == "text":
                tensor = torch.randn(tensor.shape, generator=generator)
            elif what == "ref":
                extra["reference_latents"] = [
                    torch.randn(r.shape, generator=generator) for r in extra["reference_latents"]
                ]
            elif what in _PERTURBED_KEY:
                key = _PERTURBED_KEY[what]
                extra[key] = torch.randn(extra[key].shape, generator=generator)
            else:
                raise ValueError(what)
            new.append([tensor, extra])
        out.append(new)
    return out[0], out[1]


def segments(labels: list[str]) -> list[tuple[str, int]]:
    """Run-length encoding: ``["t", "t", "i"]`` -> ``[("t", 2), ("i", 1)]``."""
    out: list[tuple[str, int]] = []
    for label in labels:
        if out and out[-1][0] == label:
            out[-1] = (label, out[-1][1] + 1)
        else:
            out.append((label, 1))
    return out


@dataclass
class CallLayout:
    """The key sequence of one attention call, position by position: which inputs change it."""

    record: CallRecord
    labels: list[str]
    """Per key position: the perturbed inputs that change it, joined by ``+``; ``const`` where none does."""

    @property
    def segments(self) -> list[tuple[str, int]]:
        return segments(self.labels)


def key_layout(
    patcher,
    kind: str,
    height: int,
    width: int,
    text_tokens: int = TEXT_TOKENS,
    seed: int = 0,
    perturbations: tuple[str, ...] | None = None,
    **extras,
) -> list[CallLayout]:
    """Which key positions of every attention call of one model call depend on which input.

    One sampler step at CFG 1 (one model call) is run once as is and once per perturbation, each
    time redrawing one input: ``text`` (``c_crossattn``), ``noise`` (the latent), and the family's
    other streams (``llama``, ``byt5``, ``ref`` reference latents, ``image_cond`` edit / refiner
    source). A key position is labelled with the perturbations that change it. In deep layers of a
    joint attention every position mixes every input; the first call of each kind shows the layout.
    """
    shape = latent_shape(patcher, 1, height, width)
    base_conditioning = family(kind).conditioning(patcher, seed, text_tokens, latent_shape=shape, **extras)
    if perturbations is None:  # the family's inputs that this conditioning has
        present = set(base_conditioning[0][0][1])
        perturbations = tuple(p for p in family(kind).perturbations if _PERTURBED_KEY.get(p, "") in present | {""})

    def run(conditioning, noise_seed):
        _, probe = probed_sample(
            patcher,
            kind,
            height,
            width,
            keep_keys=True,
            seed=seed,
            text_tokens=text_tokens,
            conditioning=conditioning,
            noise_seed=noise_seed,
        )
        return probe.records

    base = run(base_conditioning, seed + 1)
    changed = [[set() for _ in range(r.kv_tokens)] for r in base]
    generator = torch.Generator().manual_seed(seed + 1000)
    for what in perturbations:
        if what == "noise":
            records = run(base_conditioning, seed + 2)
        else:
            records = run(_perturbed(base_conditioning, what, generator), seed + 1)
        assert [r.signature for r in records] == [r.signature for r in base], f"perturbing {what} changed the calls"
        for call, (a, b) in enumerate(zip(base, records, strict=True)):
            difference = (a.keys - b.keys).abs().amax(dim=(0, 2))
            scale = a.keys.abs().amax().clamp_min(1e-12)
            for position in torch.nonzero(difference > 1e-5 * scale).flatten().tolist():
                changed[call][position].add(what)
    layouts = []
    for record, positions in zip(base, changed, strict=True):
        labels = ["+".join(p for p in perturbations if p in s) or "const" for s in positions]
        layouts.append(CallLayout(dataclasses.replace(record, keys=None), labels))
    return layouts


def first_of_each_kind(layouts: list[CallLayout]) -> list[CallLayout]:
    """The first call of every (block type, q length, k length): where the layout is not yet mixed."""
    seen, out = set(), []
    for layout in layouts:
        kind = (layout.record.block_type, layout.record.q_tokens, layout.record.kv_tokens)
        if kind not in seen:
            seen.add(kind)
            out.append(layout)
    return out
