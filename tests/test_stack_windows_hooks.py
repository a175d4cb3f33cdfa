"""Compatibility cells: ToDo beside ComfyUI's context windows, hooks and model patches, through its sampler.

Every model is a tiny random-weight model of ComfyUI's own classes; every run is ``comfy.sample.sample``.
Each cell proves that ToDo acts (keys counted at the attention backend by a probe, call by call against the
same run without ToDo), logs no warning, fails nowhere, and changes nothing at factor 1:

- Context windows (``ContextWindowsManual``, ``WanContextWindowsManual``) on Wan and LTX-Video with more latent
  frames than a window: every window's model call is reduced for its own frame count, and the layout ToDo
  records comes from the window's latent, not the full one.
- Hooks (``CreateHookLora`` scheduled by ``CreateHookKeyframesInterpolated`` / ``SetHookKeyframes``, set on the
  conditioning by ``PairConditioningSetProperties`` or ``ConditioningSetProperties``) on SD1.5, Flux and Wan:
  the hooked weights act, ToDo's keys are reduced in every call of every step while the hooks re-patch the
  weights between calls, and ToDo at factor 1 equals the hooks alone. Hooks ride on the conditioning, not on
  the MODEL: there is no node order with ToDo; the two ways the sampler groups hooked calls are both run.
- Model patches loaded by ``ModelPatchLoader``: Qwen-Image's DiffSynth controlnet, Flux's USO style reference
  and Z-Image's Fun controlnet, each in both orders with ToDo; the kept keys are the ones of the image grid
  where the model really puts it (USO's style tokens before the text included).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest
import torch
from comfy_support import Probe, apply_node, import_comfyui, tiny_model
from dit_support import DiTProbe, LazyModels, check_key_counts, conditioning, latent_shape, tiny_dit, with_probe
from reference import expected_kv, kept_tokens, nearest_rows
from tiny_video_dits import build as build_video
from tiny_video_dits import sample as sample_video
from tiny_video_dits import token_grid as video_grid

from todo_core.dit import LATENT_INFO_KEY

pytestmark = pytest.mark.comfyui

LOGGER = "comfyui_todo"
MANUAL_2 = {"mode": "manual", "depth_1_factor": 2.0, "depth_2_factor": 2.0, "depth_3_factor": 2.0}
OFF = {"mode": "manual", "depth_1_factor": 1.0, "depth_2_factor": 1.0, "depth_3_factor": 1.0}
UNET_FACTORS = (2.0, 2.0, 2.0)


def todo_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture(scope="module")
def models():
    """Tiny models built on first use: video kinds of ``tiny_video_dits``, sd15, flux, wan, qwen_image, zimage."""
    import_comfyui()

    def build(kind: str):
        if kind == "sd15":
            return tiny_model("sd15")
        if kind in ("flux", "wan", "qwen_image"):
            return tiny_dit(kind)
        if kind == "zimage":
            return zimage_with_two_refiners()
        return build_video(kind)

    return LazyModels(build)


# --- context windows ------------------------------------------------------------------------------------------------


@dataclass
class WindowProbe(DiTProbe):
    """A DiTProbe that also keeps, per call, the context window it ran in and the latent layout ToDo recorded."""

    windows: list[tuple[int, ...] | None] = field(default_factory=list)
    latents: list = field(default_factory=list)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, attention, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        window = options.get("context_window")
        self.windows.append(None if window is None else tuple(window.index_list))
        self.latents.append(options.get(LATENT_INFO_KEY))
        return super().__call__(attention, q, k, v, *args, **kwargs)


@dataclass(frozen=True)
class WindowCase:
    kind: str
    node: str
    """``ContextWindowsManual`` (``dim`` 2, lengths in latent frames) or ``WanContextWindowsManual`` (pixel frames)."""
    schedule: str
    length: int
    overlap: int
    frames: int
    window_frames: frozenset[int]
    """Latent frames of the windows the schedule makes (two sizes where the last window is shorter)."""
    freenoise: bool = False
    temporal_factor: float = 1.0

    def __str__(self) -> str:
        return f"{self.kind}-{self.node}-{self.schedule}-t{self.temporal_factor:g}"


WINDOW_CASES = [
    # Wan's node counts pixel frames: 9 -> 3 latent frames, overlap 4 -> 1; windows [0-2], [2-4].
    WindowCase("wan_t2v", "WanContextWindowsManual", "standard_static", 9, 4, 5, frozenset({3})),
    WindowCase("wan_t2v", "WanContextWindowsManual", "looped_uniform", 9, 4, 6, frozenset({3}), freenoise=True),
    # batched: [0-2], [3-4]: the last window is two frames long.
    WindowCase("wan_t2v", "ContextWindowsManual", "batched", 3, 0, 5, frozenset({3, 2})),
    WindowCase("wan_t2v", "ContextWindowsManual", "batched", 3, 0, 5, frozenset({3, 2}), temporal_factor=2.0),
    WindowCase("ltxv", "ContextWindowsManual", "standard_static", 3, 1, 5, frozenset({3})),
    WindowCase("ltxv", "ContextWindowsManual", "batched", 3, 0, 5, frozenset({3, 2})),
    WindowCase("ltxv", "ContextWindowsManual", "standard_uniform", 2, 1, 4, frozenset({2}), temporal_factor=2.0),
]
WINDOW_SIZE = (6, 10)
"""Latent cells: Wan's token grid 3 x 5, LTX-Video's 6 x 10; neither divisible by the factor."""


def with_context_windows(model, case: WindowCase):
    import comfy_extras.nodes_context_windows as windows

    common = {
        "context_length": case.length,
        "context_overlap": case.overlap,
        "context_schedule": case.schedule,
        "context_stride": 1,
        "closed_loop": False,
        "fuse_method": "pyramid",
        "freenoise": case.freenoise,
    }
    if case.node == "WanContextWindowsManual":
        output = windows.WanContextWindowsManualNode.execute(model, **common)
    else:
        output = windows.ContextWindowsManualNode.execute(model, dim=2, **common)
    return output.result[0]


def stacked(node, base, case: WindowCase, todo: dict | None, todo_first: bool = False):
    """``(model, probe)``: the probe first, then context windows and ToDo in the order asked."""
    probed, probe = with_probe(base, WindowProbe())
    if todo is None:
        return with_context_windows(probed, case), probe
    if todo_first:
        return with_context_windows(apply_node(node, probed, **todo), case), probe
    return apply_node(node, with_context_windows(probed, case), **todo), probe


def render_windows(model, case: WindowCase) -> torch.Tensor:
    height, width = WINDOW_SIZE
    return sample_video(model, case.kind, height, width, case.frames, steps=2)


@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_context_windows_reduce_every_window_for_its_own_frames(node, models, case, caplog):
    base = models[case.kind]
    todo = {**MANUAL_2, "temporal_factor": case.temporal_factor}
    alone_model, alone = stacked(node, base, case, None)
    plain = render_windows(alone_model, case)
    with caplog.at_level(logging.INFO):
        patched_model, probe = stacked(node, base, case, todo)
        out = render_windows(patched_model, case)
    _, height, width = video_grid(case.kind, *WINDOW_SIZE, case.frames)
    kept_cells = ceil_div(height, 2) * ceil_div(width, 2)

    assert len(probe.calls) == len(alone.calls) and alone.calls
    reduced = 0
    for before, after, window, latent in zip(alone.calls, probe.calls, probe.windows, probe.latents, strict=True):
        assert window is not None, "every model call ran inside a context window"
        frames = len(window)
        assert (latent.frames, latent.height, latent.width) == (frames, *WINDOW_SIZE), "the window's own latent"
        assert after.q_tokens == before.q_tokens
        if before.q_tokens == before.kv_tokens:  # video self-attention over the window's frames
            assert before.kv_tokens == frames * height * width
            assert after.kv_tokens == ceil_div(frames, int(case.temporal_factor)) * kept_cells, (window, after)
            reduced += 1
        else:  # cross-attention: the text keys are all kept
            assert after.kv_tokens == before.kv_tokens
    assert reduced == len(alone.calls) // 2
    assert {len(w) for w in probe.windows} == case.window_frames
    assert any("Using context windows" in r.getMessage() for r in caplog.records), "the windows were used"
    assert not todo_warnings(caplog), "no call of any window was left unplaced"
    assert out.shape == plain.shape and torch.isfinite(out).all() and not torch.equal(out, plain)

    todo_first, _ = stacked(node, base, case, todo, todo_first=True)
    assert torch.equal(render_windows(todo_first, case), out), "ToDo before or after the windows node: same run"
    for first in (False, True):
        off, _ = stacked(node, base, case, OFF, todo_first=first)
        assert torch.equal(render_windows(off, case), plain), "ToDo at factor 1 changes nothing"


# --- hooks ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """Temporary ``loras`` and ``model_patches`` folders registered with ComfyUI's folder_paths, then removed."""
    import_comfyui()
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    added = {}
    for name in ("loras", "model_patches"):
        folder = root / name
        folder.mkdir()
        folder_paths.add_model_folder_path(name, str(folder))
        added[name] = folder
    yield added
    for name, folder in added.items():
        paths = folder_paths.folder_names_and_paths[name][0]
        if str(folder) in paths:
            paths.remove(str(folder))
        folder_paths.filename_list_cache.pop(name, None)


def write_lora(patcher, folder, name: str, rank: int = 2, seed: int = 0) -> str:
    """A LoRA file (generic ``diffusion_model.<module>`` keys) on every linear weight of the attention modules."""
    import safetensors.torch

    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for key, weight in sorted(patcher.model.state_dict().items()):
        if not key.startswith("diffusion_model.") or not key.endswith(".weight") or weight.ndim != 2:
            continue
        if "attn" not in key:
            continue
        module = key[: -len(".weight")]
        lora[f"{module}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=generator) * 0.3
        lora[f"{module}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=generator) * 0.3
        lora[f"{module}.alpha"] = torch.tensor(float(rank))
    assert lora, "the model has no linear weight"
    safetensors.torch.save_file(lora, str(folder / name))
    return name


def scheduled_lora_hooks(lora_name: str, scheduled: bool = True):
    """A hook LoRA whose strength rises 0.25 -> 0.625 -> 1 over the schedule (three keyframes), or stays at 1."""
    from comfy_extras.nodes_hooks import CreateHookKeyframesInterpolated, CreateHookLora, SetHookKeyframes

    (hooks,) = CreateHookLora().create_hook(lora_name=lora_name, strength_model=1.0, strength_clip=0.0)
    if not scheduled:
        return hooks
    (keyframes,) = CreateHookKeyframesInterpolated().create_hook_keyframes(
        strength_start=0.25,
        strength_end=1.0,
        interpolation="linear",
        start_percent=0.0,
        end_percent=1.0,
        keyframes_count=3,
    )
    (scheduled,) = SetHookKeyframes().set_hook_keyframes(hooks, keyframes)
    return scheduled


def hooked(positive, negative, hooks, where: str):
    """Both conditionings hooked (one hook group), or the positive only (hooked and plain calls alternate)."""
    from comfy_extras.nodes_hooks import ConditioningSetProperties, PairConditioningSetProperties

    if where == "pair":
        return PairConditioningSetProperties().set_properties(positive, negative, 1.0, "default", hooks=hooks)
    (positive,) = ConditioningSetProperties().set_properties(positive, 1.0, "default", hooks=hooks)
    return positive, negative


def unet_conditioning(patcher, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    context_dim = patcher.model.model_config.unet_config["context_dim"]
    return tuple([[torch.randn(1, 7, context_dim, generator=generator), {}]] for _ in range(2))


HOOK_SIZES = {"sd15": (8, 12), "flux": (6, 10), "wan": (6, 10)}
HOOK_FRAMES = 2
HOOK_STEPS = 3


def hook_render(patcher, kind: str, positive, negative) -> torch.Tensor:
    """Three Euler steps at CFG 2: the keyframes change the hook's strength during the run."""
    import comfy.sample

    height, width = HOOK_SIZES[kind]
    shape = (1, 4, height, width) if kind == "sd15" else latent_shape(patcher, 1, height, width, HOOK_FRAMES)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return comfy.sample.sample(
        patcher,
        noise,
        HOOK_STEPS,
        2.0,
        "euler",
        "simple",
        positive,
        negative,
        torch.zeros(shape),
        disable_pbar=True,
        seed=0,
    )


def probed_model(node, base, kind: str, todo: dict | None):
    """``(model, probe)``: a DiTProbe registered before ToDo (ToDo calls it with the keys it kept); on a UNet a
    Probe registered after it (ToDo's attn1 patch runs before any override; a clone deep-copies the Probe)."""
    if kind == "sd15":
        model = base if todo is None else apply_node(node, base, **todo)
        probe = Probe()
        clone = model.clone()
        options = clone.model_options.setdefault("transformer_options", {})
        clone.model_options["transformer_options"] = {**options, "optimized_attention_override": probe}
        return clone, probe
    clone, probe = with_probe(base)
    return (clone if todo is None else apply_node(node, clone, **todo)), probe


def check_unet_calls(plain: Probe, patched: Probe, latent_hw) -> int:
    """Call by call: the same calls; every self-attention K/V count is the oracle's for its grid. Returns reduced."""
    assert len(patched.calls) == len(plain.calls) and plain.calls
    reduced = 0
    for before, after in zip(plain.calls, patched.calls, strict=True):
        assert (after.grid, after.q_tokens) == (before.grid, before.q_tokens)
        if before.kv_tokens == before.q_tokens:  # self-attention
            assert after.kv_tokens == expected_kv(tuple(latent_hw), before.grid, UNET_FACTORS), after
            reduced += after.kv_tokens < before.kv_tokens
        else:
            assert after.kv_tokens == before.kv_tokens
    return reduced


def check_dit_calls(kind: str, plain: DiTProbe, patched: DiTProbe) -> int:
    height, width = HOOK_SIZES[kind]
    rows, cols = ceil_div(height, 2), ceil_div(width, 2)
    frames = HOOK_FRAMES if kind == "wan" else 1
    dropped = frames * (rows * cols - kept_tokens(rows, cols, 2.0))

    def dropped_keys(_, call) -> int:
        return dropped if call.q_tokens == call.kv_tokens and call.kv_tokens >= frames * rows * cols else 0

    return check_key_counts(plain, patched, dropped_keys, f"the {kind} image grid")


@pytest.mark.parametrize("where", ["pair", "positive_only"])
@pytest.mark.parametrize("kind", ["sd15", "flux", "wan"])
def test_scheduled_hook_lora_with_todo(node, models, model_folders, kind, where, caplog):
    base = models[kind]
    lora = write_lora(base, model_folders["loras"], f"hook-{kind}.safetensors")
    positive, negative = unet_conditioning(base) if kind == "sd15" else conditioning(base, 0)
    hooked_positive, hooked_negative = hooked(positive, negative, scheduled_lora_hooks(lora), where)
    todo = MANUAL_2 if kind == "sd15" else {"mode": "manual", "depth_1_factor": 2.0}

    unhooked = hook_render(base, kind, positive, negative)
    alone_model, alone_probe = probed_model(node, base, kind, None)
    alone = hook_render(alone_model, kind, hooked_positive, hooked_negative)
    assert not torch.equal(alone, unhooked), "the hooked LoRA acts"
    constant = hook_render(base, kind, *hooked(positive, negative, scheduled_lora_hooks(lora, False), where))
    assert not torch.equal(alone, constant), "the keyframes change its strength during the run"

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        patched, probe = probed_model(node, base, kind, todo)
        out = hook_render(patched, kind, hooked_positive, hooked_negative)
    assert torch.isfinite(out).all() and not torch.equal(out, alone)
    if kind == "sd15":
        reduced = check_unet_calls(alone_probe, probe, HOOK_SIZES[kind])
    else:
        reduced = check_dit_calls(kind, alone_probe, probe)
    # Pair: one batched call per step; positive only: a hooked and a plain call per step, the weights re-patched
    # between them. Every one of them is reduced, in every step.
    evaluations = HOOK_STEPS * (1 if where == "pair" else 2)
    assert reduced % evaluations == 0 and reduced >= evaluations
    assert not todo_warnings(caplog)

    off_model, _ = probed_model(node, base, kind, OFF)
    assert torch.equal(hook_render(off_model, kind, hooked_positive, hooked_negative), alone)
    again, probe_again = probed_model(node, base, kind, todo)
    assert torch.equal(hook_render(again, kind, hooked_positive, hooked_negative), out), "repeatable"
    assert [c.kv_tokens for c in probe_again.calls] == [c.kv_tokens for c in probe.calls]
    assert torch.equal(hook_render(base, kind, positive, negative), unhooked), "the hooks left no weight behind"


# --- model patches (ModelPatchLoader) -------------------------------------------------------------------------------


def randomized(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Seeded normal weights for a module whose ComfyUI layers leave them uninitialised; norm scales stay near 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(module.named_parameters()):
            noise = torch.randn(parameter.shape, generator=generator) * std
            is_scale = parameter.ndim == 1 and (name.endswith("gamma") or "norm" in name or "rms" in name)
            parameter.copy_(1.0 + noise if is_scale else noise)
    return module


def narrowed(cls, **widths):
    """``cls`` built at ``widths`` whatever its caller asks: the loader builds the released widths."""

    class Narrow(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, **widths})

    Narrow.__name__ = Narrow.__qualname__ = f"Tiny{cls.__name__}"
    return Narrow


QWEN_CONTROL = {"num_layers": 2, "dim": 64}
"""The tiny Qwen-Image's width (2 heads x 32) and its two blocks."""
USO_PROJECTOR = {"siglip_token_nums": 9, "style_token_nums": 4, "siglip_token_dims": 16, "hidden_size": 64}
"""Three style runs of 4 tokens (12 text tokens more) at the tiny Flux's width, from 9 SigLIP tokens of 16."""
ZIMAGE_CONTROL = {"dim": 256, "n_heads": 4, "n_kv_heads": 4, "n_control_layers": 2}
SIGLIP_LAYERS = 24


@pytest.fixture
def tiny_patch_classes(monkeypatch):
    """The classes ModelPatchLoader builds, narrowed to the tiny models' widths for this test.

    The loader builds each patch model at the width of the released model (60 blocks of 3072 for Qwen-Image's
    DiffSynth controlnet, 3072 for USO, 3840 for Z-Image's): a patch for a tiny model can only load at the tiny
    width. Everything else the loader does (key detection, dtype, ``load_state_dict``, ModelPatcher) runs as is.
    """
    import comfy.ldm.lumina.controlnet as lumina_controlnet
    import comfy_extras.nodes_model_patch as model_patch

    classes = {
        "qwen_diffsynth": narrowed(model_patch.QwenImageBlockWiseControlNet, **QWEN_CONTROL),
        "flux_uso": narrowed(model_patch.SigLIPMultiFeatProjModel, **USO_PROJECTOR),
        "zimage_fun": narrowed(lumina_controlnet.ZImage_Control, **ZIMAGE_CONTROL),
    }
    monkeypatch.setattr(model_patch, "QwenImageBlockWiseControlNet", classes["qwen_diffsynth"])
    monkeypatch.setattr(model_patch, "SigLIPMultiFeatProjModel", classes["flux_uso"])
    monkeypatch.setattr(lumina_controlnet, "ZImage_Control", classes["zimage_fun"])
    return classes


def write_model_patch(case: str, cls, folder) -> str:
    """A patch file with the keys ModelPatchLoader detects its kind by, at the tiny width."""
    import comfy.ops
    import safetensors.torch

    module = randomized(cls(operations=comfy.ops.manual_cast), seed=5)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    if case == "flux_uso":  # USO's file holds the projector under feature_embedder.
        state = {f"feature_embedder.{k}": v for k, v in state.items()}
    name = f"{case}.safetensors"
    safetensors.torch.save_file(state, str(folder / name))
    return name


def tiny_wan21_vae():
    """Qwen-Image's VAE (Wan 2.1's) at base width 8, loaded by ``comfy.sd.VAE`` from its state dict."""
    import comfy.ldm.wan.vae
    import comfy.sd

    model = comfy.ldm.wan.vae.WanVAE(
        dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
    )
    return comfy.sd.VAE(sd=randomized(model, seed=6).state_dict())


def tiny_flux_vae():
    """A 16-channel, 8x AutoencoderKL (Flux's and Z-Image's kind) at width 32, through ``comfy.sd.VAE``'s config."""
    import comfy.ldm.models.autoencoder
    import comfy.sd

    ddconfig = {
        "double_z": True,
        "z_channels": 16,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    params = {"ddconfig": ddconfig, "embed_dim": 16}
    model = randomized(comfy.ldm.models.autoencoder.AutoencoderKL(**params), seed=7)
    return comfy.sd.VAE(sd=model.state_dict(), config={"params": params})


def clip_vision_output(seed: int = 8):
    """SigLIP's hidden states as CLIPVisionEncode returns them (all layers, and the penultimate one)."""
    import comfy.clip_vision

    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(1, SIGLIP_LAYERS, USO_PROJECTOR["siglip_token_nums"], 16, generator=generator)
    output = comfy.clip_vision.Output()
    output["all_hidden_states"] = states
    output["penultimate_hidden_states"] = states[:, -2]
    return output


def control_image(height: int, width: int, seed: int = 9) -> torch.Tensor:
    """An IMAGE (``[B, H, W, C]`` in 0..1) of the latent's size in pixels."""
    return torch.rand(1, height * 8, width * 8, 3, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class PatchCase:
    kind: str
    size: tuple[int, int]
    prefix: int
    """Keys before the grid in the first call that holds it (text, and USO's style tokens before the text)."""


PATCH_CASES = {
    "qwen_diffsynth": PatchCase("qwen_image", (6, 10), 5),
    "flux_uso": PatchCase("flux", (6, 10), 5 + 3 * USO_PROJECTOR["style_token_nums"]),
    "zimage_fun": PatchCase("zimage", (12, 12), 0),  # the noise refiner: the grid, then its padding
}


def zimage_with_two_refiners():
    """The tiny Z-Image with two noise-refiner layers, as the released model (the Fun controlnet counts on it)."""
    import comfy.model_base
    import comfy.supported_models
    from comfy_support import random_patcher
    from tiny_image_dits import ZIMAGE_TINY

    return random_patcher(
        comfy.supported_models.ZImage,
        comfy.model_base.Lumina2,
        {**ZIMAGE_TINY, "n_refiner_layers": 2},
        check_render=False,
    )


def patch_applier(case: str, model_patch, size):
    """The patch node for ``case`` as a MODEL -> MODEL function."""
    import comfy_extras.nodes_model_patch as nodes_model_patch

    if case == "qwen_diffsynth":
        vae, image = tiny_wan21_vae(), control_image(*size)
        return lambda model: nodes_model_patch.QwenImageDiffsynthControlnet().diffsynth_controlnet(
            model, model_patch, vae, image, 1.0
        )[0]
    if case == "zimage_fun":
        vae, image = tiny_flux_vae(), control_image(*size)
        return lambda model: nodes_model_patch.ZImageFunControlnet().diffsynth_controlnet(
            model, model_patch, vae, image, 1.0
        )[0]
    vision = clip_vision_output()
    return lambda model: nodes_model_patch.USOStyleReference().apply_patch(model, model_patch, vision)[0]


def patch_render(model, case: PatchCase) -> torch.Tensor:
    from tiny_image_dits import sample as sample_image

    height, width = case.size
    if case.kind == "zimage":
        return sample_image(model, "zimage", height, width, steps=2)
    from dit_support import sample_dit

    return sample_dit(model, height, width, steps=2)


def kept_positions(prefix: int, rows: int, cols: int, length: int) -> list[int]:
    """Key positions ToDo at factor 2 keeps: every prefix key, the nearest-sampled grid, everything after it."""
    grid = [prefix + r * cols + c for r in nearest_rows(rows, 2.0) for c in nearest_rows(cols, 2.0)]
    return [*range(prefix), *grid, *range(prefix + rows * cols, length)]


@pytest.mark.parametrize("case_name", list(PATCH_CASES))
def test_model_patch_with_todo_in_both_orders(node, models, model_folders, tiny_patch_classes, case_name, caplog):
    from comfy_extras.nodes_model_patch import ModelPatchLoader
    from tiny_image_dits import CallProbe

    case = PATCH_CASES[case_name]
    base = models[case.kind]
    name = write_model_patch(case_name, tiny_patch_classes[case_name], model_folders["model_patches"])
    (model_patch,) = ModelPatchLoader().load_model_patch(name)
    assert type(model_patch.model) is tiny_patch_classes[case_name], "the loader recognised the patch's keys"
    with torch.inference_mode():
        apply_patch = patch_applier(case_name, model_patch, case.size)
    todo = {"mode": "manual", "depth_1_factor": 2.0}

    def run(order: str, inputs: dict | None):
        """As ComfyUI runs a prompt: in inference mode (a clone deep-copies the patch and its encoded image)."""
        with torch.inference_mode():
            probed, probe = with_probe(base, CallProbe(keep_keys=True))
            if inputs is None:
                model = apply_patch(probed) if order == "patch" else probed
            elif order == "patch_first":
                model = apply_node(node, apply_patch(probed), **inputs)
            else:
                model = apply_patch(apply_node(node, probed, **inputs))
            return patch_render(model, case), probe

    plain, _ = run("none", None)
    alone, alone_probe = run("patch", None)
    assert torch.isfinite(alone).all() and not torch.equal(alone, plain), "the patch acts"

    rows, cols = ceil_div(case.size[0], 2), ceil_div(case.size[1], 2)
    dropped = rows * cols - kept_tokens(rows, cols, 2.0)

    def dropped_keys(_, call) -> int:
        return dropped if call.q_tokens == call.kv_tokens and call.kv_tokens >= rows * cols else 0

    outputs = []
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for order in ("patch_first", "todo_first"):
            out, probe = run(order, todo)
            assert torch.isfinite(out).all() and not torch.equal(out, alone)
            check_key_counts(alone_probe, probe, dropped_keys, f"the {case.kind} image grid")
            first = next(i for i, c in enumerate(alone_probe.calls) if dropped_keys(i, c))
            full, kept = alone_probe.records[first].keys, probe.records[first].keys
            positions = kept_positions(case.prefix, rows, cols, full.shape[1])
            assert torch.equal(kept, full[:, positions]), "the grid was placed where the model puts it"
            outputs.append(out)
    assert torch.equal(outputs[0], outputs[1]), "the patch and ToDo commute"
    assert not todo_warnings(caplog)
    for order in ("patch_first", "todo_first"):
        off, _ = run(order, OFF)
        assert torch.equal(off, alone), f"ToDo at factor 1 changes nothing ({order})"
