"""Benchmark ToDo against exact attention and its peers: speed, memory and fidelity, side by side in one run.

    python -m todo_core.bench                      # attention + comfyui levels, quick preset (~20 min, 2 loaded cores)
    python -m todo_core.bench --levels dit-attention,dit-model      # the DiT levels (about 1 h, 2 quiet cores)
    python -m todo_core.bench --levels all --preset full            # every level, larger sizes (hours)

Levels (``--levels``, comma- or space-separated; default ``attention,comfyui``):

- ``attention``: one UNet self-attention layer (torch only): ToDo, ToMe, HyperTile and exact attention.
- ``dit-attention``: one DiT attention layer in each sequence layout (text first, image first, padded to 32,
  registers, video): ToDo with and without mass correction, fidelity and kernel time (torch only).
- ``routes``: the routes of the DiT mass correction (mask, folded head channel, log-sum-exp merge) on one joint
  layer: CPU time and error against the float64 oracle (torch only).
- ``comfyui`` (formerly ``model``): one sampler step through ComfyUI on full-size SD1.5/SDXL UNets.
- ``dit-model``: one sampler step through ComfyUI on full-width, few-block DiTs (Flux, SD3, Z-Image, Flux.2,
  Wan), unpatched, with ToDo, and at ToDo's zero-cost ceiling.
- ``fidelity``: fidelity mode against auto and manual factors on the SD1.5 and SDXL layers at twice their native
  resolution (photo tokens): speed and error of each model's layers, the comparisons at equal error and at equal
  speed, the calibration's cost in a 20-step render; then a few-step render per setting through ComfyUI, reading
  the calibration's own seconds (``fidelity/`` in the results folder).

Writes to a new folder, bench-results/runs/<date-time>/ (git-ignored): results.json, results.md and results.png
of the UNet levels, and dit-attention/ and dit-model/ beside them for the DiT levels; prints the tables. The
committed bench-results/ and the README's tables change only when asked: --update-readme (which then writes to
bench-results/ unless --out-dir says otherwise) or --out-dir bench-results. The attention levels need torch and
scikit-image (photographs); the comfyui and dit-model levels need a ComfyUI checkout (COMFYUI_PATH or
~/comfy/ComfyUI) and are skipped without one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..downsample import DownsampleMethod
from . import dit_attention, dit_model, fidelity_level, routes_level
from .attention_level import AttentionConfig, count_fidelity_steps, count_timing_steps, fidelity_rows, timing_rows
from .children import run_child
from .comfyui_path import ENABLE_HINT, PACK_ROOT, find_comfyui
from .dit_attention import DiTAttentionConfig
from .dit_model import DiTRun, parse_dit_run
from .peers import load_peers
from .report import markdown, plot, read_json, update_readme, write_json

MODEL_RUNNER = PACK_ROOT / "benchmarks" / "comfyui_level.py"
RESULTS_DIR = PACK_ROOT / "bench-results"
"""The committed results, which the README's generated tables show."""
RUNS_DIR = RESULTS_DIR / "runs"
"""Where a run writes by default: one new, git-ignored folder per run."""
README = PACK_ROOT / "README.md"
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""Large buffers are mmapped and given back on free, so the peak resident memory of each call is measurable."""


@dataclass(frozen=True)
class ModelRun:
    model: str
    size: str
    attention: str
    settings: tuple[str, ...]


LEVELS = ("attention", "dit-attention", "routes", "comfyui", "dit-model", "fidelity")
"""Every level, in the order a run measures them: the torch-only levels first, then those through ComfyUI."""
DEFAULT_LEVELS = ("attention", "comfyui")
LEVEL_NAMES = {"model": "comfyui"}
"""Former names ``--levels`` still accepts (``all`` names every level)."""
README_SECTIONS = {
    "dit-attention": "bench-dit",
    "routes": "bench-routes",
    "dit-model": "bench-dit-model",
    "fidelity": "bench-fidelity",
}
"""The README section each DiT level writes with --update-readme (the UNet levels: --readme-section)."""


ROUTES_DEFAULT = routes_level.RoutesConfig()
FidelityRun = fidelity_level.FidelityModelRun
FIDELITY_SETTINGS = ("unpatched", "todo-auto", "todo-4-2", "todo-fidelity-0.03", "todo-fidelity-0.08")
"""The model level's settings: auto (at twice the node's native resolution), manual (depths 1-2), fidelity."""
FIDELITY_QUICK = fidelity_level.FidelityConfig(
    model_runs=(FidelityRun("sd15", "256x256", FIDELITY_SETTINGS, steps=4, todo_native=128),)
)
FIDELITY_FULL = fidelity_level.FidelityConfig(
    scales=(2.0, 3.0), model_runs=(FidelityRun("sd15", "512x512", FIDELITY_SETTINGS, steps=6, todo_native=256),)
)


@dataclass(frozen=True)
class Preset:
    """Sizes and settings of every level."""

    attention: AttentionConfig
    comfyui: tuple[ModelRun, ...]
    dit_attention: DiTAttentionConfig
    dit_model: tuple[DiTRun, ...]
    routes: routes_level.RoutesConfig = ROUTES_DEFAULT
    fidelity: fidelity_level.FidelityConfig = FIDELITY_QUICK


PRESETS = {
    "quick": Preset(
        AttentionConfig(
            resolutions=(1024,),
            query_sample=1024,
            timed_factors=(1.5, 2.0, 2.5, 4.0),
            timed_methods=(DownsampleMethod.NEAREST,),
            repeats=2,
        ),
        (ModelRun("sd15", "512x512", "pytorch", ("unpatched", "todo-2", "tome-0.5", "hypertile-256")),),
        DiTAttentionConfig(),
        dit_model.RUNS["quick"],
    ),
    "full": Preset(
        AttentionConfig(
            resolutions=(1024, 1536, 2048),
            query_sample=2048,
            timed_resolutions=(1024, 1536),
            depth_1_only_timing=False,
        ),
        (
            ModelRun(
                "sd15", "1024x1024", "sub-quad", ("unpatched", "todo-auto", "todo-2", "tome-0.5", "hypertile-256")
            ),
            ModelRun("sd15", "1024x1024", "pytorch", ("unpatched", "todo-auto", "todo-2", "tome-0.5", "hypertile-256")),
            ModelRun("sd15", "2048x2048", "pytorch", ("unpatched", "todo-auto", "todo-4-2")),
            ModelRun("sdxl", "2048x2048", "pytorch", ("unpatched", "todo-auto")),
        ),
        DiTAttentionConfig(),
        dit_model.RUNS["full"],
        fidelity=FIDELITY_FULL,
    ),
    "tiny": Preset(  # for tests: seconds, not minutes
        AttentionConfig(
            models=("sd15",),
            resolutions=(256,),
            timed_resolutions=(256,),
            factors=(2.0,),
            timed_factors=(1.5, 2.0),
            photos=("astronaut",),
            query_sample=128,
            repeats=1,
            hypertile_tiles=(2,),
            tome_ratios=(0.5,),
        ),
        (ModelRun("sd15", "64x64", "pytorch", ("unpatched", "todo-2")),),
        DiTAttentionConfig(
            fidelity_grids=((11, 13),),
            other_layout_fidelity_grids=((11, 13),),
            video_grids=((6, 8),),
            factors=(2,),
            timing_grids=((12, 12),),
            other_layout_timing_grids=((12, 12),),
            timing_factors=(2,),
            photos=("astronaut",),
            repeats=1,
        ),
        dit_model.RUNS["tiny"],
        routes_level.RoutesConfig(grids=((11, 13),), factors=(2,), repeats=1),
        fidelity_level.FidelityConfig(
            models=("sd15",),
            scales=(0.5,),
            manual_factors=(2.0, 4.0),
            max_errors=(0.03, 0.3),
            photos=("astronaut",),
            query_sample=128,
            repeats=1,
            model_runs=(FidelityRun("sd15", "64x64", ("unpatched", "todo-fidelity-0.03"), steps=4, repeats=1),),
        ),
    ),
}


def parse_levels(values: Iterable[str]) -> tuple[str, ...]:
    """``--levels`` as given (comma- or space-separated, former names allowed) -> the levels, in run order."""
    names: set[str] = set()
    for value in values:
        for part in value.split(","):
            name = LEVEL_NAMES.get(part.strip(), part.strip())
            names.update(LEVELS if name == "all" else [name] if name else [])
    unknown = sorted(names - set(LEVELS))
    if unknown or not names:
        raise ValueError(f"unknown level(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(LEVELS)}, "
                         "or all")  # fmt: skip
    return tuple(level for level in LEVELS if level in names)


def parse_model_run(text: str) -> ModelRun:
    """``model:WIDTHxHEIGHT:attention:setting,setting`` (attention: pytorch or sub-quad)."""
    try:
        model, size, attention, settings = text.split(":")
    except ValueError:
        raise SystemExit(
            f"--model-runs entries look like sd15:1024x1024:sub-quad:unpatched,todo-2; got {text!r}"
        ) from None
    return ModelRun(model, size, attention, tuple(settings.split(",")))


class Progress:
    """A one-line progress bar on stderr (tqdm when it is installed)."""

    def __init__(self, total: int, label: str) -> None:
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, file=sys.stderr, leave=True)
        except ImportError:
            self._bar = None
        self.total, self.done, self.label = total, 0, label

    def step(self, note: str = "") -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(note[:40])
            self._bar.update(1)
        else:
            print(f"\r{self.label}: {self.done}/{self.total} {note[:40]}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)


def run_attention_level(config: AttentionConfig, device: torch.device, dtype: torch.dtype, peers) -> list[dict]:
    rows = _with_progress(
        fidelity_rows(config, device, dtype, peers), count_fidelity_steps(config), "attention fidelity"
    )
    return rows + _with_progress(
        timing_rows(config, device, dtype, peers), count_timing_steps(config), "attention timing"
    )


def _unet_layer(row: dict) -> str:
    return f"{row['model']} d{row['depth']} {row['resolution']}²"


def _with_progress(rows: Iterable[dict], total: int, label: str, unit: Callable[[dict], str] = _unet_layer):
    """Collect rows, advancing the bar each time a new unit (by default a layer: model, depth, resolution)
    starts or ends."""
    progress, collected, current = Progress(total, label), [], None
    for row in rows:
        name = unit(row)
        if current is not None and name != current:
            progress.step(current)
        current = name
        collected.append(row)
    if current is not None:
        progress.step(current)
    progress.close()
    return collected


def run_model_level(runs: tuple[ModelRun, ...], comfyui: Path, repeats: int, peers: list[Path]) -> list[dict]:
    rows: list[dict] = []
    progress = Progress(sum(len(r.settings) for r in runs), "model level")
    for run in runs:
        command = [sys.executable, str(MODEL_RUNNER), "--comfyui", str(comfyui), "--attention", run.attention,
                   "--model", run.model, "--size", run.size, "--repeats", str(repeats), "--settings", *run.settings,
                   *(arg for peer in peers for arg in ("--peer", str(peer)))]  # fmt: skip
        status, written = run_child(
            command,
            MMAP_ENV,
            lambda row, run=run: progress.step(f"{run.model} {run.size} {run.attention} {row['setting']}"),
        )
        if status != 0:
            raise SystemExit(f"the model-level run {run} failed (exit {status}): {' '.join(command)}")
        rows += written
    progress.close()
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m todo_core.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sizes and settings (default quick)")
    parser.add_argument(
        "--levels",
        nargs="+",
        default=list(DEFAULT_LEVELS),
        metavar="LEVEL",
        help=f"which levels to run, comma- or space-separated: {', '.join(LEVELS)}, or all "
        f"(default {','.join(DEFAULT_LEVELS)}; model is the comfyui level's former name)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where results go (default: a new folder bench-results/runs/<date-time>/, git-ignored; "
        "with --update-readme: the committed bench-results/); the DiT levels write to dit-attention/ and "
        "dit-model/ inside it",
    )
    parser.add_argument("--comfyui", type=Path, default=None, help="ComfyUI checkout (default: found automatically)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="comfyui and dit-model levels: runs per setting, median (default: 1; dit-model: 2 up to 1024², 1 above)",
    )
    parser.add_argument(
        "--peer",
        type=Path,
        action="append",
        default=[],
        help="comfyui level: another node pack to load (the official comfy-todo for its settings)",
    )
    parser.add_argument(
        "--model-runs",
        nargs="+",
        default=None,
        metavar="MODEL:SIZE:ATTENTION:SETTING,...",
        help="comfyui-level runs instead of the preset's, e.g. sd15:1024x1024:sub-quad:unpatched,todo-2",
    )
    parser.add_argument(
        "--dit-runs",
        nargs="+",
        default=None,
        metavar="MODEL:SIZE[,SIZE]:SETTING,...",
        help="dit-model runs instead of the preset's, e.g. flux2:2048x2048:unpatched,todo-2,ceiling-2 or "
        f"wan:1664x960x3 (latent frames); models: {', '.join(dit_model.MODELS)}",
    )
    parser.add_argument(
        "--reuse-attention",
        type=Path,
        default=None,
        metavar="JSON",
        help="fidelity level: take the attention part from an earlier fidelity results.json and run only the "
        "ComfyUI part",
    )
    parser.add_argument("--note", action="append", default=[], help="dit-model level: a note to add to its results")
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="replace the README's generated sections of the levels run (and, without --out-dir, the committed "
        "bench-results/)",
    )
    parser.add_argument(
        "--readme-section",
        default="bench",
        help="the README section of the attention and comfyui levels (default bench; the DiT levels write "
        + " and ".join(README_SECTIONS.values())
        + ")",
    )
    parser.add_argument(
        "--dit-model-section",
        default=README_SECTIONS["dit-model"],
        help="the README section the dit-model level writes (default %(default)s; a run of other models keeps "
        "its own section, e.g. bench-dit-families)",
    )
    parser.add_argument(
        "--from-results",
        type=Path,
        default=None,
        metavar="JSON",
        help="write tables, plot and README section from an earlier results.json of any level; run nothing",
    )
    args = parser.parse_args(argv)
    try:
        args.levels = parse_levels(args.levels)
    except ValueError as error:
        parser.error(f"--levels: {error}")
    args.dit_runs = tuple(parse_dit_run(text) for text in args.dit_runs) if args.dit_runs else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir = args.out_dir or default_out_dir(args.update_readme)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"results go to {args.out_dir}", file=sys.stderr)
    if args.from_results:
        return from_results(args)
    command = "python -m todo_core.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    preset = PRESETS[args.preset]
    ok = True
    if {"attention", "comfyui"} & set(args.levels):
        run_unet_levels(args, preset, command)
    if "dit-attention" in args.levels:
        run_dit_attention_level(args, preset.dit_attention, command)
    if "routes" in args.levels:
        run_routes_level(args, preset.routes, command)
    if "dit-model" in args.levels:
        ok = run_dit_model_level(args, args.dit_runs or preset.dit_model, command)
    if "fidelity" in args.levels:
        ok = run_fidelity_level(args, preset.fidelity, command) and ok
    return 0 if ok else 1


def base_meta(command: str) -> dict:
    """What every results file records of the run: when, where, with what, how busy the machine was."""
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".replace("  ", " "),
        "torch": torch.__version__,
        "command": command,
        "load_average_start": _load_average(),
    }


def _finish(meta: dict, started: float) -> None:
    meta["load_average_end"] = _load_average()
    meta["runtime_s"] = round(time.perf_counter() - started)


def run_unet_levels(args: argparse.Namespace, preset: Preset, command: str) -> None:
    """The attention and comfyui levels: results.json, results.md and results.png in the results folder."""
    started = time.perf_counter()
    config, runs = preset.attention, preset.comfyui
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    meta = {**base_meta(command), "device": device.type, "dtype": str(dtype).replace("torch.", ""),
            "preset": args.preset, "photos": len(config.photos)}  # fmt: skip
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    rows: list[dict] = []
    if "attention" in args.levels:
        peers = load_peers(args.comfyui)
        meta["peers"] = peers.source
        rows += run_attention_level(config, device, dtype, peers)
    if "comfyui" in args.levels:
        comfyui = args.comfyui or find_comfyui()
        if comfyui is None:
            print(f"comfyui level skipped: ComfyUI not found ({ENABLE_HINT})", file=sys.stderr)
        else:
            meta["comfyui"] = str(comfyui)
            if args.model_runs:
                runs = tuple(parse_model_run(text) for text in args.model_runs)
            rows += run_model_level(runs, comfyui, args.repeats or 1, args.peer)
    _finish(meta, started)
    write_json(args.out_dir / "results.json", meta, rows)
    publish(meta, rows, args.out_dir, args.update_readme and args.readme_section)


def run_dit_attention_level(args: argparse.Namespace, config: DiTAttentionConfig, command: str) -> None:
    """One DiT attention layer in every layout (torch, CPU, float32): dit-attention/ in the results folder."""
    started = time.perf_counter()
    meta = {**base_meta(command), "device": f"cpu ({torch.get_num_threads()} threads)", "dtype": "float32",
            "preset": args.preset, "photos": len(config.photos)}  # fmt: skip
    torch.manual_seed(0)
    fidelity_steps, timing_steps = dit_attention.count_steps(config)
    fidelity = dit_attention.summarise_fidelity(
        _with_progress(dit_attention.fidelity_rows(config), fidelity_steps, "DiT attention fidelity", _dit_unit)
    )
    timing = _with_progress(dit_attention.timing_rows(config), timing_steps, "DiT attention timing", _dit_grid)
    _finish(meta, started)
    write_dit_attention(args.out_dir / "dit-attention", meta, fidelity, timing, args.update_readme)


def run_routes_level(args: argparse.Namespace, config: routes_level.RoutesConfig, command: str) -> None:
    """The mass correction's routes on one joint layer (torch, CPU, float32): routes/ in the results folder."""
    started = time.perf_counter()
    meta = {**base_meta(command), "device": f"cpu ({torch.get_num_threads()} threads)", "preset": args.preset}
    results = _with_progress(
        routes_level.rows(config), routes_level.count_steps(config), "mass-correction routes",
        lambda row: f"{row['grid']} width {row['head_dim']}",
    )  # fmt: skip
    _finish(meta, started)
    write_routes(args.out_dir / "routes", meta, results, args.update_readme)


def write_routes(out: Path, meta: dict, results: list[dict], readme: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "routes": results}, indent=1))
    section = routes_level.markdown(meta, results)
    (out / "results.md").write_text(section)
    print(section)
    if readme:
        _update_readme(section, README_SECTIONS["routes"])


def run_fidelity_level(args: argparse.Namespace, config: fidelity_level.FidelityConfig, command: str) -> bool:
    """Fidelity mode against auto and manual (torch, CPU, float32), then through ComfyUI: fidelity/ in the results
    folder. False when a model-level run failed (what the attention level measured is kept)."""
    started = time.perf_counter()
    meta = {**base_meta(command), "device": f"cpu ({torch.get_num_threads()} threads)", "preset": args.preset,
            "photos": len(config.photos), "query_sample": config.query_sample, "repeats": config.repeats,
            "sampled_rows": fidelity_level.SAMPLED_ROWS, "candidates": list(fidelity_level.CANDIDATE_FACTORS),
            "headline_max_error": config.headline_max_error, "max_errors": list(config.max_errors),
            "manual_factors": list(config.manual_factors), "method": config.method.value}  # fmt: skip
    if args.reuse_attention:
        layers, timing = _earlier_attention_part(args.reuse_attention, meta)
    else:
        torch.manual_seed(0)
        with torch.no_grad():
            layers = _with_progress(fidelity_level.layer_rows(config), _count_fidelity_layers(config),
                                    "fidelity: factors and errors")  # fmt: skip
            timing = _with_progress(fidelity_level.timing_rows(config, layers), _count_fidelity_layers(config),
                                    "fidelity: timing")  # fmt: skip
    summary = fidelity_level.summarise(layers, timing)
    data = {"meta": meta, "layers": layers, "timing": timing, "summary": summary,
            "comparisons": fidelity_level.comparisons(summary),
            "render_cost": fidelity_level.render_cost(config, layers, timing), "model": []}  # fmt: skip
    ok = True
    comfyui = args.comfyui or find_comfyui()
    runs = config.model_runs
    if runs and comfyui is None:
        print(f"fidelity level: the ComfyUI part skipped: ComfyUI not found ({ENABLE_HINT})", file=sys.stderr)
    elif runs:
        meta["comfyui"] = str(comfyui)
        progress = Progress(sum(len(r.settings) for r in runs), "fidelity: model level")
        for run in runs:
            command_line = [sys.executable, str(MODEL_RUNNER), "--comfyui", str(comfyui), "--attention",
                            run.attention, "--model", run.model, "--size", run.size, "--steps", str(run.steps),
                            "--repeats", str(run.repeats), "--interleave", "--settings", *run.settings,
                            *(("--todo-native", str(run.todo_native)) if run.todo_native else ())]  # fmt: skip
            status, written = run_child(command_line, MMAP_ENV, lambda row: progress.step(row["setting"]))
            data["model"] += written or []
            if status != 0:
                print(f"fidelity level: the model-level run {run} failed (exit {status})", file=sys.stderr)
                ok = False
        progress.close()
    data["model_cost"] = fidelity_level.model_cost(data["model"])
    _finish(meta, started)
    write_fidelity(args.out_dir / "fidelity", data, args.update_readme)
    return ok


def _earlier_attention_part(path: Path, meta: dict) -> tuple[list[dict], list[dict]]:
    """The attention part of an earlier fidelity results file (layers and timing), its settings into ``meta`` and
    its command, date and duration into ``meta["attention_part"]``: the ComfyUI part alone is then run."""
    earlier = json.loads(path.read_text())
    old = earlier["meta"]
    settings = ("photos", "query_sample", "repeats", "sampled_rows", "candidates", "headline_max_error", "max_errors",
                "manual_factors", "method")  # fmt: skip
    meta.update({key: old[key] for key in settings if key in old})
    meta["attention_part"] = old.get("attention_part") or {
        key: old.get(key) for key in ("date", "command", "runtime_s", "load_average_start", "load_average_end")
    }
    return earlier["layers"], earlier["timing"]


def _count_fidelity_layers(config: fidelity_level.FidelityConfig) -> int:
    """Layers measured (model, resolution, depth): the progress bars' units."""
    return sum(len(fidelity_level.LAYER_SHAPES[m]) * len(config.resolutions(m)) for m in config.models)


def write_fidelity(out: Path, data: dict, readme: bool) -> None:
    """results.json, results.md and results.png of the fidelity level; its README section when asked."""
    out.mkdir(parents=True, exist_ok=True)
    data["model_cost"] = fidelity_level.model_cost(data.get("model", []))
    (out / "results.json").write_text(json.dumps(data, indent=1))
    plotted = fidelity_level.plot(data, out / "results.png")
    (out / "results.md").write_text(fidelity_level.markdown(data, "results.png" if plotted else None))
    print((out / "results.md").read_text())
    if readme:
        relative = out.resolve().relative_to(PACK_ROOT) if out.resolve().is_relative_to(PACK_ROOT) else out
        beside = relative.parent / "results.png"
        section = fidelity_level.markdown(
            data,
            f"{relative.as_posix()}/results.png" if plotted else None,
            beside.as_posix() if (PACK_ROOT / beside).is_file() else None,
        )
        _update_readme(section, README_SECTIONS["fidelity"])


def _dit_grid(row: dict) -> str:
    return f"{row['layout']} {row['grid']}"


def _dit_unit(row: dict) -> str:
    return f"{_dit_grid(row)} {row['photo']}"


def write_dit_attention(out: Path, meta: dict, fidelity: list[dict], timing: list[dict], readme: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "fidelity": fidelity, "timing": timing}, indent=1))
    section = dit_attention.markdown(meta, fidelity, timing)
    (out / "results.md").write_text(section)
    print(section)
    if readme:
        _update_readme(section, README_SECTIONS["dit-attention"])


def run_dit_model_level(args: argparse.Namespace, runs: tuple[DiTRun, ...], command: str) -> bool:
    """Full-width, few-block DiTs through ComfyUI, one child process per model: dit-model/ in the results folder.

    False when a model's run failed (what it measured before is kept, and the other models still run)."""
    comfyui = args.comfyui or find_comfyui()
    if comfyui is None:
        print(f"dit-model level skipped: ComfyUI not found ({ENABLE_HINT})", file=sys.stderr)
        return True
    started = time.perf_counter()
    out = args.out_dir / "dit-model"
    meta = {**base_meta(command), "comfyui": str(comfyui), "preset": args.preset}
    progress = Progress(sum(len(run.sizes) * len(run.settings) for run in runs), "DiT model level")

    def save(rows: list[dict], checks: dict, child_meta: dict, final: bool = False) -> str:
        meta.update(child_meta)
        meta["notes"] = dit_model.notes(rows, args.note)
        _finish(meta, started)
        return dit_model.write(out, meta, rows, checks, final)

    rows, checks, child_meta = dit_model.run_level(
        runs, comfyui, args.repeats, args.preset == "tiny", MMAP_ENV, progress.step, save
    )
    progress.close()
    if not rows:
        print("dit-model level: no model ran", file=sys.stderr)
        return False
    section = save(rows, checks, child_meta, final=True)
    print((out / "results.md").read_text())
    if args.update_readme:
        _update_readme(section, args.dit_model_section)
    return not any(name.endswith(": run failed") for name in checks)


def from_results(args: argparse.Namespace) -> int:
    """Tables, plot and README section of the level an earlier results.json holds; nothing is run."""
    data = json.loads(args.from_results.read_text())
    if "render_cost" in data:
        write_fidelity(args.out_dir / "fidelity", data, args.update_readme)
    elif "routes" in data:
        write_routes(args.out_dir / "routes", data["meta"], data["routes"], args.update_readme)
    elif "fidelity" in data:  # dit-attention
        write_dit_attention(args.out_dir / "dit-attention", data["meta"], data["fidelity"], data["timing"],
                            args.update_readme)  # fmt: skip
    elif "checks" in data:  # dit-model
        section = dit_model.regenerate(data, args.out_dir / "dit-model")
        print((args.out_dir / "dit-model" / "results.md").read_text())
        if args.update_readme:
            _update_readme(section, args.dit_model_section)
    else:
        meta, rows = read_json(args.from_results)
        publish(meta, rows, args.out_dir, args.update_readme and args.readme_section)
    return 0


def _update_readme(section: str, name: str) -> None:
    if not update_readme(README, section, name):
        print(f"README.md has no {name} markers; not updated", file=sys.stderr)


def _load_average() -> float | None:
    """The 1-minute load average: how busy the machine was (other work slows and spreads every timing)."""
    try:
        return round(os.getloadavg()[0], 1)
    except OSError:
        return None


def default_out_dir(update_readme: bool) -> Path:
    """The committed results when the README is to be updated (its tables link to them); else a new run folder."""
    if update_readme:
        return RESULTS_DIR
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, suffix = RUNS_DIR / stamp, 1
    while out.exists():
        suffix += 1
        out = RUNS_DIR / f"{stamp}-{suffix}"
    return out


def publish(meta: dict, rows: list[dict], out_dir: Path, readme_section: str | None) -> None:
    """results.md and results.png beside the results; and the README's generated section of that name, if any."""
    plot_written = plot(rows, out_dir / "results.png")
    section = markdown(meta, rows, "results.png" if plot_written else None)
    (out_dir / "results.md").write_text(section)
    print(section)
    if readme_section:
        relative = out_dir.resolve().relative_to(PACK_ROOT) if out_dir.resolve().is_relative_to(PACK_ROOT) else out_dir
        section_text = markdown(
            meta, rows, f"{relative.as_posix()}/results.png" if plot_written else None, compact=True
        )
        _update_readme(section_text, readme_section)


def _with_measurable_memory(argv: list[str]) -> None:
    """Re-run once with the allocator set so that freed buffers leave the resident set (Linux, glibc)."""
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, "-m", "todo_core.bench", *argv], {**os.environ, **MMAP_ENV})


if __name__ == "__main__":
    _with_measurable_memory(sys.argv[1:])
    sys.exit(main())
