"""Model-level DiT benchmark inside ComfyUI: one model, its sizes and settings, side by side in one process.

Run as a child process by ``python -m todo_core.bench --levels dit-model`` (one process per model):

    python benchmarks/dit_level.py --comfyui ~/comfy/ComfyUI --model flux2 --sizes 2048x2048 \
        --settings unpatched todo-2 ceiling-2 --out rows.json

Each model is built in memory from ComfyUI's own classes (its ``comfy.supported_models`` config and the
model it makes, as a checkpoint loader would) with seeded random weights ``normal(0, 0.02)`` (every parameter
and every buffer a checkpoint would hold), full width but only a few blocks (:data:`MODELS` says which). One
Euler step through ``comfy.sample.sample`` with CFG 1 (one model call per step).

Settings (see :mod:`todo_core.bench.dit_model`) are built through the real ``ToDoModelPatch`` node loaded by
ComfyUI's custom-node loader; a ``ceiling-*`` setting is the same node's model with its override replaced by
:class:`ZeroCostKeys`. A recording probe registered on the base model before the node (ToDo keeps it as its
inner override) counts the keys every attention call really gets, in every setting alike.

Checks: ToDo manual factor 1 bit-for-bit equal to unpatched; where ToDo acts, its output finite and different
from unpatched; ToDo auto, where it reduces nothing, equal to unpatched; each ceiling hands the backend as many
keys per call as the ToDo setting it bounds. A model ToDo does not support (yet) is measured all the same: its
ToDo rows then show every key, and the checks say that ToDo did not act.
Progress lines (one JSON row per measured setting) go to stdout; the rows, checks and meta go to ``--out``,
rewritten after every measured size.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PACK_ROOT = Path(__file__).resolve().parents[1]
if str(PACK_ROOT) not in sys.path:
    sys.path.append(str(PACK_ROOT))

from todo_core.bench.dit_model import DiTSetting, call_shapes  # noqa: E402  (after the path set-up above)
from todo_core.downsample import output_side, output_tokens  # noqa: E402

OVERRIDE_KEY = "optimized_attention_override"
SEED = 0
CFG = 1.0
TINY_CONTEXT, TINY_POOLED, TINY_TEXT = 32, 24, 8
"""``--tiny`` (tests): the text encoder's width, the pooled vector's width and the text length."""

log = logging.getLogger("dit_level")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A full-width, few-block member of a DiT family and the conditioning it takes."""

    config_class: str
    """``comfy.supported_models`` class."""
    unet_config: dict[str, Any]
    text_tokens: int
    context_dim: int
    pooled: int | None
    blocks: str
    tiny: dict[str, Any]
    """``--tiny``: config overrides for a narrow model of the same classes (tests)."""
    latent_scale: int = 8
    native_side: int | None = 1024


FLUX = {
    "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True,
}  # fmt: skip
FLUX2 = {
    **FLUX, "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
    "context_in_dim": 15360, "hidden_size": 6144, "mlp_ratio": 3.0, "num_heads": 48, "axes_dim": [32, 32, 32, 32],
    "theta": 2000, "patch_size": 1, "qkv_bias": False, "txt_ids_dims": [3], "global_modulation": True,
    "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0,
}  # fmt: skip
SD3 = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 24, "num_blocks": 2, "input_size": None,
    "adm_in_channels": 2048, "pos_embed_max_size": 384, "num_patches": 384 * 384, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
    "qk_norm": "rms", "x_block_self_attn_layers": [0],
}  # fmt: skip
ZIMAGE = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
    "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30,
    "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
    "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32,
}  # fmt: skip
WAN = {
    "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16,
    "dim": 1536, "ffn_dim": 8960, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 12,
    "num_layers": 2, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}  # fmt: skip
TINY_FLUX = {"hidden_size": 64, "num_heads": 2, "mlp_ratio": 2.0, "context_in_dim": TINY_CONTEXT}

MODELS = {
    "flux": ModelSpec("Flux", FLUX, 512, 4096, 768,
                      "1 double + 1 single block (full Flux dev: 19 + 38), hidden 3072",
                      {**TINY_FLUX, "axes_dim": [8, 12, 12], "vec_in_dim": TINY_POOLED}),
    "sd3": ModelSpec("SD3", SD3, 333, 4096, 2048,
                     "2 joint blocks, block 0 with image self-attn (full SD3.5 M: 24), hidden 1536",
                     {"depth": 2, "adm_in_channels": TINY_POOLED, "pos_embed_max_size": 64, "num_patches": 64 * 64,
                      "context_embedder_config": {"target": "torch.nn.Linear",
                                                  "params": {"in_features": TINY_CONTEXT, "out_features": 128}}}),
    "zimage": ModelSpec("ZImage", ZIMAGE, 100, 2560, None,
                        "1 layer + 1 noise-refiner + 1 context-refiner layer (full Z-Image: 30 + 2 + 2), hidden 3840",
                        {"dim": 256, "n_heads": 8, "n_kv_heads": 8, "axes_dims": [8, 12, 12], "multiple_of": 16,
                         "cap_feat_dim": TINY_CONTEXT}),
    "flux2": ModelSpec("Flux2", FLUX2, 512, 15360, 768,  # ComfyUI's Flux reads a pooled vector; Flux.2's ignores it
                       "1 double + 1 single block (full Flux.2 dev: 8 + 48), hidden 6144",
                       {**TINY_FLUX, "axes_dim": [8, 8, 8, 8]}, latent_scale=16),
    "wan": ModelSpec("WAN21_T2V", WAN, 512, 4096, None,
                     "2 blocks (full Wan 2.1 1.3B: 30), hidden 1536",
                     {"dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": TINY_CONTEXT, "num_heads": 2},
                     native_side=None),
}  # fmt: skip
"""Text tokens: Flux.2 512, the length its model pads them to; Z-Image 100, which its model pads to 128 with a
learned token; Wan 512, umT5's length."""


def tiny(spec: ModelSpec) -> ModelSpec:
    """The same classes, narrow: for tests."""
    return dataclasses.replace(
        spec,
        unet_config={**spec.unet_config, **spec.tiny},
        blocks=f"narrow test model ({spec.config_class} classes)",
        text_tokens=TINY_TEXT,
        context_dim=TINY_CONTEXT,
        pooled=TINY_POOLED if spec.pooled else None,
    )


class Probe:
    """``optimized_attention_override`` that records each call's query and key lengths, then attends."""

    passes_attention_masks = True  # ToDo's correction reaches it as a mask, as it reaches the backend

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bool]] = []

    def __deepcopy__(self, memo):
        return self  # ComfyUI deep-copies model_options: every copy must record here

    def __call__(self, attention, q, k, v, *args, **kwargs):
        sequence_dim = 2 if kwargs.get("skip_reshape", False) else 1
        mask = args[1] if len(args) >= 2 else kwargs.get("mask")
        self.calls.append((q.shape[sequence_dim], k.shape[sequence_dim], mask is not None))
        return attention(q, k, v, *args, **kwargs)


class ZeroCostKeys:
    """ToDo's ceiling: wherever ToDo would reduce a call, the backend gets the first keys and values of the kept
    length (a slice: no gather) and no correction mask; every other call is left as it is.

    ``todo`` is the override the node registered: its own ``plan`` decides which calls it reduces and to how
    many keys, so the ceiling follows ToDo to every family it supports, and its inner override (the probe)
    still sees every call.
    """

    holds_todo_override = True  # it stands in for ToDo's override: ToDo must not put its own back around it

    def __init__(self, todo) -> None:
        self.todo = todo

    def __deepcopy__(self, memo):
        return self

    def __call__(self, attention, *args, **kwargs):
        plan = self.todo.plan(args, kwargs)
        if plan is not None:
            layout, factor, temporal_factor = plan
            image = output_side(layout.frames, temporal_factor) * output_tokens(layout.height, layout.width, factor,
                                                                                 factor)  # fmt: skip
            kept = layout.prefix + image + layout.suffix
            q, k, v, *rest = args
            dim = 2 if kwargs.get("skip_reshape", False) else 1
            if len(rest) >= 2 and rest[1] is not None:  # the model's own mask, in its position
                rest[1] = _first_keys(rest[1], kept)
            elif kwargs.get("mask") is not None:
                kwargs = {**kwargs, "mask": _first_keys(kwargs["mask"], kept)}
            args = (q, k.narrow(dim, 0, kept), v.narrow(dim, 0, kept), *rest)
        inner = self.todo.inner
        return attention(*args, **kwargs) if inner is None else inner(attention, *args, **kwargs)


def _first_keys(mask, kept: int):
    """A model's own mask over the first ``kept`` keys (a mask broadcast over the keys stays as it is)."""
    return mask if mask.shape[-1] == 1 else mask.narrow(-1, 0, kept)


def set_up_comfyui(root: Path) -> str:
    sys.path.insert(0, str(root))
    import comfy.cli_args
    import torch

    args = comfy.cli_args.args
    args.cpu = not torch.cuda.is_available()
    args.use_pytorch_cross_attention = True  # SDPA, as --use-pytorch-cross-attention does
    import comfy.ldm.modules.attention as attention_module

    import nodes

    assert asyncio.run(nodes.load_custom_node(str(PACK_ROOT), module_parent="custom_nodes")), "cannot load the pack"
    return attention_module.optimized_attention.__name__


def build_model(spec: ModelSpec, device):
    """A ModelPatcher around the model the config class makes, drawn from the seed, with the probe registered."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    unet_config = dict(spec.unet_config)
    if unet_config.get("image_model") == "flux":
        from comfy.ldm.flux.model import FluxParams

        if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
            unet_config["txt_ids_dims"] = []
    config = getattr(comfy.supported_models, spec.config_class)({**unet_config, "dtype": torch.float32})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=device)
    generator = torch.Generator(device="cpu").manual_seed(SEED)
    parameters = list(model.diffusion_model.parameters())
    known = {id(parameter) for parameter in parameters}
    buffers = [t for _, t in sorted(model.diffusion_model.state_dict(keep_vars=True).items()) if id(t) not in known]
    with torch.no_grad():  # every tensor a checkpoint would hold: parameters, then buffers left uninitialised
        for tensor in parameters + [b for b in buffers if b.is_floating_point()]:  # (SD3's pos_embed)
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    probe = Probe()
    patcher.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = probe
    return patcher, probe


def todo_override(model):
    """The override ToDo registered on ``model``, or ``None`` where the node left the model alone."""
    override = model.model_options.get("transformer_options", {}).get(OVERRIDE_KEY)
    return override if type(override).__name__ == "ToDoAttentionOverride" else None


def todo_acts(model) -> bool:
    """ToDo's override (or the ceiling made from it) is registered: the node handles this model's family."""
    override = model.model_options.get("transformer_options", {}).get(OVERRIDE_KEY)
    return isinstance(override, ZeroCostKeys) or todo_override(model) is not None


def patched(base, setting: DiTSetting):
    import nodes

    inputs = setting.node_inputs()
    if inputs is None:
        return base
    output = nodes.NODE_CLASS_MAPPINGS["ToDoModelPatch"].execute(base, **inputs)
    model = output.result[0] if hasattr(output, "result") else output[0]
    override = todo_override(model)
    if override is None:
        return model  # not a family ToDo supports: the same model as unpatched
    if not setting.mass_correction:
        override.mass_correction = False
    if setting.kind == "ceiling":
        model.model_options["transformer_options"][OVERRIDE_KEY] = ZeroCostKeys(override)
    return model


def label(name: str, size: str) -> str:
    """``flux 1024²`` for a square image, ``wan 1664x960x3`` otherwise: how the checks name a run."""
    width, height, _ = parse_size(size)
    return f"{name} {width}²" if width == height and size.lower().count("x") == 1 else f"{name} {size}"


def parse_size(size: str) -> tuple[int, int, int]:
    """``WIDTHxHEIGHT[xFRAMES]`` -> (width, height, latent frames)."""
    width, height, *frames = (int(part) for part in size.lower().split("x"))
    return width, height, frames[0] if frames else 1


def one_step(model, spec: ModelSpec, size: str, seed: int):
    import comfy.sample
    import torch

    width, height, frames = parse_size(size)
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(1, spec.text_tokens, spec.context_dim, generator=generator)
    extra = {"pooled_output": torch.randn(1, spec.pooled, generator=generator)} if spec.pooled else {}
    positive = [[text, extra]]
    zeros = {key: torch.zeros_like(value) for key, value in extra.items()}
    negative = [[torch.zeros(1, spec.text_tokens, spec.context_dim), zeros]]
    latent_format = model.get_model_object("latent_format")
    grid = (height // spec.latent_scale, width // spec.latent_scale)
    video = (frames,) if latent_format.latent_dimensions == 3 else ()
    latent = torch.zeros(1, latent_format.latent_channels, *video, *grid)
    noise = torch.randn(latent.shape, generator=generator)
    return comfy.sample.sample(model, noise, 1, CFG, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=seed)  # fmt: skip


def kv_summary(calls: list[tuple[int, int, bool]]) -> list[dict]:
    """Distinct (query, key, masked) shapes of the attention calls of one step, with their counts."""
    counts: dict[tuple[int, int, bool], int] = {}
    for call in calls:
        counts[call] = counts.get(call, 0) + 1
    return [{"q_tokens": q, "kv_tokens": k, "masked": m, "calls": n} for (q, k, m), n in sorted(counts.items())]


def check_identity(name: str, spec: ModelSpec, base, probe, size: str, checks: dict) -> None:
    """Manual factor 1 must be unpatched bit for bit (at a small size: cheap)."""
    import torch

    reference = one_step(base, spec, size, seed=SEED + 100)
    factor_1 = one_step(patched(base, DiTSetting.parse("todo-1")), spec, size, SEED + 100)
    equal = bool(torch.equal(reference, factor_1))
    checks[f"{label(name, size)} manual factor 1 == unpatched (bit for bit)"] = equal
    assert equal, f"{name}: ToDo manual factor 1 differs from unpatched"
    probe.calls.clear()


def measure(name: str, spec: ModelSpec, size: str, base, probe, settings: list[DiTSetting], repeats: int,
            meta: dict, checks: dict) -> list[dict]:  # fmt: skip
    import torch

    models = {s.name: patched(base, s) for s in settings}
    acts = {s.name: todo_acts(models[s.name]) for s in settings if s.kind != "unpatched"}
    seconds: dict[str, list[float]] = {s.name: [] for s in settings}
    calls: dict[str, list] = {}
    outputs: dict[str, torch.Tensor] = {}
    for repeat in range(repeats):
        for setting in settings if repeat % 2 == 0 else list(reversed(settings)):
            probe.calls.clear()
            start = time.perf_counter()
            outputs[setting.name] = one_step(models[setting.name], spec, size, seed=SEED + 1)
            seconds[setting.name].append(time.perf_counter() - start)
            calls[setting.name] = kv_summary(probe.calls)
            log.info("%s %s %s: %.1f s (repeat %d)", name, size, setting.name, seconds[setting.name][-1], repeat + 1)
    record_checks(label(name, size), settings, outputs, calls, acts, checks)
    base_seconds = statistics.median(seconds["unpatched"]) if "unpatched" in seconds else None
    width, height, frames = parse_size(size)
    rows = []
    for setting in settings:
        median = statistics.median(seconds[setting.name])
        rows.append({
            "level": "model-dit", "model": name, "size": f"{width}x{height}", "frames": frames,
            "setting": setting.name, "kind": setting.kind, "todo_acts": acts.get(setting.name),
            "seconds_per_step": median, "runs": seconds[setting.name],
            "speedup": base_seconds / median if base_seconds else None, "attention_calls": calls[setting.name],
            "blocks": spec.blocks, "text_tokens": spec.text_tokens,
            "pixels_per_token": spec.latent_scale * _patch(spec), "native_side": spec.native_side,
            "backend": meta["backend"], "torch": meta["torch"], "cpu": meta["cpu"], "dtype": "float32", "cfg": CFG,
            "load_average_1min": os.getloadavg()[0],
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _patch(spec: ModelSpec) -> int:
    patch = spec.unet_config.get("patch_size", 2)
    return patch[-1] if isinstance(patch, (tuple, list)) else patch


def record_checks(label: str, settings, outputs, calls, acts, checks: dict) -> None:
    import torch

    reference = outputs.get("unpatched")
    by_name = {s.name: s for s in settings}
    for setting in settings:
        name, out = setting.name, outputs[setting.name]
        if setting.kind == "unpatched":
            continue
        finite = bool(torch.isfinite(out).all())
        assert finite, f"{label} {name}: output not finite"
        reduces = "unpatched" in calls and call_shapes(calls[name]) != call_shapes(calls["unpatched"])
        if not acts[name]:
            checks[f"{label} {name}: ToDo acts"] = "no: the node leaves this model unchanged (family not supported)"
            log.error("%s %s: ToDo does not act on this model", label, name)
        elif setting.kind == "todo" and reference is not None:
            if setting.factor is None and not reduces:  # auto, a no-op here: must be unpatched exactly
                equal = bool(torch.equal(out, reference))
                checks[f"{label} {name} (no-op here) == unpatched (bit for bit)"] = equal
                assert equal, f"{label}: ToDo auto reduces nothing yet differs from unpatched"
                continue
            differs = not torch.equal(out, reference)
            checks[f"{label} {name}: finite, differs from unpatched"] = finite and differs
            checks[f"{label} {name}: relative difference of the stepped latent"] = round(
                float((out - reference).norm() / reference.norm()), 6
            )
            if not differs:
                log.error("%s %s: output equals unpatched: ToDo did not act", label, name)
        elif setting.kind == "ceiling":
            bounded = [s.name for s in by_name.values() if s.kind == "todo" and s.factor == setting.factor]
            for other in bounded:
                same = call_shapes(calls[name]) == call_shapes(calls[other])
                checks[f"{label} {name}: the backend gets the keys {other} keeps, call by call"] = same


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.machine()} ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True)
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--sizes", nargs="+", required=True, help="WIDTHxHEIGHT or WIDTHxHEIGHTxFRAMES (video)")
    parser.add_argument("--settings", nargs="+", required=True, help="see todo_core.bench.dit_model")
    parser.add_argument("--repeats", type=int, default=None, help="default: 2 up to 1024², 1 above")
    parser.add_argument("--tiny", action="store_true", help="narrow models of the same classes (tests)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the rows, checks and meta")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    settings = [DiTSetting.parse(name) for name in args.settings]

    import torch

    backend = set_up_comfyui(args.comfyui)
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    meta = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": device.type, "backend": backend, "cfg": CFG}  # fmt: skip
    spec = tiny(MODELS[args.model]) if args.tiny else MODELS[args.model]
    rows: list[dict] = []
    checks: dict = {}
    log.info("building %s", args.model)
    base, probe = build_model(spec, device)
    small = "64x64" if args.tiny else "256x256"
    small += "x2" if base.get_model_object("latent_format").latent_dimensions == 3 else ""
    one_step(base, spec, small, seed=SEED)  # warm-up off the clock
    check_identity(args.model, spec, base, probe, small, checks)
    for size in args.sizes:
        width = parse_size(size)[0]
        repeats = args.repeats or (2 if width <= 1024 else 1)
        rows += measure(args.model, spec, size, base, probe, settings, repeats, meta, checks)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks}, indent=1))
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
