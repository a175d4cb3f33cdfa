"""Model-level DiT benchmark inside ComfyUI: seconds per sampler step, unpatched and with ToDo, side by side.

    python benchmarks/dit_level.py --out bench-results/dit-model [--sizes 1024 2048] [--models flux sd3]

Each model is built in memory from ComfyUI's own classes (``comfy.supported_models`` config +
``comfy.model_base`` model, as a checkpoint loader would) with seeded random weights
``normal(0, 0.02)``, full width but only a few blocks:

* flux: Flux dev's width (hidden 3072 = 24 heads x 128, mlp_ratio 4, axes_dim [16, 56, 56],
  guidance embedding, qkv bias, 16 latent channels, T5 context 4096 wide, pooled CLIP 768) with
  1 double block + 1 single block instead of 19 + 38; 512 text tokens (Flux dev's T5 length).
* sd3: SD3.5 medium's width (hidden 1536 = 24 heads x 64, rms qk-norm, pos_embed_max_size 384,
  pooled 2048, context 4096 -> 1536) with ``num_blocks=2`` joint blocks instead of 24: block 0
  carries SD3.5's extra image-only self-attention (as blocks 0-12 of SD3.5 medium do), block 1 is
  the final ``pre_only`` block; 333 text tokens (77 CLIP + 256 T5).

Times are therefore those of a few-block model, not of the full one. Carrying the speed-up over to
the full model assumes that a full step costs the fixed part measured here (embedders, final layer,
unpatchify) plus block count x per-block time, each block doing the per-token work of the blocks run
here; the fixed part being a larger share here, the full model's speed-up would then be no lower.
One Euler step through ``comfy.sample.sample`` with
CFG 1 for both models (one model call per step: Flux dev's real use, with guidance 3.5 embedded;
SD3 is used with CFG > 1, which doubles both the patched and the unpatched time alike).

Settings, all built through the real ``ToDoModelPatch`` node loaded by ComfyUI's custom-node loader:
unpatched; ToDo auto (node defaults); ToDo manual factor 2; ToDo manual factor 2 without mass
correction (the registered override's ``mass_correction`` set to False: no attention mask). A
recording probe registered on the base model before the node (ToDo keeps it as its inner override)
counts the keys every attention call really gets, in every setting alike.

Checks: ToDo factor 2 output finite and different from unpatched; ToDo auto at the native size and
manual factor 1 bit-for-bit equal to unpatched. Progress goes to stderr; results.json and
results.md go to --out, rewritten after every measured setting.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = Path(os.environ.get("COMFYUI_PATH", "~/comfy/ComfyUI")).expanduser()
OVERRIDE_KEY = "optimized_attention_override"
SEED = 0
CFG = 1.0
LATENT_SCALE = 8

log = logging.getLogger("dit_level")

FLUX = {
    "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True,
}  # fmt: skip
SD3 = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 24, "num_blocks": 2, "input_size": None,
    "adm_in_channels": 2048, "pos_embed_max_size": 384, "num_patches": 384 * 384, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
    "qk_norm": "rms", "x_block_self_attn_layers": [0],
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    config: dict
    text_tokens: int
    pooled: int
    blocks: str


MODELS = {
    "flux": ModelSpec(FLUX, 512, 768, "1 double + 1 single block (full Flux dev: 19 + 38), hidden 3072"),
    "sd3": ModelSpec(SD3, 333, 2048, "2 joint blocks, block 0 with image self-attn (full SD3.5 M: 24), hidden 1536"),
}
TODO_2 = {"mode": "manual", "depth_1_factor": 2.0}
SETTINGS = {
    "unpatched": None,
    "todo-auto": {},
    "todo-2": TODO_2,
    "todo-2-no-mass-correction": TODO_2,
}


class Probe:
    """``optimized_attention_override`` that records each call's query and key lengths, then attends."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bool]] = []

    def __deepcopy__(self, memo):
        return self  # ComfyUI deep-copies model_options: every copy must record here

    def __call__(self, attention, q, k, v, *args, **kwargs):
        sequence_dim = 2 if kwargs.get("skip_reshape", False) else 1
        mask = args[1] if len(args) >= 2 else kwargs.get("mask")
        self.calls.append((q.shape[sequence_dim], k.shape[sequence_dim], mask is not None))
        return attention(q, k, v, *args, **kwargs)


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


def build_model(name: str, device):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    import torch
    from comfy.ldm.flux.model import FluxParams

    spec = MODELS[name]
    unet_config = dict(spec.config)
    if name == "flux":
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
            unet_config["txt_ids_dims"] = []
        config_class, model_class = comfy.supported_models.Flux, comfy.model_base.Flux
    else:
        config_class, model_class = comfy.supported_models.SD3, comfy.model_base.SD3
    config = config_class({**unet_config, "dtype": torch.float32})
    config.set_inference_dtype(torch.float32, None)
    model = model_class(config, device=device)
    generator = torch.Generator(device="cpu").manual_seed(SEED)
    with torch.no_grad():
        for parameter in model.diffusion_model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    probe = Probe()
    options = patcher.model_options.setdefault("transformer_options", {})
    options[OVERRIDE_KEY] = probe
    return patcher, probe


def patched(base, setting: str, inputs: dict | None = None):
    import nodes

    inputs = SETTINGS[setting] if inputs is None else inputs
    if inputs is None:
        return base
    output = nodes.NODE_CLASS_MAPPINGS["ToDoModelPatch"].execute(base, **inputs)
    model = output.result[0] if hasattr(output, "result") else output[0]
    if setting.endswith("no-mass-correction"):
        override = model.model_options["transformer_options"][OVERRIDE_KEY]
        assert type(override).__name__ == "ToDoAttentionOverride", override
        override.mass_correction = False
    return model


def one_step(model, name: str, side_px: int, seed: int):
    import comfy.sample
    import torch

    spec = MODELS[name]
    generator = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, spec.text_tokens, 4096, generator=generator),
                 {"pooled_output": torch.randn(1, spec.pooled, generator=generator)}]]  # fmt: skip
    negative = [[torch.zeros(1, spec.text_tokens, 4096), {"pooled_output": torch.zeros(1, spec.pooled)}]]
    latent = torch.zeros(1, 16, side_px // LATENT_SCALE, side_px // LATENT_SCALE)
    noise = torch.randn(latent.shape, generator=generator)
    return comfy.sample.sample(model, noise, 1, CFG, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=seed)  # fmt: skip


def kv_summary(calls: list[tuple[int, int, bool]]) -> list[dict]:
    """Distinct (query, key, masked) shapes of the attention calls of one step, with their counts."""
    counts: dict[tuple[int, int, bool], int] = {}
    for call in calls:
        counts[call] = counts.get(call, 0) + 1
    return [{"q_tokens": q, "kv_tokens": k, "masked": m, "calls": n} for (q, k, m), n in sorted(counts.items())]


def check_identities(name: str, base, probe, checks: dict) -> None:
    """Manual factor 1 must be unpatched bit for bit (at a small size: cheap)."""
    import torch

    side = 256
    reference = one_step(base, name, side, seed=SEED + 100)
    factor_1 = one_step(patched(base, "todo-1", {"mode": "manual", "depth_1_factor": 1.0}), name, side, SEED + 100)
    equal = bool(torch.equal(reference, factor_1))
    checks[f"{name} {side}² manual factor 1 == unpatched (bit for bit)"] = equal
    assert equal, f"{name}: ToDo manual factor 1 differs from unpatched"
    probe.calls.clear()


def measure(name: str, side: int, base, probe, repeats: int, backend: str, meta: dict, checks: dict) -> list[dict]:
    import torch

    models = {setting: patched(base, setting) for setting in SETTINGS}
    seconds: dict[str, list[float]] = {s: [] for s in SETTINGS}
    calls: dict[str, list] = {}
    outputs: dict[str, torch.Tensor] = {}
    for repeat in range(repeats):
        order = list(SETTINGS) if repeat % 2 == 0 else list(reversed(SETTINGS))
        for setting in order:
            probe.calls.clear()
            start = time.perf_counter()
            out = one_step(models[setting], name, side, seed=SEED + 1)
            elapsed = time.perf_counter() - start
            seconds[setting].append(elapsed)
            calls[setting] = kv_summary(probe.calls)
            outputs[setting] = out
            log.info("%s %d² %s: %.1f s (repeat %d)", name, side, setting, elapsed, repeat + 1)
    reference = outputs["unpatched"]
    for setting in ("todo-2", "todo-2-no-mass-correction"):
        finite = bool(torch.isfinite(outputs[setting]).all())
        differs = not torch.equal(outputs[setting], reference)
        rel = float((outputs[setting] - reference).norm() / reference.norm())
        checks[f"{name} {side}² {setting}: finite, differs from unpatched"] = finite and differs
        checks[f"{name} {side}² {setting}: relative difference of the stepped latent"] = round(rel, 6)
        assert finite, f"{name} {side}² {setting}: output not finite"
        if not differs:
            log.error("%s %d² %s: output equals unpatched: ToDo did not act", name, side, setting)
    auto_reduces = any(c["kv_tokens"] < c["q_tokens"] for c in calls["todo-auto"])
    if not auto_reduces:  # no-op through the override: must be unpatched exactly
        equal = bool(torch.equal(outputs["todo-auto"], reference))
        checks[f"{name} {side}² todo-auto (no-op here) == unpatched (bit for bit)"] = equal
        assert equal, f"{name} {side}²: ToDo auto reduces nothing yet differs from unpatched"
    base_seconds = statistics.median(seconds["unpatched"])
    rows = []
    for setting in SETTINGS:
        median = statistics.median(seconds[setting])
        rows.append({
            "level": "model-dit", "model": name, "size": f"{side}x{side}", "setting": setting,
            "seconds_per_step": median, "runs": seconds[setting], "speedup": base_seconds / median,
            "attention_calls": calls[setting], "blocks": MODELS[name].blocks, "text_tokens": MODELS[name].text_tokens,
            "backend": backend, "torch": meta["torch"], "cpu": meta["cpu"], "dtype": "float32", "cfg": CFG,
            "load_average_1min": os.getloadavg()[0],
        })  # fmt: skip
    return rows


STACK_NOTE = (
    "Few-block models: nothing here times the full model. Carrying the speed-up over to it assumes that a full "
    "step takes the time of the fixed part measured here (embedders, final layer, unpatchify: once per step, "
    "alike with and without ToDo) plus the block count (19 + 38 for Flux dev, 24 for SD3.5 M) times the per-block "
    "time, every block doing the per-token work of the blocks run here. Under that assumption the full model's "
    "speed-up is at least the one measured, since the fixed part is a larger share of these short stacks."
)
"""The full-stack assumption, stated in every results.md (and replacing older wording with --from-results)."""


def estimate_rows(rows: list[dict], target_side: int) -> list[dict]:
    """Fit ``t = a*N + b*N*K`` (N queries, K keys of the joint call) to the fastest unpatched runs at the two
    largest measured sizes, then predict every setting at ``target_side`` from its N and K (the auto mode's
    factor there follows the node's rule: 4 at 4096²). Ignores the mask's and the key gather's cost."""
    estimates = []
    by_key = {(r["model"], r["size"], r["setting"]): r for r in rows}
    for name in sorted({r["model"] for r in rows}):
        sides = sorted({int(r["size"].split("x")[0]) for r in rows if r["model"] == name})
        if len(sides) < 2:
            continue
        points = []
        for side in sides[-2:]:
            row = by_key[(name, f"{side}x{side}", "unpatched")]
            n = max(c["q_tokens"] for c in row["attention_calls"])
            points.append((n, n * n, min(row["runs"])))  # the fastest run: the least disturbed by other load
        (x1, y1, t1), (x2, y2, t2) = points
        det = x1 * y2 - x2 * y1
        a, b = (t1 * y2 - t2 * y1) / det, (x1 * t2 - x2 * t1) / det
        if a < 0 or b < 0:
            log.warning("%s: the measured times do not fit t = a*N + b*N^2 with a, b >= 0; no estimate", name)
            continue
        text = MODELS[name].text_tokens
        image = (target_side // LATENT_SCALE // 2) ** 2
        n = text + image
        unpatched = a * n + b * n * n
        for setting in SETTINGS:
            factor = {"unpatched": 1, "todo-auto": max(1, target_side // 1024)}.get(setting, 2)
            k = text + image // (factor * factor)
            seconds = a * n + b * n * k
            estimates.append({
                "level": "model-dit-estimate", "estimate": True, "model": name, "size": f"{target_side}x{target_side}",
                "setting": setting, "seconds_per_step": seconds, "kv_tokens": k, "q_tokens": n,
                "speedup": unpatched / seconds,
                "fit": f"unpatched t = a*N + b*N^2 through {sides[-2]}² and {sides[-1]}²: a={a:.3g} s, b={b:.3g} s",
            })  # fmt: skip
    return estimates


def markdown(meta: dict, rows: list[dict], estimates: list[dict], checks: dict) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['cpu']} · torch {meta['torch']} · {meta['device']} · float32 · "
        f"backend {meta['backend']} · command `{meta['command']}` · {meta['runtime_s']:.0f} s in all",
        "",
        "**DiT model level: seconds per Euler step (CFG 1, one model call) through ComfyUI, full-width "
        "random-weight models with a few blocks (per-block-pair times; see notes)**",
        "",
        "| model | blocks run | size | setting | s / step | speed-up | runs | keys per joint attention call |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        longest = max(c["q_tokens"] for c in row["attention_calls"])
        joint = [c for c in row["attention_calls"] if c["q_tokens"] == longest]
        keys = ", ".join(
            f"{c['kv_tokens']:,} of {c['q_tokens']:,}{' +mask' if c['masked'] else ''} ×{c['calls']}" for c in joint
        )
        runs = ", ".join(f"{s:.1f}" for s in row["runs"])
        lines.append(f"| {row['model']} | {row['blocks']} | {row['size']} | {row['setting']} | "
                     f"{row['seconds_per_step']:.2f} | {row['speedup']:.2f}× | {runs} | {keys} |")  # fmt: skip
    if estimates:
        lines += [
            "",
            "**ESTIMATE, not measured: 4096² extrapolated from the fastest unpatched runs at the two measured sizes "
            "(t = a·N + b·N·K, N queries, K keys per joint call; mask and gather costs ignored)**",
            "",
            "| model | size | setting | estimated s / step | estimated speed-up | keys (of queries) |",
            "|---|---|---|---|---|---|",
        ]
        for row in estimates:
            speedup = f"{row['speedup']:.2f}×" if row["speedup"] else "-"
            lines.append(f"| {row['model']} | {row['size']} | {row['setting']} | ~{row['seconds_per_step']:.0f} | "
                         f"{speedup} | {row['kv_tokens']:,} of {row['q_tokens']:,} |")  # fmt: skip
    lines += ["", "**Checks**", ""] + [f"- {name}: {value}" for name, value in checks.items()]
    lines += ["", "**Notes**", ""] + [f"- {note}" for note in meta["notes"]]
    return "\n".join(lines) + "\n"


def write(out: Path, meta: dict, rows: list[dict], checks: dict, start: float, final: bool) -> None:
    meta["runtime_s"] = time.perf_counter() - start
    meta["complete"] = final
    estimates = estimate_rows(rows, 4096) if final else []
    (out / "results.json").write_text(json.dumps({"meta": meta, "checks": checks, "rows": rows,
                                                  "estimates": estimates}, indent=2))  # fmt: skip
    (out / "results.md").write_text(markdown(meta, rows, estimates, checks))


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
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="square sides in pixels")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["flux", "sd3"])
    parser.add_argument("--comfyui", type=Path, default=DEFAULT_COMFYUI)
    parser.add_argument("--repeats", type=int, default=None, help="default: 2 up to 1024², 1 above")
    parser.add_argument("--note", action="append", default=[], help="a note to add to the results")
    parser.add_argument(
        "--from-results", type=Path, default=None, metavar="JSON",
        help="rewrite results.json and results.md (estimates included) from an earlier results.json; run nothing",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        earlier = json.loads(args.from_results.read_text())
        meta, rows, checks = earlier["meta"], earlier["rows"], earlier["checks"]
        meta["notes"] = [STACK_NOTE if note.startswith(("Per-block-pair times", "Few-block models")) else note
                         for note in meta["notes"]]  # fmt: skip
        meta["notes"] += [note for note in args.note if note not in meta["notes"]]
        write(args.out, meta, rows, checks, start - meta.get("runtime_s", 0.0), final=True)
        return 0

    import torch

    backend = set_up_comfyui(args.comfyui)
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    meta = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_name(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": device.type, "backend": backend, "cfg": CFG,
        "command": "python benchmarks/dit_level.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "notes": [
            "Random weights normal(0, 0.02), fp32, seed 0; full model width, few blocks: " + "; ".join(
                f"{name}: {spec.blocks}, {spec.text_tokens} text tokens" for name, spec in MODELS.items()),
            STACK_NOTE,
            "One Euler step, CFG 1 (a single model call) for both models; SD3 is used with CFG > 1, which "
            "doubles patched and unpatched time alike. Flux guidance 3.5 (embedded).",
            "Settings side by side in one process, order alternating between repeats; speed-up against "
            "unpatched of the same model and size in the same run.",
            "todo-auto: node defaults (no-op at 1024², factor 2 at 2048²). todo-2: mode manual, "
            "depth_1_factor 2. todo-2-no-mass-correction: the same with the registered override's "
            "mass_correction = False (no attention mask: the mask's cost is the difference).",
            "Keys per attention call counted by a recording override registered before the node (ToDo "
            "calls it with the keys it kept); it is present in every setting, unpatched included.",
            *args.note,
        ],
    }  # fmt: skip
    rows: list[dict] = []
    checks: dict = {}
    bases = {}
    noop: dict[str, int] = {}  # model -> size at which ToDo factor 2 left the output unchanged: larger ones skipped
    for side in sorted(args.sizes):
        for name in args.models:
            if name not in bases:
                log.info("building %s", name)
                base, probe = build_model(name, device)
                one_step(base, name, 256, seed=SEED)  # warm-up off the clock
                check_identities(name, base, probe, checks)
                bases[name] = (base, probe)
            base, probe = bases[name]
            if name in noop:
                checks[f"{name} {side}²: not measured"] = f"ToDo factor 2 was a no-op at {noop[name]}² (bug)"
                log.error("%s %d²: skipped, ToDo was a no-op at %d²", name, side, noop[name])
                continue
            repeats = args.repeats or (2 if side <= 1024 else 1)
            rows += measure(name, side, base, probe, repeats, backend, meta, checks)
            if not checks[f"{name} {side}² todo-2: finite, differs from unpatched"]:
                noop[name] = side
            write(args.out, meta, rows, checks, start, final=False)
    write(args.out, meta, rows, checks, start, final=True)
    log.info("done in %.0f s: %s", time.perf_counter() - start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
