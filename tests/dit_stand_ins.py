"""Small random-weight stand-ins for the model files of the DiT example workflows (Z-Image, Flux.2, Wan 2.2).

The workflows load split files: a diffusion model (UNETLoader), a text encoder (CLIPLoader) and a VAE
(VAELoader). The end-to-end tests run those graphs unchanged on a real server, so each file name gets a stand-in
that ComfyUI's own loaders load as the architecture the graph expects, at a size a 2-core CPU runs in seconds:

- **Diffusion models**: the model class of the real one (``NextDiT`` as ComfyUI's ``ZImage`` config, ``Flux`` as
  ``Flux2``, ``WanModel`` as ``WAN22_T2V``: the 48-channel TI2V 5B) with two heads, a width of 64 to 256 and two
  or three blocks. ComfyUI's detection reads widths and block counts from the tensor shapes, but hard-codes the rest for
  the full-size models (Flux.2's 48 heads, Z-Image's 30 heads and RoPE axes, Wan's text width of 4096), and
  matches Z-Image by its full width, 3840. A stand-in therefore carries those few values, and the config class, in
  its safetensors metadata (:data:`STAND_IN_KEY`); the test server's ``stand_in_loader`` custom node applies them
  on top of what detection read (:func:`detected_config_agrees` checks that detection reads everything else).
- **Text encoders**: one random CLIP-L under each text-encoder name. ComfyUI builds the text encoder the file holds
  (Qwen3-4B, Mistral-Small-3.1 and UMT5-XXL have fixed sizes in ComfyUI, billions of parameters), and a CLIP-L
  file loads as CLIP-L under the ``lumina2``, ``flux2`` and ``wan`` types alike; the stand-in DiTs take its
  768-wide text features.
- **VAEs**: ComfyUI builds its VAEs at fixed widths (84 M parameters for Flux.1's and Flux.2's, 705 M for Wan
  2.2's), and decoding with them is the slowest step of a CPU run. Where ComfyUI loads a tiny decoder for the same
  latent, that stands in: a random TAESD for Z-Image's ``ae.safetensors`` (Flux.1's VAE: 16 channels, 8x) and a
  random TAEHV for ``wan2.2_vae.safetensors`` (48 channels, 16x, four frames per latent frame; it cannot encode,
  which the text-to-video graph never asks for). ``flux2-vae.safetensors`` has no such decoder, so it is the real
  architecture: its batch norm over the 2x2-patched latent (128 channels at 16x) runs as in the real model.

Everything is written once into the test cache (0.5 GB, mostly the CLIP-L and the Flux.2 VAE) and reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

STAND_IN_KEY = "comfyui_todo_stand_in"
"""Safetensors metadata key: JSON with the ComfyUI config class and the config values detection hard-codes."""
TEXT_WIDTH = 768
"""CLIP-L's hidden width: the text features every stand-in DiT takes."""
STAND_IN_VERSION = 1
"""Bumped when a stand-in changes, so that a cache written by an older version is not reused."""


@dataclass(frozen=True)
class DiTStandIn:
    file_name: str
    config_class: str
    """The ``comfy.supported_models`` class of the real model."""
    unet_config: dict
    """The whole tiny config, as ComfyUI builds the model from it."""
    hard_coded: tuple[str, ...]
    """The keys of ``unet_config`` that ComfyUI's detection does not read from the file: written to the metadata."""
    dtype: torch.dtype = torch.bfloat16


Z_IMAGE = DiTStandIn(
    "z_image_turbo_bf16.safetensors",
    "ZImage",
    {
        "image_model": "lumina2",
        "patch_size": 2,
        "in_channels": 16,
        "dim": 256,  # the narrowest Z-Image: its modulation takes a 256-wide time embedding
        "cap_feat_dim": TEXT_WIDTH,
        "n_layers": 2,
        "qk_norm": True,
        # Z-Image's values, with 2 of its 30 heads of 128.
        "n_heads": 2,
        "n_kv_heads": 2,
        "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512],
        "rope_theta": 256.0,
        "ffn_dim_multiplier": 8.0 / 3.0,
        "z_image_modulation": True,
        "time_scale": 1000.0,
        "pad_tokens_multiple": 32,
    },
    (
        "n_heads",
        "n_kv_heads",
        "axes_dims",
        "axes_lens",
        "rope_theta",
        "ffn_dim_multiplier",
        "z_image_modulation",
        "time_scale",
        "pad_tokens_multiple",
    ),
)
FLUX2 = DiTStandIn(
    "flux2_dev_fp8mixed.safetensors",
    "Flux2",
    {
        "image_model": "flux2",
        # Flux.2's 48 heads of 128 (RoPE 4 x 32) become 2 heads of 32 (4 x 8).
        "axes_dim": [8, 8, 8, 8],
        "num_heads": 2,
        "mlp_ratio": 3.0,
        "theta": 2000,
        "out_channels": 128,
        "global_modulation": True,
        "mlp_silu_act": True,
        "qkv_bias": False,
        "ops_bias": False,
        "default_ref_method": "index",
        "ref_index_scale": 10.0,
        "txt_ids_dims": [3],
        "patch_size": 1,
        "in_channels": 128,
        "hidden_size": 64,
        "context_in_dim": TEXT_WIDTH,
        "vec_in_dim": None,
        "depth": 1,
        "depth_single_blocks": 2,
        "guidance_embed": True,
        "yak_mlp": False,
        "txt_norm": False,
    },
    ("axes_dim", "num_heads"),
)
WAN22_5B = DiTStandIn(
    "wan2.2_ti2v_5B_fp16.safetensors",
    "WAN22_T2V",
    {
        "image_model": "wan2.1",
        "dim": 128,
        "out_dim": 48,
        "num_heads": 2,  # detection gives dim // 128 heads
        "ffn_dim": 256,
        "num_layers": 2,
        "patch_size": [1, 2, 2],
        "freq_dim": 256,
        "window_size": [-1, -1],
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": 1e-6,
        "in_dim": 48,
        "model_type": "t2v",
        "text_dim": TEXT_WIDTH,  # UMT5-XXL's 4096 in every real Wan; ComfyUI never reads it from the file
    },
    ("num_heads", "text_dim"),
    dtype=torch.float16,
)
DIT_STAND_INS = (Z_IMAGE, FLUX2, WAN22_5B)

TEXT_ENCODER_NAMES = (
    "qwen_3_4b.safetensors",
    "mistral_3_small_flux2_bf16.safetensors",
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
)
"""The text encoders the DiT workflows load: one random CLIP-L stands in for each."""
FLUX_VAE_NAME = "ae.safetensors"
FLUX2_VAE_NAME = "flux2-vae.safetensors"
WAN22_VAE_NAME = "wan2.2_vae.safetensors"
FLUX2_DDCONFIG = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
"""ComfyUI's fixed VAE widths (``comfy.sd.VAE``) with the Flux.2 VAE's 32 latent channels."""


@dataclass
class StandInFiles:
    """Model folder -> {file name the workflows use: stand-in file}."""

    folders: dict[str, dict[str, Path]] = field(default_factory=dict)

    def add(self, folder: str, name: str, path: Path) -> None:
        self.folders.setdefault(folder, {})[name] = path


def _random_state(module: torch.nn.Module, generator: torch.Generator, std: float, dtype: torch.dtype) -> dict:
    """Every floating tensor of ``module`` drawn from ``normal(0, std)``: no zero-initialised output layer hides
    what attention does."""
    state = module.state_dict()
    for name, tensor in state.items():
        if tensor.is_floating_point():
            state[name] = (torch.randn(tensor.shape, generator=generator) * std).to(dtype).contiguous()
    return state


def _save(state: dict, path: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(state, str(partial), metadata=metadata)
    partial.rename(path)
    return path


def build_dit(stand_in: DiTStandIn):
    """The tiny model as ComfyUI builds it from its config class (``comfy.model_base``), weights uninitialised."""
    import comfy.supported_models

    config = getattr(comfy.supported_models, stand_in.config_class)(json.loads(json.dumps(stand_in.unet_config)))
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({}, device=torch.device("cpu"))


def write_dit(stand_in: DiTStandIn, path: Path, seed: int) -> Path:
    if path.exists():
        return path
    model = build_dit(stand_in)
    state = _random_state(model.diffusion_model, torch.Generator().manual_seed(seed), 0.05, stand_in.dtype)
    metadata = {STAND_IN_KEY: stand_in_metadata(stand_in)}
    return _save(state, path, metadata)


def stand_in_metadata(stand_in: DiTStandIn) -> str:
    return json.dumps({
        "config_class": stand_in.config_class,
        "unet_config": {key: stand_in.unet_config[key] for key in stand_in.hard_coded},
    })  # fmt: skip


def detected_config_agrees(stand_in: DiTStandIn, path: Path) -> dict:
    """The keys where ComfyUI's detection (read from the written file) and the stand-in's config differ, other
    than those the metadata supplies: empty when detection reads all the rest from the tensor shapes."""
    import comfy.model_detection
    import comfy.utils

    state, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    detected = json.loads(json.dumps(comfy.model_detection.detect_unet_config(state, "", metadata=metadata)))
    expected = json.loads(json.dumps(stand_in.unet_config))
    keys = (set(detected) | set(expected)) - set(stand_in.hard_coded)
    return {key: (detected.get(key), expected.get(key)) for key in keys if detected.get(key) != expected.get(key)}


def write_clip_l(path: Path, seed: int) -> Path:
    """A random CLIP-L text encoder in the layout of ComfyUI's ``clip_l.safetensors`` (``text_model.*``)."""
    import comfy.sd1_clip

    if path.exists():
        return path
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float16)
    state = _random_state(clip, torch.Generator().manual_seed(seed), 0.02, torch.float16)
    prefix = "clip_l.transformer."
    state = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    return _save(state, path)


def write_flux2_vae(path: Path, seed: int) -> Path:
    """Flux.2's VAE: 32 latent channels, quant convolutions, and a batch norm over the 2x2-patched latent (128
    channels at 16x), at ComfyUI's fixed widths."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    if path.exists():
        return path
    vae = AutoencoderKL(ddconfig={**FLUX2_DDCONFIG, "batch_norm_latent": True}, embed_dim=32)
    state = _random_state(vae, torch.Generator().manual_seed(seed), 0.02, torch.float16)
    state["bn.running_mean"] = torch.zeros_like(state["bn.running_mean"])  # the latent statistics: identity
    state["bn.running_var"] = torch.ones_like(state["bn.running_var"])
    return _save(state, path)


def write_flux_tiny_vae(path: Path, seed: int) -> Path:
    """A random TAESD for Flux.1's latent (16 channels, 8x), in the layout ComfyUI loads as a VAE."""
    import comfy.taesd.taesd

    if path.exists():
        return path
    vae = comfy.taesd.taesd.TAESD(latent_channels=16)
    state = _random_state(vae, torch.Generator().manual_seed(seed), 0.05, torch.float32)
    state["vae_scale"], state["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
    return _save(state, path)


def write_wan22_tiny_vae(path: Path, seed: int) -> Path:
    """A random TAEHV for Wan 2.2's latent (48 channels, 16x, 4 frames per latent frame)."""
    import comfy.taesd.taehv

    if path.exists():
        return path
    vae = comfy.taesd.taehv.TAEHV(latent_channels=48, latent_format=None)
    return _save(_random_state(vae, torch.Generator().manual_seed(seed), 0.05, torch.float32), path)


def write_stand_ins(folder: Path) -> StandInFiles:
    """Every stand-in the DiT workflows need, written once into ``folder``."""
    folder = folder / f"dit-stand-ins-v{STAND_IN_VERSION}"
    files = StandInFiles()
    for seed, stand_in in enumerate(DIT_STAND_INS):
        files.add("diffusion_models", stand_in.file_name, write_dit(stand_in, folder / stand_in.file_name, seed))
    clip = write_clip_l(folder / "clip_l-random.safetensors", seed=10)
    for name in TEXT_ENCODER_NAMES:
        files.add("text_encoders", name, clip)
    files.add("vae", FLUX_VAE_NAME, write_flux_tiny_vae(folder / "taef1-random.safetensors", seed=11))
    files.add("vae", FLUX2_VAE_NAME, write_flux2_vae(folder / FLUX2_VAE_NAME, seed=12))
    files.add("vae", WAN22_VAE_NAME, write_wan22_tiny_vae(folder / "taew2_2-random.safetensors", seed=13))
    return files
