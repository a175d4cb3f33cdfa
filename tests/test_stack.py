"""Compatibility matrix, the acceleration stack: ToDo beside step caches, fp8 weights and offloaded weights.

Every cell runs ComfyUI's own sampler on a tiny SD1.5 UNet and a tiny Flux (64 and 128 px) and proves
that ToDo acts (K/V tokens counted at the attention backend by a probe registered before ToDo) and that ToDo at
factor 1 leaves the stack's output bit-identical, in both node orders where the order could matter:

- ComfyUI's EasyCache and LazyCache (``comfy_extras/nodes_easycache.py``) skip whole model evaluations. Step by
  step, the steps that ran the diffusion model each ran it once with ToDo's reduced keys, and the others not at
  all; the caches skip steps with and without ToDo.
- fp8 weights: diffusion-model-only files are written into a temporary models folder registered with
  ``folder_paths`` and loaded by the ``UNETLoader`` node with each fp8 ``weight_dtype``. The attention backend
  gets q/k/v in the dtype ComfyUI's manual cast computes in. ComfyUI's fp8 fast path (``fp8_e4m3fn_fast``,
  ``--fast fp8_matrix_mult``) needs a device with fp8 compute: on a CPU it falls back to the manual cast, and
  with ``--supports-fp8-compute`` it runs there too (fp8 matrix products), both with ToDo.
- Offloading: a CPU load device always loads a model completely (``load_models_gpu`` ignores ``--lowvram`` and
  ``--novram`` there). The partial loading those flags select on a GPU is run here by handing every load the
  weight budget ``load_models_gpu`` would compute (0.1 bytes under ``--novram``, half the model for a short
  GPU): weights are then cast per layer, with weight patches applied per layer (``LowVramPatch``).
- Devices: the index tensors and masks ToDo caches per device follow the tensors they index, for a model that
  renders on the CPU and is then moved to the ``meta`` device (the GPU move is checked on a GPU machine).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import sys
from dataclasses import dataclass, field

import pytest
import torch
from comfy_support import TEXT_TOKENS, apply_node, import_comfyui, run_node, sample, tiny_model
from dit_stand_ins import DiTStandIn, detected_config_agrees, write_dit
from dit_support import OVERRIDE_KEY, _flux_config, sample_dit, tiny_dit

pytestmark = pytest.mark.comfyui

MANUAL_2 = {"mode": "manual", "depth_1_factor": 2.0, "depth_2_factor": 2.0, "depth_3_factor": 2.0}
MANUAL_OFF = {"mode": "manual", "depth_1_factor": 1.0, "depth_2_factor": 1.0, "depth_3_factor": 1.0}
KINDS = ("sd15", "flux")
LATENT = {"sd15": 8, "flux": 16}
"""Latent side of the renders: SD1.5's grids 8, 4, 2, 1 (64 px); Flux's 8x8 image tokens (128 px)."""
SELF_KV = {
    # Self-attention K/V tokens per grid (UNet) with MANUAL_2, and without ToDo. SD1.5's depth 4 (the middle
    # block, 1x1) is never reduced; Flux's joint attention keeps its 5 text tokens and 4x4 of its 8x8 image tokens.
    "sd15": {(8, 8): {16}, (4, 4): {4}, (2, 2): {1}, (1, 1): {1}},
    "flux": {None: {5 + 4 * 4}},
}
PLAIN_KV = {"sd15": {(8, 8): {64}, (4, 4): {16}, (2, 2): {4}, (1, 1): {1}}, "flux": {None: {5 + 8 * 8}}}
EASYCACHE = "comfy_extras.nodes_easycache"
LOGGER = "comfyui_todo"


# --- probe and renders ----------------------------------------------------------------------------------------------


@dataclass
class Call:
    sigma: float | None
    grid: tuple[int, int] | None
    q_tokens: int
    kv_tokens: int
    dtypes: tuple[torch.dtype, ...]
    devices: tuple[torch.device, ...]
    """q, k, v and, where there is one, the mask."""


@dataclass
class StackProbe:
    """``optimized_attention_override`` that records every attention call as the backend gets it.

    Registered on a model before ToDo (ToDo keeps it as its inner override on DiTs; UNets reduce K/V in an attn1
    patch before any override), it sees the keys ToDo kept. On the ``meta`` device it returns zeros of the
    output's shape: there is no arithmetic to run. ``watch`` (a ComfyUI model) has its load state recorded at
    the first call of a render: whether its weights are cast per layer while the sampler runs.
    """

    calls: list[Call] = field(default_factory=list)
    watch: object = None
    load_states: list[tuple[bool, int, int, int]] = field(default_factory=list)
    passes_attention_masks = True  # it hands every mask to the backend: ToDo's correction stays a mask

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone deep-copies model_options: every clone must record into this probe

    def __call__(self, attention, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        skip_reshape = kwargs.get("skip_reshape", False)
        sequence_dim = 2 if skip_reshape else 1
        mask = args[1] if len(args) >= 2 else kwargs.get("mask")
        sigmas = options.get("sigmas")
        meta = q.device.type == "meta"
        shape = options.get("activations_shape")
        self.calls.append(
            Call(
                None if sigmas is None or sigmas.device.type == "meta" else float(sigmas.reshape(-1)[0]),
                None if shape is None else tuple(shape[-2:]),
                q.shape[sequence_dim],
                k.shape[sequence_dim],
                (q.dtype, k.dtype, v.dtype) + (() if mask is None else (mask.dtype,)),
                (q.device, k.device, v.device) + (() if mask is None else (mask.device,)),
            )
        )
        if self.watch is not None and not self.load_states:
            self.load_states.append(load_state(self.watch))
        if not meta:
            return attention(q, k, v, *args, **kwargs)
        if not skip_reshape:
            return torch.zeros_like(q)
        batch, heads, tokens, dim_head = q.shape
        if kwargs.get("skip_output_reshape", False):
            return q.new_zeros(batch, heads, tokens, dim_head)
        return q.new_zeros(batch, tokens, heads * dim_head)

    def self_attention(self) -> list[Call]:
        """Every call but the UNet's cross-attention (its keys are the text); Flux's calls are all joint."""
        return [c for c in self.calls if c.kv_tokens != TEXT_TOKENS or c.grid is None]

    def kv_by_grid(self, calls: list[Call] | None = None) -> dict:
        out: dict = {}
        for call in self.self_attention() if calls is None else calls:
            out.setdefault(call.grid, set()).add(call.kv_tokens)
        return out


def with_probe(model, watch: object = None) -> tuple[object, StackProbe]:
    """A clone of ``model`` whose attention calls ``probe`` records (register it before ToDo)."""
    probe = StackProbe(watch=watch)
    clone = model.clone()
    clone.model_options["transformer_options"] = {**clone.model_options["transformer_options"], OVERRIDE_KEY: probe}
    return clone, probe


def render(kind: str, model, steps: int = 1) -> torch.Tensor:
    """ComfyUI's sampler, Euler: SD1.5 with CFG 7 (cond and uncond in one batch), Flux with CFG 1."""
    side = LATENT[kind]
    if kind == "sd15":
        return sample(model, (side, side), steps=steps)
    return sample_dit(model, side, side, steps=steps)


def schedule(kind: str, model, steps: int) -> list[float]:
    """The sigmas the sampler evaluates the model at: ``normal`` for SD1.5, ``simple`` for Flux (as render)."""
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(
        model.get_model_object("model_sampling"), "normal" if kind == "sd15" else "simple", steps
    )
    return [float(s) for s in sigmas[:-1]]


def todo(node, model, **inputs):
    return apply_node(node, model, **inputs)


def todo_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def models():
    """A tiny SD1.5 UNet and a tiny Flux, built for this module (the offloading cells load them partially)."""
    import_comfyui()
    return {"sd15": tiny_model("sd15", seed=3), "flux": tiny_dit("flux", seed=3)}


# --- step caches: EasyCache, LazyCache ------------------------------------------------------------------------------

CACHE_STEPS = 10


def cache(name: str, model):
    """The node with its defaults (reuse threshold 0.2, from 15 % to 95 % of the schedule)."""
    return run_node(
        f"{name}Node", EASYCACHE, model, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95, verbose=False
    )


def steps_that_ran(probe: StackProbe, sigmas: list[float]) -> dict[float, list[Call]]:
    """The self-attention calls of each step that ran the diffusion model, by the step's sigma."""
    calls = probe.self_attention()
    assert {c.sigma for c in calls} <= set(sigmas), "every model call is at a step of the schedule"
    return {s: [c for c in calls if c.sigma == s] for s in sigmas if any(c.sigma == s for c in calls)}


@pytest.fixture(scope="module")
def cache_alone(models):
    """Per model and cache node: the render with the cache alone, and the calls per model evaluation."""
    renders: dict = {}

    def run(kind: str, cache_name: str) -> tuple[torch.Tensor, int]:
        if (kind, cache_name) not in renders:
            base = models[kind]
            probed, probe = with_probe(base)
            out = render(kind, cache(cache_name, probed), CACHE_STEPS)
            ran = steps_that_ran(probe, schedule(kind, base, CACHE_STEPS))
            assert 1 < len(ran) < CACHE_STEPS, f"{cache_name} alone should skip some steps: {len(ran)} ran"
            per_evaluation = {len(calls) for calls in ran.values()}
            assert len(per_evaluation) == 1, "one model evaluation per step that ran"
            assert probe.kv_by_grid() == PLAIN_KV[kind]
            renders[kind, cache_name] = out, per_evaluation.pop()
        return renders[kind, cache_name]

    return run


@pytest.mark.parametrize("order", ["cache_first", "todo_first"])
@pytest.mark.parametrize("cache_name", ["EasyCache", "LazyCache"])
@pytest.mark.parametrize("kind", KINDS)
def test_step_caches_skip_steps_and_todo_reduces_the_rest(node, models, cache_alone, kind, cache_name, order, caplog):
    base = models[kind]
    sigmas = schedule(kind, base, CACHE_STEPS)

    def stack(model, **inputs):
        if order == "cache_first":
            return todo(node, cache(cache_name, model), **inputs)
        return cache(cache_name, todo(node, model, **inputs))

    alone, calls_per_evaluation = cache_alone(kind, cache_name)

    probed, probe = with_probe(base)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = render(kind, stack(probed, **MANUAL_2), CACHE_STEPS)
    assert torch.isfinite(out).all() and not torch.equal(out, alone)
    ran = steps_that_ran(probe, sigmas)
    assert sigmas[0] in ran and 1 < len(ran) < CACHE_STEPS, f"with ToDo, {len(ran)} of {CACHE_STEPS} steps ran"
    for sigma, calls in ran.items():
        assert len(calls) == calls_per_evaluation, f"one model evaluation at sigma {sigma}"
        assert probe.kv_by_grid(calls) == SELF_KV[kind], f"reduced keys at sigma {sigma}"
    assert todo_warnings(caplog) == []

    assert torch.equal(render(kind, stack(base, **MANUAL_OFF), CACHE_STEPS), alone)


# --- fp8 weights through UNETLoader ---------------------------------------------------------------------------------

STAND_IN_NAMES = {"sd15": "todo-stack-sd15-tiny.safetensors", "flux": "todo-stack-flux-tiny.safetensors"}
FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def stand_ins() -> dict[str, DiTStandIn]:
    """Diffusion-model-only files: SD1.5's and Flux's key layouts, detected by ComfyUI from the tensor shapes.

    ComfyUI matches SD1.5 by its full width (320 channels) and hard-codes Flux.1's 24 heads, RoPE axes and MLP
    ratio: the file's metadata names the config class and those values, as the end-to-end stand-ins do
    (``dit_stand_ins.py``, applied by ``stand_in_loader.py``).
    """
    from comfy_support import SD15_TINY

    return {
        "sd15": DiTStandIn(STAND_IN_NAMES["sd15"], "SD15", dict(SD15_TINY), (), dtype=torch.float16),
        "flux": DiTStandIn(
            STAND_IN_NAMES["flux"],
            "Flux",
            {**_flux_config(), "yak_mlp": False, "txt_norm": False},  # FluxParams' defaults, as detection reads them
            ("axes_dim", "num_heads", "mlp_ratio"),
            torch.bfloat16,
        ),
    }


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A temporary ``diffusion_models`` folder holding the stand-ins, registered with ``folder_paths``."""
    import comfy.model_detection
    import folder_paths

    folder = tmp_path_factory.mktemp("diffusion_models")
    for seed, stand_in in enumerate(stand_ins().values()):
        path = write_dit(stand_in, folder / stand_in.file_name, seed)
        assert detected_config_agrees(stand_in, path) == {}, "ComfyUI's detection reads the rest from the file"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy.model_detection, "model_config_from_unet", comfy.model_detection.model_config_from_unet)
        loader = importlib.import_module("stand_in_loader")  # wraps the detection (on its first import)
        patch.setattr(comfy.model_detection, "model_config_from_unet", loader.model_config_from_unet)
        folder_paths.add_model_folder_path("diffusion_models", str(folder))
        folder_paths.filename_list_cache.pop("diffusion_models", None)
        try:
            yield folder
        finally:
            folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(folder))
            folder_paths.filename_list_cache.pop("diffusion_models", None)


def load_unet(kind: str, weight_dtype: str):
    """The ``UNETLoader`` node, as a graph runs it."""
    import folder_paths

    import nodes

    assert STAND_IN_NAMES[kind] in folder_paths.get_filename_list("diffusion_models")
    (model,) = nodes.UNETLoader().load_unet(STAND_IN_NAMES[kind], weight_dtype)
    return model


def linear_classes(model) -> set[type]:
    return {type(m) for m in model.get_model_object("diffusion_model").modules() if isinstance(m, torch.nn.Linear)}


def check_todo_acts(node, kind: str, model) -> tuple[torch.Tensor, StackProbe]:
    """A render with ToDo: keys reduced, finite; ToDo at factor 1 bit-identical to the model alone.

    Returns the model's render without ToDo and the probe of the render with it.
    """
    probed, probe = with_probe(model)
    out = render(kind, todo(node, probed, **MANUAL_2))
    assert torch.isfinite(out).all()
    assert probe.kv_by_grid() == SELF_KV[kind]
    alone = render(kind, model)
    assert torch.equal(render(kind, todo(node, model, **MANUAL_OFF)), alone)
    assert not torch.equal(out, alone)
    return alone, probe


@pytest.mark.parametrize("weight_dtype", sorted(FP8))
@pytest.mark.parametrize("kind", KINDS)
def test_fp8_weights_loaded_by_unetloader(node, model_folder, kind, weight_dtype):
    import comfy.ops

    model = load_unet(kind, weight_dtype)
    assert model.model.get_dtype() == FP8[weight_dtype]
    compute = model.model.manual_cast_dtype
    assert compute == torch.float32, "a CPU computes fp8 weights in float32"
    assert linear_classes(model) == {comfy.ops.manual_cast.Linear}, "a CPU has no fp8 compute: manual cast"
    _, probe = check_todo_acts(node, kind, model)
    # q/k/v (and Flux's mass-correction mask) in the dtype the manual cast computes in
    assert {c.dtypes for c in probe.calls} == {(compute,) * (3 if kind == "sd15" else 4)}


@pytest.mark.parametrize("kind", KINDS)
def test_fp8_fast_path_on_a_cpu(node, model_folder, kind, monkeypatch, caplog):
    """``fp8_e4m3fn_fast`` and ``--fast fp8_matrix_mult`` need fp8 compute; ``--supports-fp8-compute`` claims it."""
    import comfy.model_management
    import comfy.ops
    from comfy.cli_args import PerformanceFeature, args

    plain = load_unet(kind, "fp8_e4m3fn")
    assert not comfy.model_management.supports_fp8_compute(comfy.model_management.get_torch_device())
    fast = load_unet(kind, "fp8_e4m3fn_fast")
    assert linear_classes(fast) == {comfy.ops.manual_cast.Linear}
    assert torch.equal(render(kind, todo(node, fast, **MANUAL_2)), render(kind, todo(node, plain, **MANUAL_2)))
    plain_alone = render(kind, plain)

    monkeypatch.setattr(comfy.model_management, "SUPPORT_FP8_OPS", True)  # --supports-fp8-compute
    fast_paths = {"fp8_e4m3fn_fast": set(), "fp8_e4m3fn": {PerformanceFeature.Fp8MatrixMultiplication}}
    for weight_dtype, features in fast_paths.items():
        monkeypatch.setattr(args, "fast", features)
        model = load_unet(kind, weight_dtype)
        assert linear_classes(model) == {comfy.ops.fp8_ops.Linear}, weight_dtype
        with caplog.at_level(logging.INFO):
            alone, probe = check_todo_acts(node, kind, model)
        assert not [r for r in caplog.records if "Exception during fp8 op" in r.getMessage()]
        assert not torch.equal(alone, plain_alone), "fp8 matrix products ran"
        assert {c.dtypes[:3] for c in probe.calls} == {(torch.float32,) * 3}


# --- offloading: partial loading, weights cast per layer ------------------------------------------------------------

PATCHED_WEIGHTS = {
    "sd15": r"diffusion_model\.input_blocks\.1\.1\.transformer_blocks\.0\.attn1\.to_[qkv]\.weight",
    "flux": r"diffusion_model\.(double_blocks\.0\.img_attn\.qkv|single_blocks\.0\.linear1)\.weight",
}


def with_weight_patches(kind: str, model):
    """A clone with weight patches (as a LoRA adds) on the first attention projections."""
    clone = model.clone()
    generator = torch.Generator().manual_seed(7)
    state = clone.model.state_dict()
    patches = {
        key: (torch.randn(state[key].shape, generator=generator) * 0.05,)
        for key in state
        if re.fullmatch(PATCHED_WEIGHTS[kind], key)
    }
    assert len(clone.add_patches(patches, 1.0)) == len(patches) >= 2
    return clone


def load_state(model) -> tuple[bool, int, int, int]:
    """Whether ComfyUI runs the model partially loaded; its modules cast per layer, all castable modules, and the
    weight patches applied per layer (``LowVramPatch``)."""
    castable = [m for m in model.modules() if hasattr(m, "comfy_cast_weights")]
    cast = sum(m.comfy_cast_weights for m in castable)
    return bool(getattr(model, "model_lowvram", False)), cast, len(castable), getattr(model, "lowvram_patch_counter", 0)


@contextlib.contextmanager
def weight_budget(budget: float | None):
    """Every model load gets ``budget`` bytes of weight memory, as ``load_models_gpu`` hands a GPU load.

    ``None`` leaves ComfyUI's own choice: a CPU load device loads completely. Models are unloaded before and
    after, so that each render loads its model afresh.
    """
    import comfy.model_management

    comfy.model_management.unload_all_models()
    original = comfy.model_management.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        return original(self, lowvram_model_memory if budget is None else budget, force_patch_weights)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy.model_management.LoadedModel, "model_load", model_load)
        try:
            yield
        finally:
            comfy.model_management.unload_all_models()


def test_lowvram_and_novram_load_a_cpu_model_completely(models, monkeypatch):
    import comfy.model_management as mm

    model = models["sd15"]
    for state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM):
        monkeypatch.setattr(mm, "vram_state", state)
        with weight_budget(None):
            mm.load_models_gpu([model])
            assert load_state(model.model)[:2] == (False, 0), state
            assert model.loaded_size() == model.model_size()


NOVRAM = 0.1
"""The weight budget ``load_models_gpu`` hands every load under ``--novram``: every castable module is cast."""


@pytest.mark.parametrize("budget", ["novram", "half"])
@pytest.mark.parametrize("kind", KINDS)
def test_partially_loaded_weights_cast_per_layer(node, models, kind, budget, caplog):
    base = with_weight_patches(kind, models[kind])
    bytes_ = NOVRAM if budget == "novram" else base.model_size() / 2

    def run(inputs: dict, limit: float | None) -> tuple[torch.Tensor, StackProbe]:
        probed, probe = with_probe(base, watch=base.model)
        with weight_budget(limit):
            out = render(kind, todo(node, probed, **inputs) if inputs else probed)
        return out, probe

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        full, full_probe = run(MANUAL_2, None)
        partial, probe = run(MANUAL_2, bytes_)
    assert todo_warnings(caplog) == []
    assert full_probe.load_states[0][:2] == (False, 0), "loaded completely"
    lowvram, cast, castable, patched = probe.load_states[0]
    assert lowvram and cast > 0, "weights cast per layer"
    if budget == "novram":
        assert cast == castable and patched == len(base.patches), "every module cast, every weight patched per layer"
    else:
        assert cast < castable, "half the budget leaves some modules loaded"
    assert probe.kv_by_grid() == SELF_KV[kind] == full_probe.kv_by_grid()
    assert torch.equal(partial, full), "partial loading computes the same weights, per layer"
    alone, _ = run({}, bytes_)
    assert torch.equal(run(MANUAL_OFF, bytes_)[0], alone)
    assert not torch.equal(partial, alone)
    assert load_state(base.model)[:2] == (False, 0), "unloaded again"


# --- devices: cached index tensors follow the tensors they index ----------------------------------------------------


def pack_module(obj, name: str):
    """The pack's ``todo_core.<name>`` module as ComfyUI's loader imported it."""
    package = type(obj).__module__.rsplit(".", 1)[0]
    return sys.modules[f"{package}.{name}"]


def meta_forward(kind: str, model) -> torch.Tensor:
    """One model call through ``apply_model`` with the model's wrappers, everything on the ``meta`` device."""
    meta = torch.device("meta")
    channels = model.get_model_object("latent_format").latent_channels
    x = torch.zeros(1, channels, LATENT[kind], LATENT[kind], device=meta)
    sigmas = torch.ones(1, device=meta)
    options = {**model.model_options["transformer_options"], "sigmas": sigmas, "wrappers": model.wrappers}
    if kind == "sd15":
        context = torch.zeros(1, TEXT_TOKENS, model.model.model_config.unet_config["context_dim"], device=meta)
        extra = {}
    else:
        unet_config = model.model.model_config.unet_config
        context = torch.zeros(1, 5, unet_config["context_in_dim"], device=meta)
        extra = {"y": torch.zeros(1, unet_config["vec_in_dim"], device=meta), "guidance": torch.ones(1, device=meta)}
    with torch.no_grad():
        return model.model.apply_model(x, sigmas, c_crossattn=context, transformer_options=options, **extra)


@pytest.mark.parametrize("kind", KINDS)
def test_index_tensors_follow_a_model_moved_to_another_device(node, kind, monkeypatch):
    """A non-integer factor makes the UNet patch index rows and columns; the DiT override always indexes keys."""
    model = tiny_model("sd15", seed=5) if kind == "sd15" else tiny_dit("flux", seed=5)
    probed, probe = with_probe(model)
    patched = todo(node, probed, mode="manual", depth_1_factor=1.5, depth_2_factor=1.5, depth_3_factor=1.5)
    if kind == "sd15":
        (patch,) = patched.model_options["transformer_options"]["patches"]["attn1_patch"]
        module, name = pack_module(patch, "downsample"), "nearest_indices"
    else:
        module, name = pack_module(patched.model_options["transformer_options"][OVERRIDE_KEY], "dit"), "select_keys"
    used: list[tuple[torch.device, tuple[torch.device, ...]]] = []
    original = getattr(module, name)

    def recorded(*args, **kwargs):
        result = original(*args, **kwargs)
        tensors = (result,) if isinstance(result, torch.Tensor) else (result.indices, result.log_group_size)
        used.append((torch.device(args[2]), tuple(t.device for t in tensors)))
        return result

    monkeypatch.setattr(module, name, recorded)
    out = render(kind, patched)
    assert torch.isfinite(out).all()
    on_cpu = probe.kv_by_grid()
    assert on_cpu != PLAIN_KV[kind], "ToDo acts at factor 1.5"
    assert used and set(used) == {(torch.device("cpu"), (torch.device("cpu"),) * len(used[0][1]))}

    probe.calls.clear()
    used.clear()
    patched.model.to("meta")  # the same model and ToDo instance, moved after a render
    out = meta_forward(kind, patched)
    meta = torch.device("meta")
    assert out.device == meta and out.shape[-2:] == (LATENT[kind], LATENT[kind])
    assert probe.kv_by_grid() == on_cpu
    assert {d for c in probe.calls for d in c.devices} == {meta}, "keys, values and mask on the model's device"
    assert used and all(requested == meta and set(devices) == {meta} for requested, devices in used)
