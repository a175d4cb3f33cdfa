"""ComfyUI node layer: node inputs -> validated ToDoConfig -> attn1 patch on a cloned model.

Thin on purpose: every decision about grids, factors and downsampling lives in
``todo_core``, which does not import ComfyUI.
"""

from __future__ import annotations

import logging

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
from .todo_core.config import (
    DEFAULT_MANUAL_FACTORS,
    DEFAULT_NATIVE_RESOLUTION,
    MAX_FACTOR,
    MAX_NATIVE_RESOLUTION,
    MIN_FACTOR,
)
from .todo_core.patch import run_todo_last

logger = logging.getLogger("comfyui_todo")

DETECT_NATIVE_RESOLUTION = 0
WRAPPER_KEY = "comfyui_todo"
TRANSFORMER_OPTIONS_ARG = 5
"""Position of ``transformer_options`` in UNetModel's diffusion-model wrapper call."""


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
                "image keeps its detail. Any size or aspect ratio; chains with other attention patches."
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
                        "hires-fix pass). manual: use the depth factors below."
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
                        "Auto mode: the model's training resolution in pixels. 0 = detect (512 for SD1.x, "
                        "768 for SD2.x-v, 1024 for SDXL). Set 512 for SD-Turbo and SDXL-Turbo."
                    ),
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with token downsampling in its self-attention.")],
        )

    @classmethod
    def validate_inputs(cls, **inputs) -> bool | str:
        """Reject out-of-range values before the graph runs, naming the input."""
        # Linked inputs have no value yet at validation time: check what is known.
        known = {name: value for name, value in inputs.items() if name != "model" and value is not None}
        try:
            cls.build_config(model=None, **known)
        except ConfigError as error:
            return str(error)
        return True

    @classmethod
    def build_config(cls, model, native_resolution: int = DETECT_NATIVE_RESOLUTION, **inputs) -> ToDoConfig:
        """Node inputs -> validated config; ``model`` only serves to detect the native resolution."""
        if native_resolution == DETECT_NATIVE_RESOLUTION:
            native_resolution = detect_native_resolution(model) if model is not None else DEFAULT_NATIVE_RESOLUTION
        return ToDoConfig.create(native_resolution=native_resolution, **inputs)

    @classmethod
    def execute(cls, model, **inputs) -> io.NodeOutput:
        config = cls.build_config(model, **inputs)
        patched = model.clone()
        if count_self_attention_layers(model) == 0:
            logger.warning(
                "ToDo: %s has no UNet self-attention blocks; ToDoModelPatch has no effect on it.",
                type(model.model).__name__,
            )
            return io.NodeOutput(patched)

        sigma_start = sigma_end = None
        if not config.covers_whole_schedule:
            model_sampling = model.get_model_object("model_sampling")
            sigma_start = model_sampling.percent_to_sigma(config.start_percent)
            sigma_end = model_sampling.percent_to_sigma(config.end_percent)
        if not config.is_identity:
            patched.set_model_attn1_patch(ToDoAttn1Patch(config, sigma_start, sigma_end))
            if not patched.get_wrappers(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
                patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, run_todo_last_wrapper)
        return io.NodeOutput(patched)


def run_todo_last_wrapper(executor, *args, **kwargs):
    """Keyed diffusion-model wrapper: ToDo's attn1 patch runs after any attn1 patch added later in the graph."""
    if "transformer_options" in kwargs:
        kwargs["transformer_options"] = run_todo_last(kwargs["transformer_options"])
    elif len(args) > TRANSFORMER_OPTIONS_ARG:
        args = list(args)
        args[TRANSFORMER_OPTIONS_ARG] = run_todo_last(args[TRANSFORMER_OPTIONS_ARG])
    return executor(*args, **kwargs)


class ToDoExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ToDoModelPatch]


async def comfy_entrypoint() -> ToDoExtension:
    return ToDoExtension()
