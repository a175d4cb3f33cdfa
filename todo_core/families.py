"""Diffusion-transformer families as data, and the one resolver that places the image grid in their sequences.

Every DiT ComfyUI runs attends over one sequence per call. Where its image
tokens sit in that sequence is a property of the family, written down here as
data: the model classes it covers, its patch size, whether the image comes
after the text or first, how many register tokens precede the text, the
multiple both runs are padded to, the model-call inputs whose reference
latents sit just before the image, the modules whose attention is never image
self-attention, and the size the family was trained at. Adding a family is one
:class:`DiTFamily` entry; :func:`resolve_layout` serves them all.

Nothing here imports ComfyUI: class paths are plain strings, and the node layer
hands over shapes and the model call's keyword inputs.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


class ImagePosition(enum.Enum):
    """Where a family's joint attention puts the image grid."""

    AFTER_TEXT = "after text"
    """``[registers + text (padded)] [references] [grid] [padding, references, ...]`` (Flux, SD3, Z-Image, AuraFlow)."""
    FIRST = "first"
    """``[references] [grid] [text, ...]`` (HiDream, HunyuanVideo, Mochi) or the grid alone (Wan, LTX, Cosmos)."""


@dataclass(frozen=True, slots=True)
class NativeSizeVariant:
    """A member of a family told apart by a value of its model config (or its latent format's class name).

    ``config_key`` ``"latent_format"`` matches the class name of the model's
    latent format: the one diffusion class HunyuanVideo serves video, image
    and 2K image models that only their VAEs tell apart.
    """

    config_key: str
    value: Any
    native_size: tuple[int, int]
    video: bool | None = None
    """Overrides the family's ``video`` (HunyuanImage 2.1 is the video class run on images)."""
    label: str | None = None
    """The member's name for messages and the README (``"Wan 2.2 TI2V 5B"``)."""


LATENT_FORMAT_KEY = "latent_format"


@dataclass(frozen=True, slots=True)
class DiTFamily:
    """What ToDo needs to know of a DiT family to find its image tokens and its native token count."""

    name: str
    patch_size: tuple[int, int, int]
    """Latent cells per token along (frames, height, width); the node takes the model's own where it reports one."""
    native_size: tuple[int, int]
    """Training resolution in pixels (width, height): auto mode keeps the image keys of one such frame."""
    video: bool = False
    """The latent has frames: ``temporal_factor`` applies."""
    variants: tuple[NativeSizeVariant, ...] = ()
    """Members trained at another size (Wan 14B at 1280x720, Wan 2.2 5B at 1280x704)."""
    latent_scale: int = 8
    """Pixels per latent cell (the VAE's downscale); the node sets it from the model's latent format."""
    block_lists: tuple[tuple[str, str], ...] = ()
    """(block type as the model reports it, attribute of the diffusion model holding those blocks); empty when the
    model reports no block indices (SD3)."""
    class_paths: tuple[str, ...] = ()
    """Diffusion-model classes (module.qualname) of the family; a subclass of one is the family too."""
    label: str = ""
    """The family's name for people."""
    image_position: ImagePosition = ImagePosition.AFTER_TEXT
    image_only: bool = False
    """Self-attention never holds text (Wan, LTX, Kandinsky 5, Cosmos): a call holds whole frames of the grid,
    their count read from its length, then whatever the model appends (Wan S2V's reference and motion tokens)."""
    text_registers: int = 0
    """Learned tokens before the text (AuraFlow's 8 registers)."""
    token_multiple_key: str | None = None
    """Model-config entry giving the multiple the text run and the image run are each padded to (Z-Image: 32)."""
    token_multiple: int = 1
    """That multiple, as one model of the family is built."""
    references_before: str | None = None
    """Model-call input holding reference latents whose tokens sit right before the grid (OmniGen2, HunyuanVideo)."""
    width_concat: str | None = None
    """Model-call input the model concatenates to the latent along its width before patchifying (HiDream E1)."""
    not_image_attention: tuple[str, ...] = ()
    """Module-name patterns (``fnmatch``, against the full name or its last part) whose attention is never image
    self-attention although its shapes may look so: Wan's cross-attention when the text is as long as the video,
    LTX-2's audio streams, text refiners as long as the image. The node flags the calls of the outermost matching
    modules whose ``forward`` takes ``transformer_options``."""

    def for_model(
        self,
        model_config: Mapping[str, Any],
        patch_size: tuple[int, int, int] | None,
        latent_scale: int,
        latent_format: str = "",
    ) -> DiTFamily:
        """This family as one model of it is built: patch size, latent scale, padding multiple and native size."""
        keyed = {**model_config, LATENT_FORMAT_KEY: latent_format}
        variant = next((v for v in self.variants if keyed.get(v.config_key) == v.value), None)
        multiple = model_config.get(self.token_multiple_key) if self.token_multiple_key else None
        return dataclasses.replace(
            self,
            patch_size=patch_size or self.patch_size,
            latent_scale=latent_scale,
            native_size=variant.native_size if variant else self.native_size,
            video=self.video if variant is None or variant.video is None else variant.video,
            token_multiple=int(multiple) if multiple else 1,
            label=variant.label if variant and variant.label else self.label,
        )

    @property
    def pixels_per_token(self) -> tuple[int, int]:
        """Image pixels (height, width) one token covers: the VAE's downscale times the patch size."""
        return self.latent_scale * self.patch_size[1], self.latent_scale * self.patch_size[2]

    @property
    def native_tokens(self) -> int:
        """Image tokens of one frame at the native size: auto mode's key budget."""
        (pixels_h, pixels_w), (width, height) = self.pixels_per_token, self.native_size
        return -(-height // pixels_h) * -(-width // pixels_w)

    def flags(self, module_name: str) -> bool:
        """Whether the node flags this module's attention calls as never image self-attention."""
        last = module_name.rsplit(".", 1)[-1]
        return any(
            fnmatch.fnmatchcase(module_name, p) or fnmatch.fnmatchcase(last, p) for p in self.not_image_attention
        )

    def latent_info(self, latent_shape: Sequence[int], text_length: int, inputs: Mapping[str, Any]) -> LatentInfo:
        """What one model call tells about its sequences: latent size, text prefix and reference tokens.

        ``latent_shape`` is the noisy latent's (``[B, C, H, W]`` or ``[B, C, T, H, W]``), ``text_length`` the
        length of ``c_crossattn``, ``inputs`` the call's other keyword inputs (reference latents, concatenated
        images). The text prefix counts the registers before the text and the padding after it.
        """
        frames = latent_shape[2] if len(latent_shape) == 5 else 1
        height, width = latent_shape[-2], latent_shape[-1]
        if self.width_concat is not None:
            concat = inputs.get(self.width_concat)
            if isinstance(concat, torch.Tensor) and concat.ndim >= 2:
                width += concat.shape[-1]
        text = self.text_registers + round_up(text_length, self.token_multiple) if text_length else 0
        before = 0
        if self.references_before is not None:
            before = sum(
                latent_tokens(r.shape, self.patch_size) for r in tensors_in(inputs.get(self.references_before))
            )
        return LatentInfo(frames, height, width, text, before)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors of a model-call input that is a tensor, a list of them, or absent."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def latent_tokens(shape: Sequence[int], patch_size: tuple[int, int, int]) -> int:
    """Tokens of a ``[B, C, H, W]`` or ``[B, C, T, H, W]`` latent padded to whole patches."""
    pt, ph, pw = patch_size
    frames = -(-shape[2] // pt) if len(shape) == 5 else 1
    return frames * -(-shape[-2] // ph) * -(-shape[-1] // pw)


@dataclass(frozen=True, slots=True)
class LatentInfo:
    """Per model call: the latent ``(frames, height, width)``, the text prefix and the reference tokens before it."""

    frames: int
    height: int
    width: int
    text_tokens: int
    """Tokens before the grid in joint attention when the image comes after the text (registers and padding
    included); the length of a text-only call."""
    before: int = 0
    """Reference tokens right before the grid."""


@dataclass(frozen=True, slots=True)
class SequenceLayout:
    """Where the image grid sits in an attention sequence: ``prefix | frames x height x width | suffix``."""

    prefix: int
    frames: int
    height: int
    width: int
    suffix: int

    @property
    def image_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def tokens(self) -> int:
        return self.prefix + self.image_tokens + self.suffix


def token_grid(latent: LatentInfo, patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid of a latent: every DiT pads the latent to whole patches before patchifying."""
    pt, ph, pw = patch_size
    return -(-latent.frames // pt), -(-latent.height // ph), -(-latent.width // pw)


def holds_no_image(n_tokens: int, latent: LatentInfo, family: DiTFamily) -> bool:
    """A call exactly as long as the text prefix or the references, and not a frame: a text or reference refiner.

    Such calls (Z-Image's and HunyuanVideo's text refiners, OmniGen2's
    reference refiner, Kandinsky 5's text encoder) pass through silently; any
    other call the resolver cannot place is worth a warning.
    """
    _, height, width = token_grid(latent, family.patch_size)
    return n_tokens != height * width and n_tokens in (latent.text_tokens, latent.before)


def resolve_layout(n_tokens: int, latent: LatentInfo, family: DiTFamily) -> SequenceLayout | None:
    """Place the image grid in a sequence of ``n_tokens`` keys, or ``None`` when it does not fit.

    Image-only self-attention (Wan, LTX, Cosmos) holds whole frames of the
    grid, as many as fit, then anything the model appends; an image-only call
    of a joint family (SD3.5's extra self-attention, Z-Image's noise refiner)
    holds the grid and its padding; joint attention holds the grid after the
    text prefix or first, per the family, with reference tokens before it
    where the family puts them there, and keeps everything around it whole.
    """
    frames, height, width = token_grid(latent, family.patch_size)
    per_frame = height * width
    if per_frame == 0 or n_tokens < per_frame:
        return None
    if family.image_only:
        body = n_tokens - latent.before
        whole = body // per_frame if body % per_frame == 0 else min(body // per_frame, frames)
        if whole < 1:
            return None
        return SequenceLayout(latent.before, whole, height, width, body - whole * per_frame)
    image = frames * per_frame
    padding = round_up(image, family.token_multiple) - image
    if n_tokens == image + padding:
        return SequenceLayout(0, frames, height, width, padding)
    prefix = latent.before + (latent.text_tokens if family.image_position is ImagePosition.AFTER_TEXT else 0)
    suffix = n_tokens - prefix - image
    if suffix < 0:
        return None
    return SequenceLayout(prefix, frames, height, width, suffix)


def _flux_blocks() -> tuple[tuple[str, str], ...]:
    return ("double", "double_blocks"), ("single", "single_blocks")


DIT_FAMILIES: dict[str, DiTFamily] = {
    family.name: family
    for family in (
        DiTFamily(  # Flux.1 (latent 8x, patch 2) and Flux.2 (latent 16x, patch 1): 16 px per token both
            "flux",
            (1, 2, 2),
            (1024, 1024),
            label="Flux.1 / Flux.2",
            class_paths=("comfy.ldm.flux.model.Flux",),
            block_lists=_flux_blocks(),
            variants=(NativeSizeVariant(LATENT_FORMAT_KEY, "Flux2", (1024, 1024), label="Flux.2"),),
        ),
        DiTFamily(  # Chroma and Chroma Radiance (pixel space, patch 16): Flux's blocks, text first
            "chroma",
            (1, 2, 2),
            (1024, 1024),
            label="Chroma / Chroma Radiance",
            class_paths=("comfy.ldm.chroma.model.Chroma",),
            block_lists=_flux_blocks(),
        ),
        DiTFamily(
            "sd3",
            (1, 2, 2),
            (1024, 1024),
            label="SD3 / SD3.5",
            class_paths=("comfy.ldm.modules.diffusionmodules.mmdit.MMDiT",),
        ),
        DiTFamily(  # 8 register tokens before the text
            "auraflow",
            (1, 2, 2),
            (1024, 1024),
            label="AuraFlow",
            class_paths=("comfy.ldm.aura.mmdit.MMDiT",),
            text_registers=8,
        ),
        DiTFamily(
            "qwen_image",
            (1, 2, 2),
            (1328, 1328),
            label="Qwen-Image",
            class_paths=("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",),
            block_lists=(("double", "transformer_blocks"),),
        ),
        DiTFamily(  # NextDiT: text-only and image-only refiner calls, then joint layers; Z-Image pads both runs to 32
            "lumina2",
            (1, 2, 2),
            (1024, 1024),
            label="Lumina 2 / Z-Image",
            class_paths=("comfy.ldm.lumina.model.NextDiT",),
            block_lists=(("double", "layers"),),
            token_multiple_key="pad_tokens_multiple",
            not_image_attention=("context_refiner.*",),
            variants=(NativeSizeVariant("pad_tokens_multiple", 32, (1024, 1024), label="Z-Image"),),
        ),
        DiTFamily(  # image first; the E1 editing model puts the source image beside the target, along the width
            "hidream",
            (1, 2, 2),
            (1024, 1024),
            label="HiDream",
            class_paths=("comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",),
            image_position=ImagePosition.FIRST,
            width_concat="image_cond",
        ),
        DiTFamily(  # text, reference images, then the target image last
            "omnigen2",
            (1, 2, 2),
            (1024, 1024),
            label="OmniGen2",
            class_paths=("comfy.ldm.omnigen.omnigen2.OmniGen2Transformer2DModel",),
            references_before="ref_latents",
            not_image_attention=("context_refiner.*", "ref_image_refiner.*"),
        ),
        DiTFamily(  # image first, text after (byT5 glyph and vision tokens included); a reference latent before it
            "hunyuan_video",
            (1, 2, 2),
            (1280, 720),
            video=True,
            label="HunyuanVideo 1.0 / 1.5, HunyuanImage 2.1",
            class_paths=("comfy.ldm.hunyuan_video.model.HunyuanVideo",),
            image_position=ImagePosition.FIRST,
            references_before="ref_latent",
            block_lists=_flux_blocks(),
            not_image_attention=("txt_in",),
            variants=(
                NativeSizeVariant(
                    LATENT_FORMAT_KEY, "HunyuanImage21", (2048, 2048), video=False, label="HunyuanImage 2.1"
                ),
                NativeSizeVariant(
                    LATENT_FORMAT_KEY, "HunyuanImage21Refiner", (2048, 2048), label="HunyuanImage 2.1 refiner"
                ),
                NativeSizeVariant(LATENT_FORMAT_KEY, "HunyuanVideo15", (1280, 720), label="HunyuanVideo 1.5"),
            ),
        ),
        DiTFamily(  # image first, then the text tokens T5's mask keeps
            "mochi",
            (1, 2, 2),
            (848, 480),
            video=True,
            label="Mochi",
            class_paths=("comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint",),
            image_position=ImagePosition.FIRST,
        ),
        DiTFamily(
            "wan",
            (1, 2, 2),
            (832, 480),  # Wan 2.1 1.3B
            video=True,
            label="Wan 2.1 / 2.2",
            class_paths=("comfy.ldm.wan.model.WanModel",),
            image_position=ImagePosition.FIRST,
            image_only=True,
            block_lists=(("double", "blocks"),),
            not_image_attention=("cross_attn",),
            variants=(
                NativeSizeVariant("out_dim", 48, (1280, 704), label="Wan 2.2 TI2V 5B"),  # 48-channel latent, 16x VAE
                NativeSizeVariant("dim", 5120, (1280, 720), label="Wan 14B"),  # Wan 2.1 14B, Wan 2.2 A14B
            ),
        ),
        DiTFamily(  # LTX-Video and LTX-2: video self-attention alone; text, audio and audio-video attention flagged
            "ltxv",
            (1, 1, 1),
            (768, 512),
            video=True,
            label="LTX-Video / LTX-2",
            class_paths=("comfy.ldm.lightricks.model.LTXVModel",),
            image_position=ImagePosition.FIRST,
            image_only=True,
            not_image_attention=("attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn"),
            variants=(NativeSizeVariant(LATENT_FORMAT_KEY, "LTXAV", (1280, 720), label="LTX-2"),),
        ),
        DiTFamily(  # visual self-attention alone; the text encoder's and the cross-attention's calls flagged
            "kandinsky5",
            (1, 2, 2),
            (768, 512),
            video=True,
            label="Kandinsky 5",
            class_paths=("comfy.ldm.kandinsky5.model.Kandinsky5",),
            image_position=ImagePosition.FIRST,
            image_only=True,
            block_lists=(("double", "visual_transformer_blocks"),),
            not_image_attention=("cross_attention", "text_transformer_blocks.*"),
            variants=(
                NativeSizeVariant(LATENT_FORMAT_KEY, "Flux", (1024, 1024), video=False, label="Kandinsky 5 Image"),
            ),
        ),
        DiTFamily(
            "cosmos",
            (1, 2, 2),
            (1280, 704),
            video=True,
            label="Cosmos 1.0",
            class_paths=("comfy.ldm.cosmos.model.GeneralDIT",),
            image_position=ImagePosition.FIRST,
            image_only=True,
        ),
        DiTFamily(  # one class for the text-to-image model (1024 px) and the image-to-video one (17 channels, 720p)
            "cosmos_predict2",
            (1, 2, 2),
            (1024, 1024),
            video=True,
            label="Cosmos Predict2",
            class_paths=("comfy.ldm.cosmos.predict2.MiniTrainDIT",),
            image_position=ImagePosition.FIRST,
            image_only=True,
            not_image_attention=("cross_attn",),
            variants=(NativeSizeVariant("in_channels", 17, (1280, 704), label="Cosmos Predict2 video"),),
        ),
    )
}
"""Supported families: how each lays out its sequences and the size it was trained at."""

STEPS_ASIDE: dict[str, tuple[str, str]] = {
    "comfy.ldm.pixart.pixartms.PixArtMS": (
        "PixArt alpha / sigma",
        "its attention does not pass transformer_options, so ComfyUI's attention override never reaches it "
        "(PixArt-Sigma has its own key/value compression)",
    ),
    "comfy.ldm.hydit.models.HunYuanDiT": (
        "HunyuanDiT",
        "its attention does not pass transformer_options, so ComfyUI's attention override never reaches it",
    ),
    "comfy.ldm.cascade.stage_c.StageC": (
        "Stable Cascade stage C",
        "its attention reaches ComfyUI's override, but its prior works on a 24x24 latent at 1024 px (about 2,300 "
        "tokens at 2048 px), too few for ToDo to save time",
    ),
    "comfy.ldm.cascade.stage_b.StageB": (
        "Stable Cascade stage B",
        "its attention runs at several feature-map sizes of a UNet-like model with no record of which one a call is at",
    ),
}
"""Diffusion models ToDo does not act on, and why: the node says so once, and the README lists them."""

LATENT_SCALES: dict[str, int] = {
    "Flux2": 16,
    "Wan22": 16,
    "HunyuanVideo15": 16,
    "HunyuanImage21": 32,
    "HunyuanImage21Refiner": 16,
    "LTXV": 32,
    "LTXAV": 32,
    "ChromaRadiance": 1,
}
"""Pixels per latent cell of the latent formats (by ComfyUI class name) whose VAE is not the usual 8x."""
DEFAULT_LATENT_SCALE = 8


def find_family(class_paths: Iterable[str]) -> DiTFamily | None:
    """The family of a diffusion model, from the class paths of its type's MRO (most derived first)."""
    for path in class_paths:
        for family in DIT_FAMILIES.values():
            if path in family.class_paths:
                return family
    return None


def steps_aside(class_paths: Iterable[str]) -> tuple[str, str] | None:
    """(name, reason) of a diffusion model ToDo knows it cannot act on, from its class paths."""
    return next((STEPS_ASIDE[path] for path in class_paths if path in STEPS_ASIDE), None)


def patch_triple(patch: Any) -> tuple[int, int, int] | None:
    """A model's ``patch_size`` attribute as (frames, height, width): an int, or a 2- or 3-sequence."""
    if isinstance(patch, int) and patch > 0:
        return 1, patch, patch
    if isinstance(patch, (tuple, list)) and len(patch) in (2, 3) and all(isinstance(p, int) for p in patch):
        return (1, *patch) if len(patch) == 2 else tuple(patch)
    return None


__all__ = [
    "DEFAULT_LATENT_SCALE",
    "DIT_FAMILIES",
    "LATENT_SCALES",
    "STEPS_ASIDE",
    "DiTFamily",
    "ImagePosition",
    "LatentInfo",
    "NativeSizeVariant",
    "SequenceLayout",
    "find_family",
    "holds_no_image",
    "latent_tokens",
    "patch_triple",
    "resolve_layout",
    "steps_aside",
    "token_grid",
]
