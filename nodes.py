"""ComfyUI node layer: node inputs -> validated ToDoConfig -> attn1 patch on a cloned model.

Thin on purpose: every decision about grids, factors and downsampling lives in
``todo_core``, which does not import ComfyUI.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import weakref

from comfy.patcher_extension import WrappersMP
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .todo_core import (
    ConfigError,
    DownsampleMethod,
    FactorMode,
    ToDoAttn1Patch,
    ToDoConfig,
    native_resolution_for,
)
from .todo_core.calibrate import CALIBRATION_KEY, CalibrationStore, CallCalibration, NoiseBands
from .todo_core.config import (
    DEFAULT_MANUAL_FACTORS,
    DEFAULT_MAX_ERROR,
    DEFAULT_NATIVE_RESOLUTION,
    MAX_FACTOR,
    MAX_MAX_ERROR,
    MAX_NATIVE_RESOLUTION,
    MIN_FACTOR,
    MIN_MAX_ERROR,
)
from .todo_core.dit import (
    HOLDS_TODO_ATTRIBUTE,
    LATENT_INFO_KEY,
    BlockSelection,
    CrossAttentionFlag,
    ToDoAttentionOverride,
)
from .todo_core.families import (
    DEFAULT_LATENT_SCALE,
    DIT_FAMILIES,
    LATENT_SCALES,
    DiTFamily,
    LatentInfo,
    find_family,
    patch_triple,
    steps_aside,
)
from .todo_core.patch import IN_WINDOW_KEY, ModelCall, SigmaWindow, prepare_unet_options, published, warn_once
from .todo_core.unet_override import ToDoUNetAttention

logger = logging.getLogger("comfyui_todo")

DETECT_NATIVE_RESOLUTION = 0
WRAPPER_KEY = "comfyui_todo"
TRANSFORMER_OPTIONS_ARG = 5
"""Position of ``transformer_options`` in the apply-model wrapper call."""
LATENT_ARG, SIGMA_ARG, CROSSATTN_ARG = 0, 1, 3
"""Positions of the latent, its sigmas and the text context in the apply-model wrapper call."""
OVERRIDE_KEY = "optimized_attention_override"
TODO_OVERRIDES = (ToDoAttentionOverride, ToDoUNetAttention)
COMPILE_WRAPPER_KEY = "torch.compile"
"""Key of the apply-model wrapper ComfyUI's ``TorchCompileModel`` (``set_torch_compile_wrapper``) adds."""
POST_INPUT = "post_input"
"""Flux's patches after its input embeddings: they may add text tokens (USOStyleReference's style tokens)."""
LATENT_SHAPES_ARG = "latent_shapes"
"""Model-call input of models whose sampler packs several latents into one (LTX-2: video, then audio)."""
SUPPORTED = "SD1.x, SD2.x and SDXL UNets and " + ", ".join(f.label for f in DIT_FAMILIES.values())


def class_paths(obj) -> list[str]:
    """``module.qualname`` of an object's type and of each of its bases, most derived first."""
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in type(obj).__mro__]


def dit_family(model, native_resolution: int = DETECT_NATIVE_RESOLUTION) -> DiTFamily | None:
    """The supported DiT family of a ComfyUI model, as this model is built.

    Its patch size is the diffusion model's own, its pixels per latent cell
    come from its latent format (Flux.2's and Wan 2.2 5B's VAEs downscale 16x,
    LTX's 32x, Chroma Radiance works on pixels), its native size and padding
    from its config (Wan 14B trains at 1280x720, 1.3B at 832x480; Z-Image pads
    its runs to 32 tokens), unless the node's ``native_resolution`` names a
    square size.
    """
    diffusion_model = model.get_model_object("diffusion_model")
    family = find_family(class_paths(diffusion_model))
    if family is None:
        return None
    latent_format = type(model.get_model_object("latent_format")).__name__
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    family = family.for_model(
        unet_config,
        patch_triple(getattr(diffusion_model, "patch_size", None)),
        LATENT_SCALES.get(latent_format, DEFAULT_LATENT_SCALE),
        latent_format,
    )
    if native_resolution != DETECT_NATIVE_RESOLUTION:
        family = dataclasses.replace(family, native_size=(native_resolution, native_resolution))
    return family


def detect_native_resolution(model) -> int:
    """Training resolution in pixels of a ComfyUI UNet model, from its config."""
    base = model.model
    unet_config = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
    model_type = getattr(base, "model_type", None)
    v_prediction = getattr(model_type, "name", "").startswith("V_PREDICTION")
    return native_resolution_for(unet_config.get("context_dim"), unet_config.get("adm_in_channels"), v_prediction)


def count_self_attention_layers(model) -> int:
    """attn1 patches only run inside the UNet's BasicTransformerBlocks that do self-attention."""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    diffusion_model = model.get_model_object("diffusion_model")
    return sum(
        1
        for module in diffusion_model.modules()
        if isinstance(module, BasicTransformerBlock) and not module.disable_self_attn
    )


def _factor_input(depth: int, default: float) -> io.Float.Input:
    return io.Float.Input(
        f"depth_{depth}_factor",
        default=default,
        min=MIN_FACTOR,
        max=MAX_FACTOR,
        step=0.25,
        tooltip=(
            f"Manual mode: key/value downsample factor per side at UNet depth {depth} "
            f"(1/{2 ** (depth - 1)} of the latent resolution). 1 = off, 2 = a quarter of the keys. "
            "Ignored in auto mode."
        ),
    )


def _percent_input(name: str, default: float, where: str) -> io.Float.Input:
    return io.Float.Input(
        name, default=default, min=0.0, max=1.0, step=0.001, tooltip=f"{where} where downsampling applies."
    )


class ToDoModelPatch(io.ComfyNode):
    """Token downsampling: every query token kept, self-attention keys/values spatially downsampled."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ToDoModelPatch",
            display_name="ToDo: Token Downsampling",
            category="model_patches/unet",
            description=(
                "Speeds up high-resolution generation with SD1.x, SD2.x and SDXL UNets by downsampling the keys "
                "and values of self-attention (ToDo, arXiv 2402.13573). Queries keep full resolution, so the "
                "image keeps its detail. Any size or aspect ratio; chains with other attention patches. On "
                "diffusion transformers (Flux.1 and Flux.2, Z-Image, Qwen-Image, Chroma, SD3, HiDream, Wan, LTX, "
                "HunyuanVideo and more) it reduces the image keys of joint attention, with a mass correction "
                "that keeps the text's share of attention where it was."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch. It is cloned, never changed."),
                io.Combo.Input(
                    "mode",
                    options=[m.value for m in FactorMode],
                    default=FactorMode.AUTO.value,
                    tooltip=(
                        "auto: at each depth, keep at most as many keys as the model saw at its native resolution "
                        "(no-op at native size, factor 2 at twice the side, 4 at four times; adapts to every "
                        "hires-fix pass). manual: use the depth factors below. fidelity: ToDo measures, on your model "
                        "during the render, the attention error of each layer for several factors and keeps the "
                        "largest whose error is within max_error (per layer, size and noise level; reported in the "
                        "console once per render)."
                    ),
                ),
                *(_factor_input(depth, default) for depth, default in enumerate(DEFAULT_MANUAL_FACTORS, start=1)),
                io.Combo.Input(
                    "method",
                    options=[m.value for m in DownsampleMethod],
                    default=DownsampleMethod.NEAREST.value,
                    tooltip="How keys/values are reduced. nearest keeps real tokens and is the most faithful.",
                ),
                _percent_input("start_percent", 0.0, "Start of the sampling schedule (0 = first step)"),
                _percent_input("end_percent", 1.0, "End of the sampling schedule (1 = last step)"),
                io.Int.Input(
                    "native_resolution",
                    default=DETECT_NATIVE_RESOLUTION,
                    min=DETECT_NATIVE_RESOLUTION,
                    max=MAX_NATIVE_RESOLUTION,
                    step=8,
                    tooltip=(
                        "Auto mode: the model's training resolution in pixels (a square side). 0 = detect from "
                        "the model: 512 for SD1.x, 768 for SD2.x-v, 1024 for SDXL, Flux, Z-Image, Chroma, SD3 and "
                        "most image DiTs, 1328 for Qwen-Image, 2048 for HunyuanImage 2.1, the trained size of each "
                        "video model (832x480 for Wan 2.1 1.3B, 1280x720 for Wan 14B and HunyuanVideo, 1280x704 "
                        "for Wan 2.2 5B, 768x512 for LTX-Video; the README lists them all). Set 512 for SD-Turbo "
                        "and SDXL-Turbo."
                    ),
                ),
                io.String.Input(
                    "dit_blocks",
                    default="all",
                    optional=True,  # added after the first release: API prompts saved before it stay valid
                    tooltip=(
                        "Diffusion transformers only: the blocks ToDo acts in. 'all', or a comma-separated list of "
                        "'double', 'single', an index or range ('0-9'), or both ('single:0-19'). Flux, Chroma and "
                        "HunyuanVideo have double and single blocks; Qwen-Image, Z-Image, Wan and Kandinsky 5 "
                        "number theirs as double; the others report no blocks (ToDo then acts in all). Ignored "
                        "for UNets."
                    ),
                ),
                io.Float.Input(
                    "temporal_factor",
                    default=1.0,
                    optional=True,
                    min=MIN_FACTOR,
                    max=MAX_FACTOR,
                    step=0.25,
                    tooltip=(
                        "Video DiTs only (Wan, HunyuanVideo, LTX, Kandinsky 5, Cosmos, Mochi): key/value downsample "
                        "factor along time, on top of the spatial one. "
                        "1 = every frame's keys kept (default: motion depends on them)."
                    ),
                ),
                io.Float.Input(
                    "max_error",
                    default=DEFAULT_MAX_ERROR,
                    optional=True,
                    min=MIN_MAX_ERROR,
                    max=MAX_MAX_ERROR,
                    step=0.005,
                    tooltip=(
                        "Fidelity mode: the relative error each layer's attention output may have against exact "
                        "attention, measured on a sample of query rows (0.03 = 3 %). A measure of attention, not "
                        "of image quality: errors of many layers add up. Ignored in auto and manual modes."
                    ),
                ),
                io.Boolean.Input(
                    "report_error",
                    default=False,
                    optional=True,
                    tooltip=(
                        "Auto and manual modes: measure the attention error the factors cause and log it once per "
                        "render (costs a little time; off = nothing measured). Fidelity mode always reports."
                    ),
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with token downsampling in its self-attention.")],
        )

    @classmethod
    def validate_inputs(cls, input_types: dict | None = None, **inputs) -> bool | str:
        """Reject out-of-range values before the graph runs, naming the input.

        Linked inputs have no value yet at validation time (``None``); ComfyUI
        names them in ``input_types``, so a ``null`` sent for an unlinked input
        is told apart and refused.
        """
        if input_types is not None:
            nulls = [name for name, value in inputs.items() if value is None and name not in input_types]
            if nulls:
                return f"{nulls[0]} needs a value; got null"
        known = {name: value for name, value in inputs.items() if name != "model" and value is not None}
        try:
            BlockSelection.parse(known.pop("dit_blocks", "all"))
            cls.build_config(model=None, **known)
        except ConfigError as error:
            return str(error)
        return True

    @classmethod
    def build_config(
        cls, model, native_resolution: int = DETECT_NATIVE_RESOLUTION, family: DiTFamily | None = None, **inputs
    ) -> ToDoConfig:
        """Node inputs -> validated config; ``model`` only serves to detect the native resolution."""
        if native_resolution == DETECT_NATIVE_RESOLUTION:
            if family is not None:  # only the UNet budget reads it: a DiT's is its family's native token count
                native_resolution = max(family.native_size)
            elif model is not None:
                native_resolution = detect_native_resolution(model)
            else:
                native_resolution = DEFAULT_NATIVE_RESOLUTION
        return ToDoConfig.create(native_resolution=native_resolution, **inputs)

    @classmethod
    def execute(cls, model, dit_blocks: str = "all", **inputs) -> io.NodeOutput:
        blocks = BlockSelection.parse(dit_blocks)
        family = dit_family(model, inputs.get("native_resolution", DETECT_NATIVE_RESOLUTION))
        config = cls.build_config(model, family=family, **inputs)
        patched = model.clone()
        remove_todo(patched)  # the last ToDo node of a chain decides, as with any other setting
        if family is None and count_self_attention_layers(model) == 0:
            warn_unsupported(model)
            return io.NodeOutput(patched)
        if config.is_identity:
            return io.NodeOutput(patched)

        override = None
        if family is not None:
            override = ToDoAttentionOverride(config, family, blocks)
            add_dit_override(patched, override)
            settings = override.settings
            flag_not_image_attention(patched, family)
            warn_about_unknown_blocks(patched, family, blocks)
        elif config.measures:  # measuring needs the projected keys: the attention override, beside the patch
            attention = ToDoAttn1Patch(config)
            patched.set_model_attn1_patch(attention)
            override = ToDoUNetAttention(attention)
            add_dit_override(patched, override)
            settings = override.settings
            flag_unet_cross_attention(patched)
        else:
            attention = ToDoAttn1Patch(config)
            patched.set_model_attn1_patch(attention)
            settings = attention.settings
        store = None
        if config.measures:
            store = CalibrationStore(model_label(model, family), config.mode.value, measured_budget(config))
            patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, ToDoRender(store))
        patched.add_wrapper_with_key(
            WrappersMP.APPLY_MODEL,
            WRAPPER_KEY,
            ToDoModelCall(config.start_percent, config.end_percent, family, settings, override, store),
        )
        return io.NodeOutput(patched)


def model_label(model, family: DiTFamily | None) -> str:
    """The model as fidelity mode's report names it: its family, or its ComfyUI model configuration."""
    if family is not None:
        return family.label or family.name
    config = getattr(model.model, "model_config", None)
    return f"{type(config).__name__ if config is not None else type(model.model).__name__} UNet"


def measured_budget(config: ToDoConfig) -> float | None:
    """The error budget the report states: fidelity mode's; none when auto or manual factors are only measured."""
    return config.max_error if config.mode is FactorMode.FIDELITY else None


def remove_todo(patched) -> None:
    """Take the patches and wrappers of an earlier ToDo node off a fresh clone, leaving every other patch in place."""
    patched.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    patched.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    options = patched.model_options.setdefault("transformer_options", {})
    patches = options.get("patches") or {}
    chain = patches.get("attn1_patch") or []
    if any(isinstance(p, ToDoAttn1Patch) for p in chain):
        kept = [p for p in chain if not isinstance(p, ToDoAttn1Patch)]
        options["patches"] = {**patches, "attn1_patch": kept}
    existing = options.get(OVERRIDE_KEY)
    if isinstance(existing, TODO_OVERRIDES):
        if existing.inner is None:
            del options[OVERRIDE_KEY]
        else:
            options[OVERRIDE_KEY] = existing.inner


def add_dit_override(patched, override: ToDoAttentionOverride | ToDoUNetAttention) -> None:
    """Register ToDo's attention override on a cloned model, keeping another pack's override inside it.

    An earlier ToDo override has already been taken off by :func:`remove_todo`.
    """
    options = patched.model_options.setdefault("transformer_options", {})
    options[OVERRIDE_KEY] = override.with_inner(options.get(OVERRIDE_KEY))


def warn_unsupported(model) -> None:
    """One warning when the node meets a model it leaves unchanged, saying why where the reason is known."""
    diffusion_model = model.get_model_object("diffusion_model")
    known = steps_aside(class_paths(diffusion_model))
    if known is not None:
        name, reason = known
        logger.warning("ToDo: %s is left unchanged: %s.", name, reason)
        return
    logger.warning(
        "ToDo: %s (%s) is not a model family ToDo supports (%s); ToDoModelPatch leaves it unchanged.",
        type(model.model).__name__,
        type(diffusion_model).__name__,
        SUPPORTED,
    )


def flag_not_image_attention(patched, family: DiTFamily) -> None:
    """Object patches that flag the calls of the family's non-image attention modules (restored after sampling).

    Only the outermost matching modules that take ``transformer_options`` are
    patched: their flag reaches every attention call inside them.
    """
    if not family.not_image_attention:
        return
    flagged: list[str] = []
    for name, module in patched.get_model_object("diffusion_model").named_modules():
        if not name or not family.flags(name) or any(name.startswith(f"{outer}.") for outer in flagged):
            continue
        original = type(module).forward.__get__(module)  # the class's own, never an earlier flag
        if "transformer_options" not in inspect.signature(original).parameters:
            continue
        patched.add_object_patch(f"diffusion_model.{name}.forward", CrossAttentionFlag(original))
        flagged.append(name)


def flag_unet_cross_attention(patched) -> None:
    """Object patches that flag a UNet's cross-attention calls for :class:`ToDoUNetAttention` (restored after sampling).

    attn2 always attends to the text, and so does attn1 in blocks that disable self-attention.
    """
    from comfy.ldm.modules.attention import BasicTransformerBlock

    for name, module in patched.get_model_object("diffusion_model").named_modules():
        if not isinstance(module, BasicTransformerBlock):
            continue
        for attribute in ("attn1", "attn2") if module.disable_self_attn else ("attn2",):
            attention = getattr(module, attribute, None)
            if attention is not None:
                original = type(attention).forward.__get__(attention)
                patched.add_object_patch(f"diffusion_model.{name}.{attribute}.forward", CrossAttentionFlag(original))


def block_counts(model, family: DiTFamily) -> dict[str, int]:
    """Blocks per type as the model reports them in ``block_type`` / ``block_index``."""
    diffusion_model = model.get_model_object("diffusion_model")
    return {kind: len(getattr(diffusion_model, attribute, ())) for kind, attribute in family.block_lists}


def warn_about_unknown_blocks(model, family: DiTFamily, blocks: BlockSelection) -> None:
    """``dit_blocks`` items that select no block of this model would silently do nothing: say so, once."""
    if blocks.is_all or not family.block_lists:
        return  # a model without block indices is reported at sampling time
    counts = block_counts(model, family)
    unknown = blocks.names_nothing_in(counts)
    if unknown:
        have = ", ".join(f"{count} {kind} (0-{count - 1})" for kind, count in counts.items() if count)
        logger.warning(
            "ToDo: dit_blocks %s name%s no block of this %s model, which has %s blocks; %s.",
            ", ".join(repr(u) for u in unknown),
            "s" if len(unknown) == 1 else "",
            family.name,
            have,
            "ToDo acts in no block" if len(unknown) == len(blocks.texts) else "the other items still apply",
        )


def _transformer_options(args: tuple, kwargs: dict) -> dict:
    """A wrapper call's ``transformer_options`` (keyword or positional)."""
    if "transformer_options" in kwargs or len(args) <= TRANSFORMER_OPTIONS_ARG:
        return kwargs.get("transformer_options") or {}
    return args[TRANSFORMER_OPTIONS_ARG] or {}


def _with_transformer_options(args: tuple, kwargs: dict, transform) -> tuple[tuple, dict]:
    """A wrapper call's arguments with ``transformer_options`` (keyword or positional) replaced by ``transform(it)``."""
    if "transformer_options" in kwargs or len(args) <= TRANSFORMER_OPTIONS_ARG:
        return args, {**kwargs, "transformer_options": transform(kwargs.get("transformer_options", {}))}
    args = list(args)
    args[TRANSFORMER_OPTIONS_ARG] = transform(args[TRANSFORMER_OPTIONS_ARG])
    return tuple(args), kwargs


class ToDoModelCall:
    """Keyed apply-model wrapper: per model call, what ToDo's attention patches need and cannot see themselves.

    - The sigma window, from the schedule of the model sampling the sampler
      really uses (a shift node placed after ToDo changes it), so the window
      does not depend on the order of the nodes; the call's sigma is compared
      here, once, so that no attention call reads it.
    - DiTs: the latent grid, the text prefix and the reference tokens (from the family's table entry).
    - UNets: ToDo's attn1 patch last in the chain, blocks whose attn1 another patch replaces.
    - DiTs: ToDo's attention override back around one that a node applied after ToDo wrote over it (some
      SageAttention patch nodes write the slot without keeping what was there).
    - Fidelity mode and the error report: the render's calibration, the call's noise band and its branch.

    The same facts are published for code that torch.compile traces (:class:`ModelCall`).
    """

    def __init__(
        self,
        start_percent: float,
        end_percent: float,
        family: DiTFamily | None,
        settings: int | None = None,
        override: ToDoAttentionOverride | ToDoUNetAttention | None = None,
        store: CalibrationStore | None = None,
    ) -> None:
        self.start_percent = start_percent
        self.end_percent = end_percent
        self.family = family
        self.settings = settings
        self.override = override
        self.store = store
        self._window: tuple[weakref.ref, weakref.ref, SigmaWindow | None] | None = None
        """The window of the last render: weak references to its sigmas and model sampling, and the window."""
        self._bands: tuple[weakref.ref, weakref.ref, NoiseBands] | None = None
        """The noise bands of the last render, kept as the window is."""

    def __repr__(self) -> str:
        family = self.family.name if self.family else "unet"
        return f"ToDoModelCall({self.start_percent}, {self.end_percent}, {family})"

    def __call__(self, executor, *args, **kwargs):
        in_window = self.in_window(executor.class_obj.model_sampling, args, kwargs)
        latent = self.latent_info(args, kwargs) if self.family is not None else None

        recorded = {LATENT_INFO_KEY: latent} if latent is not None else {}
        compiled = self.store is not None and is_compiled(_transformer_options(args, kwargs))
        if not in_window:
            recorded[IN_WINDOW_KEY] = False
        elif self.store is not None and not compiled:
            recorded[CALIBRATION_KEY] = self.call_calibration(executor.class_obj.model_sampling, args, kwargs)

        def prepare(options: dict) -> dict:
            prepared = options if self.family is not None else prepare_unet_options(options)
            if compiled and self.family is None:
                prepared = self.without_unet_override(prepared)
            elif self.override is not None:
                prepared = self.keep_override(prepared)
            prepared = {**prepared, **recorded} if recorded else prepared
            return count_text_added_by_input_patches(prepared) if latent is not None else prepared

        args, kwargs = _with_transformer_options(args, kwargs, prepare)
        with published(ModelCall(in_window, latent, self.settings)):
            return executor(*args, **kwargs)

    def in_window(self, model_sampling, args: tuple, kwargs: dict) -> bool:
        """Whether this call's sigma lies in the window: one host sync per model call, none without a window."""
        if self.start_percent <= 0.0 and self.end_percent >= 1.0:
            return True
        window = self.window(model_sampling, _transformer_options(args, kwargs).get("sample_sigmas"))
        sigmas = args[SIGMA_ARG] if len(args) > SIGMA_ARG else kwargs.get("t")
        if window is None or sigmas is None:
            return True
        return window.contains(float(sigmas.reshape(-1)[0]))

    def call_calibration(self, model_sampling, args: tuple, kwargs: dict) -> CallCalibration:
        """The render's calibration with this call's noise band (one host read of the sigma) and branch."""
        options = _transformer_options(args, kwargs)
        render = options.get("sample_sigmas")
        cached = self._bands
        if cached is not None and render is not None and cached[0]() is render and cached[1]() is model_sampling:
            bands = cached[2]
        else:
            bands = NoiseBands.of(model_sampling.percent_to_sigma)
            if render is not None:
                self._bands = (weakref.ref(render), weakref.ref(model_sampling), bands)
        sigmas = args[SIGMA_ARG] if len(args) > SIGMA_ARG else kwargs.get("t")
        band = bands.band(float(sigmas.reshape(-1)[0])) if sigmas is not None else 0
        branch = tuple(options.get("cond_or_uncond") or ())
        return CallCalibration(self.store.current(), band, branch)

    def window(self, model_sampling, render) -> SigmaWindow | None:
        """The window on ``model_sampling``'s schedule, converted once per render (``render``: its sigmas tensor).

        ``percent_to_sigma`` reads tensors (host syncs on GPUs): converting on
        every model call would cost more than the comparison itself.
        """
        cached = self._window
        if cached is not None and render is not None and cached[0]() is render and cached[1]() is model_sampling:
            return cached[2]
        window = SigmaWindow.from_percents(model_sampling, self.start_percent, self.end_percent)
        if render is not None:
            self._window = (weakref.ref(render), weakref.ref(model_sampling), window)
        return window

    def without_unet_override(self, options: dict) -> dict:
        """``options`` without ToDo's UNet override, for a compiled model (its attn1 patch then acts alone).

        A compiled graph cannot stop to measure, and a UNet graph traced with
        an override would be reused, guards dropped, by a later compiled render
        without one. One note per render says that auto's factors are used.
        """
        warn_once(
            "compiled-fidelity",
            f"ToDo: the model is compiled (TorchCompileModel); {self.store.mode} mode cannot measure inside a "
            "compiled graph, and ToDo uses auto mode's factors (manual's with report_error) there.",
            options.get("sample_sigmas"),
            logging.INFO,
        )
        current = options.get(OVERRIDE_KEY)
        if not isinstance(current, ToDoUNetAttention):
            return options
        if current.inner is not None:
            return {**options, OVERRIDE_KEY: current.inner}
        return {key: value for key, value in options.items() if key != OVERRIDE_KEY}

    def keep_override(self, options: dict) -> dict:
        """``options`` with ToDo's override around whatever override a later node wrote over it."""
        current = options.get(OVERRIDE_KEY)
        if isinstance(current, TODO_OVERRIDES) or getattr(current, HOLDS_TODO_ATTRIBUTE, False):
            return options
        warn_once(
            "override-displaced",
            f"ToDo: a node applied after ToDo set its own attention override "
            f"({getattr(current, '__qualname__', type(current).__name__)}) in place of ToDo's; ToDo keeps acting "
            "with that override inside its own (placing ToDo after such nodes does the same without this note).",
            options.get("sample_sigmas"),
            logging.INFO,
        )
        return {**options, OVERRIDE_KEY: self.override.with_inner(current)}

    def latent_info(self, args: tuple, kwargs: dict) -> LatentInfo:
        x = args[LATENT_ARG] if args else kwargs["x"]
        context = args[CROSSATTN_ARG] if len(args) > CROSSATTN_ARG else kwargs.get("c_crossattn")
        shape = tuple(x.shape)
        packed = kwargs.get(LATENT_SHAPES_ARG)
        if packed and len(packed) > 1:  # several latents packed into one: the first is the video
            shape = tuple(packed[0])
        text_length = context.shape[1] if context is not None and context.ndim == 3 else 0
        return self.family.latent_info(shape, text_length, kwargs)


class ToDoRender:
    """Keyed sampling wrapper of fidelity mode and the error report: one calibration per sampling run, reported
    when the run ends (the decisions are made during the run and forgotten after it)."""

    def __init__(self, store: CalibrationStore) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"ToDoRender({self.store.label})"

    def __call__(self, executor, *args, **kwargs):
        calibration = self.store.open()
        try:
            return executor(*args, **kwargs)
        finally:
            self.store.close(calibration)


def is_compiled(options: dict) -> bool:
    """Whether ComfyUI's ``TorchCompileModel`` compiled the model of this call (its wrapper is among the call's)."""
    wrappers = (options.get("wrappers") or {}).get(WrappersMP.APPLY_MODEL) or {}
    return COMPILE_WRAPPER_KEY in wrappers


def count_text_added_by_input_patches(options: dict) -> dict:
    """``options`` (a dict of this model call's own) with its ``post_input`` patches (Flux) framed by a counter."""
    patches = options.get("patches") or {}
    chain = patches.get(POST_INPUT)
    if not chain:
        return options
    counter = TextAddedByInputPatches(options)
    options["patches"] = {**patches, POST_INPUT: [counter.before, *chain, counter.after]}
    return options


class TextAddedByInputPatches:
    """Text tokens that Flux's ``post_input`` patches add, counted into the text prefix of one model call.

    USOStyleReference puts its style tokens before the text there, after the wrapper read the text length from
    ``c_crossattn``: counted from that alone, the grid would be looked for among the style tokens.
    """

    def __init__(self, options: dict) -> None:
        self.options = options
        self.text_length = 0

    def before(self, inputs: dict) -> dict:
        self.text_length = inputs["txt"].shape[1]
        return inputs

    def after(self, inputs: dict) -> dict:
        added = inputs["txt"].shape[1] - self.text_length
        latent = self.options.get(LATENT_INFO_KEY)
        if added and latent is not None:
            self.options[LATENT_INFO_KEY] = dataclasses.replace(latent, text_tokens=latent.text_tokens + added)
        return inputs


class ToDoExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ToDoModelPatch]


async def comfy_entrypoint() -> ToDoExtension:
    return ToDoExtension()
