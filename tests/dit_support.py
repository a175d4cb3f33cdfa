"""Tiny random-weight diffusion transformers built from ComfyUI's own model classes, and a probe for them.

Each family is built from its ``comfy.supported_models`` config and its
``comfy.model_base`` class, as a checkpoint loader would, but with a few blocks
of small width; the weights are random (``normal(0, 0.05)``, so no zero-init
output layer hides what attention does). :func:`sample_dit` runs ComfyUI's real
sampler on random conditioning of the shapes each family's ``extra_conds``
expects. :class:`DiTProbe` is an ``optimized_attention_override`` registered on
the model *before* ToDo: ToDo keeps it as its inner override and calls it with
the reduced keys, so it records exactly what the attention backend computes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from comfy_support import random_patcher

OVERRIDE_KEY = "optimized_attention_override"
TEXT_TOKENS = 5
"""Length of the random text context (cross_attn) of every test conditioning."""
CONTEXT_DIM = 32
"""Width of the random text context (the text encoder's output width) of every tiny model."""
POOLED_DIM = 24
"""Width of the pooled text vector (Flux ``vec_in_dim``, SD3 ``adm_in_channels``)."""
LATENT_CHANNELS = 16
FAMILIES = ("flux", "sd3", "qwen_image", "wan")

FLUX_TINY = {
    "image_model": "flux",
    "guidance_embed": True,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "vec_in_dim": POOLED_DIM,
    "context_in_dim": CONTEXT_DIM,
    "hidden_size": 64,
    "mlp_ratio": 2.0,
    "num_heads": 2,
    "depth": 2,
    "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
}
SD3_TINY = {
    # MMDiT's width is 64 * depth with depth heads: depth 2 = width 128, 2 heads of 64.
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "patch_size": 2,
    "depth": 2,
    "input_size": None,
    "adm_in_channels": POOLED_DIM,
    "context_embedder_config": {
        "target": "torch.nn.Linear",
        "params": {"in_features": CONTEXT_DIM, "out_features": 128},
    },
    "pos_embed_scaling_factor": None,
    "qk_norm": "rms",
    # SD3.5's extra image-only self-attention in block 0: attention over the image grid alone.
    "x_block_self_attn_layers": [0],
}
QWEN_TINY = {
    "image_model": "qwen_image",
    "patch_size": 2,
    "in_channels": LATENT_CHANNELS * 4,
    "out_channels": LATENT_CHANNELS,
    "num_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": CONTEXT_DIM,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (8, 12, 12),
}
WAN_TINY = {
    "image_model": "wan2.1",
    "model_type": "t2v",
    "patch_size": (1, 2, 2),
    "text_len": 16,
    "in_dim": LATENT_CHANNELS,
    "dim": 64,
    "ffn_dim": 128,
    "freq_dim": 32,
    "text_dim": CONTEXT_DIM,
    "out_dim": LATENT_CHANNELS,
    "num_heads": 2,
    "num_layers": 2,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
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
    "cond_seq_dim": CONTEXT_DIM,
    "max_seq": 16 * 16,
}

LUMINA2_TINY = {
    "image_model": "lumina2",
    "patch_size": 2,
    "in_channels": LATENT_CHANNELS,
    "dim": 64,
    "n_layers": 1,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "multiple_of": 16,
    "qk_norm": True,
    "cap_feat_dim": CONTEXT_DIM,
    "axes_dims": [8, 12, 12],
    "axes_lens": [1, 512, 512],
}


def _flux_config():
    from comfy.ldm.flux.model import FluxParams

    config = dict(FLUX_TINY)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:  # newer ComfyUI
        config["txt_ids_dims"] = []
    return config


def _family_classes(kind: str):
    import comfy.model_base
    import comfy.supported_models as sm

    return {
        "flux": (sm.Flux, comfy.model_base.Flux, _flux_config),
        "sd3": (sm.SD3, comfy.model_base.SD3, lambda: dict(SD3_TINY)),
        "qwen_image": (sm.QwenImage, comfy.model_base.QwenImage, lambda: dict(QWEN_TINY)),
        "wan": (sm.WAN21_T2V, comfy.model_base.WAN21, lambda: dict(WAN_TINY)),
        "auraflow": (sm.AuraFlow, comfy.model_base.AuraFlow, lambda: dict(AURAFLOW_TINY)),
        "lumina2": (sm.Lumina2, comfy.model_base.Lumina2, lambda: dict(LUMINA2_TINY)),
    }[kind]


def tiny_dit(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight ``kind`` DiT in a ModelPatcher on the CPU.

    ``kind``: flux, sd3, qwen_image, wan; auraflow and lumina2 are DiTs ToDo does not support.
    """
    config_class, model_class, unet_config = _family_classes(kind)
    return random_patcher(config_class, model_class, unet_config(), dtype, seed=seed)


def is_video(patcher) -> bool:
    return patcher.get_model_object("latent_format").latent_dimensions == 3


def latent_channels(patcher) -> int:
    return patcher.get_model_object("latent_format").latent_channels


def conditioning(patcher, seed: int, text_tokens: int = TEXT_TOKENS):
    """Random positive and negative conditioning with the keys the model's ``extra_conds`` reads."""
    generator = torch.Generator().manual_seed(seed)
    unet_config = patcher.model.model_config.unet_config
    pooled = unet_config.get("adm_in_channels") or unet_config.get("vec_in_dim")

    def one():
        extra = {}
        if pooled:  # Flux's vec_in_dim, SD3's adm_in_channels: both come from pooled_output
            extra["pooled_output"] = torch.randn(1, pooled, generator=generator)
        return [[torch.randn(1, text_tokens, CONTEXT_DIM, generator=generator), extra]]

    return one(), one()


def latent_shape(patcher, batch: int, height: int, width: int, frames: int = 1) -> tuple[int, ...]:
    """Qwen-Image and Wan latents are 5-D ``[B, C, T, H, W]`` (ComfyUI unsqueezes empty image latents)."""
    if is_video(patcher):
        return (batch, latent_channels(patcher), frames, height, width)
    return (batch, latent_channels(patcher), height, width)


def sample_dit(
    patcher,
    height: int,
    width: int,
    frames: int = 1,
    batch: int = 1,
    steps: int = 1,
    cfg: float = 1.0,
    seed: int = 0,
    text_tokens: int = TEXT_TOKENS,
    sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """A real ComfyUI sampler run (Euler) from an empty latent on random conditioning."""
    import comfy.sample

    positive, negative = conditioning(patcher, seed, text_tokens)
    shape = latent_shape(patcher, batch, height, width, frames)
    latent = torch.zeros(shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return comfy.sample.sample(
        patcher,
        noise,
        steps,
        cfg,
        "euler",
        "simple",
        positive,
        negative,
        latent,
        disable_pbar=True,
        seed=seed,
        sigmas=sigmas,
    )


@dataclass
class DiTCall:
    """One attention call as the backend receives it."""

    block_type: str | None
    block_index: int | None
    q_tokens: int
    kv_tokens: int
    mask_shape: tuple[int, ...] | None
    sigma: float | None
    batch: int


@dataclass
class DiTProbe:
    """``optimized_attention_override`` probe: records the q/k lengths along the sequence dimension, then attends.

    Register it on a clone of the model before applying ToDo (:func:`with_probe`):
    ToDo keeps it as its inner override and calls it with the keys it kept.
    """

    passes_attention_masks = True  # it hands every mask to the backend: ToDo's correction stays a mask

    calls: list[DiTCall] = field(default_factory=list)

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone deep-copies model_options: every clone must record into this probe

    def __call__(self, attention, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        sequence_dim = 2 if kwargs.get("skip_reshape", False) else 1
        mask = args[1] if len(args) >= 2 else kwargs.get("mask")
        sigmas = options.get("sigmas")
        # SD3's MMDiT hands v over as [B, L, heads, head_dim] beside [B, L, heads * head_dim] q and k.
        assert k.shape[: sequence_dim + 1] == v.shape[: sequence_dim + 1]
        self.calls.append(
            DiTCall(
                options.get("block_type"),
                options.get("block_index"),
                q.shape[sequence_dim],
                k.shape[sequence_dim],
                None if mask is None else tuple(mask.shape),
                None if sigmas is None else float(sigmas.reshape(-1)[0]),
                q.shape[0],
            )
        )
        return attention(q, k, v, *args, **kwargs)

    def self_attention(self, text_tokens: int = TEXT_TOKENS) -> list[DiTCall]:
        """Calls over the model's own sequence (joint or image-only); Wan's cross-attention has the text as keys."""
        return [c for c in self.calls if c.kv_tokens != text_tokens]

    def reset(self) -> None:
        self.calls.clear()


def with_probe(patcher, probe: DiTProbe | None = None) -> tuple[object, DiTProbe]:
    """A clone of ``patcher`` with a recording override registered on it (as another pack's override would be)."""
    probe = DiTProbe() if probe is None else probe
    clone = patcher.clone()
    clone.model_options = {
        **clone.model_options,
        "transformer_options": {**clone.model_options.get("transformer_options", {}), OVERRIDE_KEY: probe},
    }
    return clone, probe


def token_grid(height: int, width: int, patch: int = 2) -> tuple[int, int]:
    """Every DiT pads the latent to whole patches: ``ceil(side / patch)`` tokens per side."""
    return -(-height // patch), -(-width // patch)


@dataclass
class DtypeProbe(DiTProbe):
    """A :class:`DiTProbe` that also records the dtypes of q, k, v and the mask the backend receives."""

    dtypes: list[tuple[torch.dtype, ...]] = field(default_factory=list)

    def __call__(self, attention, q, k, v, *args, **kwargs):
        mask = args[1] if len(args) >= 2 else kwargs.get("mask")
        self.dtypes.append((q.dtype, k.dtype, v.dtype) + (() if mask is None else (mask.dtype,)))
        return super().__call__(attention, q, k, v, *args, **kwargs)


def with_dtype_probe(patcher) -> tuple[object, DtypeProbe]:
    """:func:`with_probe` with a :class:`DtypeProbe`."""
    return with_probe(patcher, DtypeProbe())


def check_key_counts(unpatched: DiTProbe, patched: DiTProbe, dropped_keys, what: str) -> int:
    """Call by call, the patched run keeps the queries and has the unpatched keys less ``dropped_keys(i, call)``.

    Returns how many calls lost keys; at least one must, or nothing held ``what``.
    """
    assert len(patched.calls) == len(unpatched.calls) and unpatched.calls
    reduced = 0
    for index, (before, after) in enumerate(zip(unpatched.calls, patched.calls, strict=True)):
        assert after.q_tokens == before.q_tokens
        dropped = dropped_keys(index, before)
        assert after.kv_tokens == before.kv_tokens - dropped, (index, before, after)
        reduced += dropped > 0
    assert reduced, f"no call held {what}"
    return reduced


class LazyModels(dict):
    """Models built on first use and kept for a test module: ``models[kind]``."""

    def __init__(self, build) -> None:
        super().__init__()
        self.build = build

    def __missing__(self, kind: str):
        self[kind] = self.build(kind)
        return self[kind]
