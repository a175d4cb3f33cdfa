"""Model-level benchmark inside ComfyUI: one sampler step on a full-size UNet, unpatched and patched.

Run as a child process by ``python -m todo_core.bench`` (one process per
attention backend, because ComfyUI picks its backend at import):

    python benchmarks/comfyui_level.py --comfyui ~/comfy/ComfyUI --attention pytorch \
        --model sd15 --size 1024x1024 --settings unpatched todo-auto tome-0.5 --out result.json

The UNet has the full SD1.5 or SDXL architecture with seeded random weights,
built in memory (no checkpoint file). Each setting patches the same base model
with the real nodes (this pack's ToDoModelPatch through ComfyUI's custom-node
loader, ComfyUI's TomePatchModel and HyperTile) and runs one Euler step with
CFG 7 through ``comfy.sample.sample``, all settings side by side in one process.

``--interleave`` warms up at the size measured and runs the settings in rounds
(one render of each per repeat). ``--steps N`` runs an N-step render instead (seconds per step = the render's
time / N): fidelity mode measures on the first step of each noise band, so its
cost shows only over several steps. Each render's calibration (fidelity mode,
or ``report_error``) is read where the node closes it: the seconds it spent
measuring, its decisions and its report line go into the row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
if str(PACK_ROOT) not in sys.path:
    sys.path.append(str(PACK_ROOT))

from todo_core.bench.memory import measure_peak  # noqa: E402  (after the path set-up above)

FULL_UNETS = {
    "sd15": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_resblock": False, "use_temporal_attention": False,
    },
    "sdxl": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_resblock": False, "use_temporal_attention": False,
    },
}  # fmt: skip

SETTINGS = {
    "unpatched": None,
    "todo-auto": ("todo", {}),
    "todo-2": ("todo", {"mode": "manual", "depth_1_factor": 2.0, "depth_2_factor": 1.0, "depth_3_factor": 1.0}),
    "todo-3": ("todo", {"mode": "manual", "depth_1_factor": 3.0, "depth_2_factor": 1.0, "depth_3_factor": 1.0}),
    "todo-4-2": ("todo", {"mode": "manual", "depth_1_factor": 4.0, "depth_2_factor": 2.0, "depth_3_factor": 1.0}),
    "todo-1.5-all": ("todo", {"mode": "manual", "depth_1_factor": 1.5, "depth_2_factor": 1.5, "depth_3_factor": 1.5}),
    "todo-2-all": ("todo", {"mode": "manual", "depth_1_factor": 2.0, "depth_2_factor": 2.0, "depth_3_factor": 2.0}),
    "todo-3-all": ("todo", {"mode": "manual", "depth_1_factor": 3.0, "depth_2_factor": 3.0, "depth_3_factor": 3.0}),
    "todo-4-all": ("todo", {"mode": "manual", "depth_1_factor": 4.0, "depth_2_factor": 4.0, "depth_3_factor": 4.0}),
    "todo-auto-report": ("todo", {"report_error": True}),
    **{
        f"todo-fidelity-{budget}": ("todo", {"mode": "fidelity", "max_error": float(budget)})
        for budget in ("0.01", "0.02", "0.03", "0.05", "0.08")
    },
    "tome-0.5": ("TomePatchModel", {"ratio": 0.5}),
    "hypertile-256": ("HyperTile", {"tile_size": 256, "swap_size": 2, "max_depth": 0, "scale_depth": False}),
    # The official comfy-todo node, when its checkout is given with --peer (never shipped with this pack).
    "comfy-todo-2": ("ToDoPatchModel", {"downsample_factor_depth_1": 2.0, "downsample_factor_depth_2": 1.0}),
    "comfy-todo-4-2": ("ToDoPatchModel", {"downsample_factor_depth_1": 4.0, "downsample_factor_depth_2": 2.0}),
}


def set_up_comfyui(root: Path, attention: str, peers: list[Path]):
    sys.path.insert(0, str(root))
    import comfy.cli_args
    import torch

    args = comfy.cli_args.args
    args.cpu = not torch.cuda.is_available()
    args.use_pytorch_cross_attention = attention == "pytorch"
    args.use_quad_cross_attention = attention == "sub-quad"
    import comfy.ldm.modules.attention as attention_module
    import comfy.model_management

    import nodes

    for pack in (PACK_ROOT, *peers):
        assert asyncio.run(nodes.load_custom_node(str(pack), module_parent="custom_nodes")), f"cannot load {pack}"
    return attention_module.optimized_attention.__name__, comfy.model_management.get_torch_device()


def build_model(kind: str, device, dtype):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    config_class = comfy.supported_models.SD15 if kind == "sd15" else comfy.supported_models.SDXL
    config = config_class({**FULL_UNETS[kind], "dtype": dtype})
    config.set_inference_dtype(dtype, None)
    model_class = comfy.model_base.BaseModel if kind == "sd15" else comfy.model_base.SDXL
    model = model_class(config, device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for parameter in model.diffusion_model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def patched(base, setting: str, todo_native: int | None = None):
    import importlib

    import nodes

    if SETTINGS[setting] is None:
        return base
    node_id, inputs = SETTINGS[setting]
    if node_id == "todo":
        node_class = nodes.NODE_CLASS_MAPPINGS["ToDoModelPatch"]
        if todo_native:
            inputs = {**inputs, "native_resolution": todo_native}
    elif node_id == "ToDoPatchModel":  # a V1 node: an instance and its FUNCTION
        node_class = nodes.NODE_CLASS_MAPPINGS[node_id]
        return getattr(node_class(), node_class.FUNCTION)(base, **inputs)[0]
    else:
        module = {"TomePatchModel": "comfy_extras.nodes_tomesd", "HyperTile": "comfy_extras.nodes_hypertile"}[node_id]
        node_class = getattr(importlib.import_module(module), node_id)
    output = node_class.execute(base, **inputs)
    return output.result[0] if hasattr(output, "result") else output[0]


class CalibrationLog:
    """Every calibration the pack's node closes (one per render), read where ``CalibrationStore.close`` runs.

    The pack's modules are loaded by ComfyUI's custom-node loader under its own
    package name, and may also be importable as ``todo_core``: every loaded copy
    of the calibration module is wrapped.
    """

    def __init__(self) -> None:
        self.closed: list = []
        for name, module in list(sys.modules.items()):
            store = getattr(module, "CalibrationStore", None)
            if name.endswith("todo_core.calibrate") and store is not None and not hasattr(store.close, "logged"):
                store.close = self._wrap(store.close)

    def _wrap(self, close):
        def logged(store, calibration):
            self.closed.append(calibration)
            return close(store, calibration)

        logged.logged = True
        return logged

    def take(self) -> list:
        closed, self.closed = self.closed, []
        return closed


def calibration_fields(closed: list) -> dict:
    """What a row records of its renders' calibrations: measuring seconds, decisions and the report line."""
    if not closed:
        return {}
    last = closed[-1]
    decisions = [{"depth": key.group[1] if key.group and key.group[0] == "depth" else None,
                  "layer": repr(key.layer), "grid": list(key.grid), "band": key.band, "branch": list(key.branch),
                  "factor": m.factor, "error": m.error, "kept": m.kept, "tokens": m.tokens, "measured": m.measured,
                  "rejected_error": m.rejected_error}
                 for key, m in last.decisions.items()]  # fmt: skip
    return {
        "calibration_seconds": [c.seconds for c in closed],
        "calibration_decisions": decisions,
        "calibration_bands": sorted({d["band"] for d in decisions}),
        "calibration_report": last.report(),
        "calibration_failures": last.failures,
    }


def one_step(model, latent_hw, seed: int, steps: int = 1):
    import comfy.sample
    import torch

    generator = torch.Generator().manual_seed(seed)
    context_dim = model.model.model_config.unet_config["context_dim"]
    extra = {"pooled_output": torch.randn(1, 1280, generator=generator)} if model.model.adm_channels else {}
    positive = [[torch.randn(1, 77, context_dim, generator=generator), dict(extra)]]
    negative = [[torch.randn(1, 77, context_dim, generator=generator), dict(extra)]]
    latent = torch.zeros(1, 4, *latent_hw)
    noise = torch.randn(latent.shape, generator=generator)
    return comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True)
    parser.add_argument("--attention", choices=["pytorch", "sub-quad"], required=True)
    parser.add_argument("--model", choices=sorted(FULL_UNETS), required=True)
    parser.add_argument("--size", required=True, help="WIDTHxHEIGHT in pixels")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="one warm-up render at the size measured, then the settings in rounds (the last round writes the rows)",
    )
    parser.add_argument("--steps", type=int, default=1, help="sampler steps per render (seconds are per step)")
    parser.add_argument(
        "--todo-native",
        type=int,
        default=None,
        help="native_resolution given to this pack's node (auto mode's reference; default: detect)",
    )
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--peer", type=Path, action="append", default=[], help="another node pack to load")
    args = parser.parse_args(argv)

    import torch

    backend, device = set_up_comfyui(args.comfyui, args.attention, args.peer)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    width, height = (int(v) for v in args.size.lower().split("x"))
    latent_hw = (height // 8, width // 8)
    base = build_model(args.model, device, dtype)
    one_step(base, (16, 16), seed=0)  # warm-up: lazy initialisation off the clock
    log = CalibrationLog()

    if args.interleave:
        one_step(base, latent_hw, seed=0)  # warm-up at the size measured: its buffers too are off the clock
    models = {setting: patched(base, setting, args.todo_native) for setting in args.settings}
    seconds: dict[str, list[float]] = {setting: [] for setting in args.settings}
    peaks: dict[str, list] = {setting: [] for setting in args.settings}
    closed: dict[str, list] = {setting: [] for setting in args.settings}

    def measure(setting: str, repeat: int) -> None:
        log.take()
        start = time.perf_counter()
        _, peak = measure_peak(lambda: one_step(models[setting], latent_hw, seed=1 + repeat, steps=args.steps), device)
        seconds[setting].append((time.perf_counter() - start) / args.steps)
        peaks[setting].append(peak)
        closed[setting] += log.take()

    if args.interleave:  # every setting once per round: a load that drifts during the run spreads over all of them
        for repeat in range(args.repeats - 1):
            for setting in args.settings:
                measure(setting, repeat)
    rows = []
    for setting in args.settings:
        for repeat in range(args.repeats - 1 if args.interleave else 0, args.repeats):
            measure(setting, repeat)
        rows.append({
            "level": "model", "model": args.model, "size": args.size, "setting": setting, "backend": backend,
            "attention": args.attention, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
            "seconds": statistics.median(seconds[setting]), "runs": seconds[setting],
            "peak_bytes": max((p for p in peaks[setting] if p is not None), default=None),
            **({"steps": args.steps} if args.steps != 1 else {}),
            **({"todo_native": args.todo_native} if args.todo_native else {}),
            **({"interleaved": True} if args.interleave else {}),
            **calibration_fields(closed[setting]),
        })  # fmt: skip
        args.out.write_text(json.dumps(rows, indent=2))
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
