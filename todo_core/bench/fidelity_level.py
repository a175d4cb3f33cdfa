"""Fidelity mode against auto and manual factors: speed and attention error of whole models' layers, and its cost.

Attention level (torch only, photo tokens of :mod:`.tokens`, the SD1.5 and SDXL
shapes of :data:`.attention_level.LAYER_SHAPES`): for each depth of a model at
one resolution, the factor of every setting is found as the node finds it:

- ``exact``: no reduction;
- ``auto``: :meth:`ToDoConfig.factor_for` at the model's native resolution;
- ``manual xF``: factor F at every depth measured (1-3);
- ``fidelity E``: :func:`~todo_core.calibrate.choose_factor` on the layer's
  projected queries, keys and values, with the mode's own 64 stratified, seeded
  query rows (:func:`~todo_core.calibrate.sample_rows`, seeded by layer and grid),
  its candidates and ``max_error = E``: per photograph, as a render measures the
  image in front of it. The time ``choose_factor`` takes is the calibration's cost
  for one layer and noise band.

Each setting's error is then measured on a larger seeded sample of query rows
(every photograph) at the factor it chose, and the whole layer is timed at every
factor some setting uses, side by side in one run (median of interleaved
repeats): auto and manual through the attn1 patch's path (hidden states reduced,
then the q/k/v projections, then SDPA), fidelity through the attention override's
path that fidelity mode runs (q/k/v projected, keys and values reduced, SDPA).

A model's setting is its layers together: time summed over the depths measured
(one layer per depth), error averaged over the depths and photographs (the
largest depth's error is recorded too). Fidelity picks per layer, so it is compared
with the curve of the fixed settings (exact, manual x1.5 ... x4) at its own
error (equal error: the fixed curve's time there, interpolated linearly between
the two fixed settings around it) and at its own time (equal speed: the fixed
curve's error there).

The calibration's cost for a render: per depth, the median time of one
calibration, times the self-attention layers the full UNet has at that depth,
times the three noise bands; against the attention time of a 20-step render at
fidelity's factors (the same layers, 20 times). Batched CFG doubles both (one
calibration measures both halves of the batch). Through ComfyUI the render's
own ``Calibration.seconds`` is read at model level (:mod:`benchmarks.comfyui_level`).
"""

from __future__ import annotations

import importlib.util
import itertools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibrate import (
    CANDIDATE_FACTORS,
    NOISE_BANDS,
    SAMPLED_ROWS,
    SampledQueries,
    choose_factor,
    relative_error,
    sample_rows,
    stable_seed,
)
from ..config import ToDoConfig
from ..downsample import DownsampleMethod, downsample_tokens, output_tokens
from ..grid import TokenGrid
from ..patch import ToDoAttn1Patch
from ..unet_override import unet_selection
from .attention_level import LAYER_SHAPES, LayerShape, comfy_attention, grid_for, todo_patch
from .comfyui_path import PACK_ROOT
from .peers import IDENTITY
from .tokens import PHOTOS, AttentionLayer, attention_layer, photo_tokens

NATIVE = {"sd15": 512, "sdxl": 1024}
"""Training resolution of each model: auto mode's reference and the unit of the resolutions measured."""
ATTN1, OVERRIDE = "attn1", "override"
"""The two paths a reduced layer runs: the attn1 patch (auto, manual) and the attention override (fidelity)."""


@dataclass(frozen=True)
class FidelityModelRun:
    """One model-level run through ComfyUI: a few-step render per setting (``benchmarks/comfyui_level.py``)."""

    model: str
    size: str
    settings: tuple[str, ...]
    steps: int = 4
    todo_native: int | None = None
    """native_resolution given to the node (auto's reference), so that a small size stands for 2x native."""
    attention: str = "pytorch"
    repeats: int = 2
    """Renders per setting, in rounds of every setting (``--interleave``): the median is kept."""


@dataclass(frozen=True)
class FidelityConfig:
    models: tuple[str, ...] = ("sd15", "sdxl")
    scales: tuple[float, ...] = (2.0,)
    """Resolutions measured, in multiples of each model's native resolution."""
    manual_factors: tuple[float, ...] = (1.5, 2.0, 3.0, 4.0)
    max_errors: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.08, 0.12)
    headline_max_error: float = 0.03
    """The budget the headline figures and the render's cost are given for (the node's default)."""
    photos: tuple[str, ...] = PHOTOS
    query_sample: int = 2048
    repeats: int = 2
    render_steps: int = 20
    method: DownsampleMethod = DownsampleMethod.NEAREST
    model_runs: tuple[FidelityModelRun, ...] = field(default_factory=tuple)

    def resolutions(self, model: str) -> tuple[int, ...]:
        return tuple(int(NATIVE[model] * scale) for scale in self.scales)


# --- the settings' factors -------------------------------------------------------------------------------------


def setting_name(family: str, value: float | None = None) -> str:
    if family == "manual":
        return f"manual x{value:g}"
    if family == "fidelity":
        return f"fidelity {value:g}"
    return family


@dataclass(frozen=True)
class LayerInputs:
    """One layer at one resolution on one photograph: its hidden states, projections and projected q/k/v."""

    shape: LayerShape
    grid: TokenGrid
    hidden: torch.Tensor
    layer: AttentionLayer
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def of(cls, shape: LayerShape, resolution: int, photo: str) -> LayerInputs:
        height, width = grid_for(resolution, shape.depth)
        hidden = photo_tokens(photo, height, width, shape.channels)
        layer = attention_layer(hidden, shape.heads, shape.head_dim)
        grid = TokenGrid(height, width, shape.depth)
        return cls(shape, grid, hidden, layer, hidden @ layer.w_q, hidden @ layer.w_k, hidden @ layer.w_v)

    def reduce(self, patch: ToDoAttn1Patch) -> Callable[[float], tuple[torch.Tensor, torch.Tensor, None]]:
        """The override's reduction of the projected keys and values, as :mod:`todo_core.unet_override` calls it."""

        def reduce(factor: float) -> tuple[torch.Tensor, torch.Tensor, None]:
            _, k_small, v_small = patch.reduce(self.q, self.k, self.v, self.grid, factor, {})
            return k_small, v_small, None

        return reduce

    def kept(self, factor: float) -> int:
        return output_tokens(self.grid.height, self.grid.width, factor, factor)


def calibrate(inputs: LayerInputs, max_error: float, method: DownsampleMethod) -> tuple[float, float, float]:
    """Fidelity mode's decision for this layer: (factor, error on its 64 rows, seconds the decision took).

    The same call the override makes: the mode's rows (seeded by the layer and
    its grid), its candidates, its reduction of the projected keys and values.
    """
    patch = ToDoAttn1Patch(ToDoConfig.create("fidelity", method=method, max_error=max_error))
    grid = inputs.grid
    layer_id = (("bench", inputs.shape.model), inputs.shape.depth)
    started = time.perf_counter()
    rows = sample_rows(grid.tokens, SAMPLED_ROWS, stable_seed(layer_id, grid.height, grid.width))
    queries = SampledQueries.of(inputs.q, inputs.shape.heads, False, rows)
    decision = choose_factor(queries, inputs.k, inputs.v, None, inputs.reduce(patch), CANDIDATE_FACTORS, max_error,
                             inputs.kept, grid.tokens, unet_selection(method, grid, inputs.k.device))  # fmt: skip
    return decision.factor, decision.error, time.perf_counter() - started


def layer_rows(config: FidelityConfig) -> Iterator[dict]:
    """Per model, resolution, depth and photograph: each setting's factor and its error on the large row sample."""
    for model in config.models:
        for resolution in config.resolutions(model):
            for shape in LAYER_SHAPES[model]:
                yield from _layer(config, model, resolution, shape)


def _layer(config: FidelityConfig, model: str, resolution: int, shape: LayerShape) -> Iterator[dict]:
    auto = ToDoConfig.create("auto", method=config.method, native_resolution=NATIVE[model])
    patch = ToDoAttn1Patch(auto)
    for photo in config.photos:
        inputs = LayerInputs.of(shape, resolution, photo)
        grid = inputs.grid
        settings: list[tuple[str, float | None, float, dict]] = [
            ("exact", None, 1.0, {}),
            ("auto", None, auto.factor_for(grid), {}),
        ]
        settings += [("manual", f, f, {}) for f in config.manual_factors]  # fmt: skip
        for budget in config.max_errors:
            factor, sampled, seconds = calibrate(inputs, budget, config.method)
            settings.append(("fidelity", budget, factor, {"sampled_error": sampled, "calibration_s": seconds}))
        generator = torch.Generator().manual_seed(2)
        count = min(config.query_sample, grid.tokens)
        rows = torch.randperm(grid.tokens, generator=generator)[:count].sort().values
        queries = SampledQueries.of(inputs.q, shape.heads, False, rows)
        exact = queries.attend(inputs.k, inputs.v, None)
        reduce = inputs.reduce(patch)
        errors: dict[float, float] = {1.0: 0.0}
        for family, value, factor, extra in settings:
            if factor not in errors:
                errors[factor] = relative_error(queries.attend(*reduce(factor)), exact)
            yield {
                "model": model, "resolution": resolution, "depth": shape.depth, "grid": [grid.height, grid.width],
                "photo": photo, "family": family, "setting": setting_name(family, value), "value": value,
                "factor": factor, "kv_tokens": inputs.kept(factor), "tokens": grid.tokens, "error": errors[factor],
                "rows": count, **extra,
            }  # fmt: skip


# --- timing ------------------------------------------------------------------------------------------------------


def path_for(family: str, factor: float) -> str:
    """Fidelity mode's layers run through the override; unreduced ones run as exact attention does."""
    return OVERRIDE if family == "fidelity" and factor > 1.0 else ATTN1


def layer_call(inputs: LayerInputs, path: str, factor: float, method: DownsampleMethod) -> Callable[[], object]:
    """The whole layer (q/k/v projections, reduction, SDPA; no output projection) as the node's path runs it."""
    shape, grid, hidden, layer = inputs.shape, inputs.grid, inputs.hidden, inputs.layer
    if path == ATTN1:
        patch = IDENTITY if factor <= 1.0 else todo_patch((grid.height, grid.width), method, factor)

        def attn1() -> torch.Tensor:
            n, context, value = patch.before(hidden, hidden, hidden, {})
            return comfy_attention(n @ layer.w_q, context @ layer.w_k, value @ layer.w_v, shape.heads)

        return attn1

    def override() -> torch.Tensor:
        q, k, v = hidden @ layer.w_q, hidden @ layer.w_k, hidden @ layer.w_v
        k = downsample_tokens(k, grid.height, grid.width, factor, factor, method)
        v = downsample_tokens(v, grid.height, grid.width, factor, factor, method)
        return comfy_attention(q, k, v, shape.heads)

    return override


def timing_rows(config: FidelityConfig, layers: list[dict]) -> Iterator[dict]:
    """Every (path, factor) some setting uses on a layer, timed side by side: one warm-up, interleaved repeats."""
    needed: dict[tuple, set[tuple[str, float]]] = defaultdict(set)
    for row in layers:
        needed[(row["model"], row["resolution"], row["depth"])].add(
            (path_for(row["family"], row["factor"]), row["factor"])
        )
    for (model, resolution, depth), calls in needed.items():
        shape = next(s for s in LAYER_SHAPES[model] if s.depth == depth)
        inputs = LayerInputs.of(shape, resolution, config.photos[0])
        order = sorted(calls, key=lambda c: (c[1], c[0]))
        runs: dict[tuple[str, float], list[float]] = {c: [] for c in order}
        with torch.no_grad():
            layer_call(inputs, *order[-1], config.method)()  # warm-up on the cheapest call
            for _ in range(config.repeats):
                for path, factor in order:
                    call = layer_call(inputs, path, factor, config.method)
                    started = time.perf_counter()
                    call()
                    runs[(path, factor)].append(time.perf_counter() - started)
        for (path, factor), seconds in runs.items():
            yield {"model": model, "resolution": resolution, "depth": depth, "grid": [inputs.grid.height,
                   inputs.grid.width], "path": path, "factor": factor, "seconds": statistics.median(seconds),
                   "runs": seconds}  # fmt: skip


# --- summaries and comparisons -----------------------------------------------------------------------------------


def summarise(layers: list[dict], timing: list[dict]) -> list[dict]:
    """Per model, resolution and setting: time summed over the depths, error averaged (and max) over the depths.

    Each photograph's factors are timed as a set (fidelity chooses per photograph);
    the setting's time and errors are the means over the photographs.
    """
    seconds = {(t["model"], t["resolution"], t["depth"], t["path"], t["factor"]): t["seconds"] for t in timing}
    per_photo: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in layers:
        key = (r["model"], r["resolution"], r["family"], r["setting"], r["value"], r["photo"])
        entry = per_photo[key]
        entry["seconds"].append(
            seconds[(r["model"], r["resolution"], r["depth"], path_for(r["family"], r["factor"]), r["factor"])]
        )
        entry["errors"].append(r["error"])
        entry["factors"].append((r["depth"], r["factor"]))
        entry["calibration_s"].append(r.get("calibration_s", 0.0))
    settings: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for (model, resolution, family, setting, value, _), entry in per_photo.items():
        target = settings[(model, resolution, family, setting, value)]
        target["seconds"].append(sum(entry["seconds"]))
        target["error_mean"].append(statistics.fmean(entry["errors"]))
        target["error_max"].append(max(entry["errors"]))
        target["factors"].append(entry["factors"])
    summary = []
    for (model, resolution, family, setting, value), target in settings.items():
        factors: dict[int, list[float]] = defaultdict(list)
        for photo_factors in target["factors"]:
            for depth, factor in photo_factors:
                factors[depth].append(factor)
        summary.append({
            "model": model, "resolution": resolution, "family": family, "setting": setting, "value": value,
            "seconds": statistics.fmean(target["seconds"]), "error_mean": statistics.fmean(target["error_mean"]),
            "error_max": statistics.fmean(target["error_max"]),
            "factors": {str(depth): values for depth, values in sorted(factors.items())},
            "photos": len(target["seconds"]),
        })  # fmt: skip
    for row in summary:
        exact = next(s for s in summary if (s["model"], s["resolution"], s["family"]) ==
                     (row["model"], row["resolution"], "exact"))  # fmt: skip
        row["speedup"] = exact["seconds"] / row["seconds"]
    return summary


def interpolate(points: list[tuple[float, float]], x: float) -> tuple[float, int] | None:
    """``y`` at ``x`` on the polyline through ``points`` (taken in ``x`` order), and the index of the segment's
    left point; ``None`` outside the points' range."""
    ordered = sorted(points)
    for index, ((x0, y0), (x1, y1)) in enumerate(itertools.pairwise(ordered)):
        if x0 <= x <= x1:
            return (y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)), index
    return None


def fixed_curve(summary: list[dict], model: str, resolution: int) -> list[dict]:
    """Exact attention and the manual factors of one model and resolution, smallest factor first."""
    rows = [s for s in summary if (s["model"], s["resolution"]) == (model, resolution)
            and s["family"] in ("exact", "manual")]  # fmt: skip
    return sorted(rows, key=lambda s: s["value"] or 1.0)


def comparisons(summary: list[dict]) -> list[dict]:
    """Each fidelity setting against the fixed settings' curve, at its error and at its speed.

    ``equal_error_speedup``: the fixed curve's time at fidelity's mean error over
    fidelity's time (above 1: fidelity is faster for the same error).
    ``equal_speed_error_ratio``: the fixed curve's error at fidelity's time over
    fidelity's error (above 1: fidelity's error is lower at the same speed).
    ``None`` where fidelity lies outside the fixed settings' range.
    """
    results = []
    for fid in (s for s in summary if s["family"] == "fidelity"):
        curve = fixed_curve(summary, fid["model"], fid["resolution"])
        by_error = [(c["error_mean"], c["seconds"]) for c in curve]
        by_time = [(c["seconds"], c["error_mean"]) for c in curve]
        at_error = interpolate(by_error, fid["error_mean"])
        at_time = interpolate(by_time, fid["seconds"])
        auto = next((s for s in summary if (s["model"], s["resolution"], s["family"]) ==
                     (fid["model"], fid["resolution"], "auto")), None)  # fmt: skip
        results.append({
            "model": fid["model"], "resolution": fid["resolution"], "setting": fid["setting"],
            "max_error": fid["value"], "error_mean": fid["error_mean"], "seconds": fid["seconds"],
            "speedup": fid["speedup"],
            "equal_error_seconds": at_error and at_error[0],
            "equal_error_speedup": at_error and at_error[0] / fid["seconds"],
            "equal_error_between": at_error and _between(curve, by_error, at_error[1], "error_mean"),
            "equal_speed_error": at_time and at_time[0],
            "equal_speed_error_ratio": at_time and (at_time[0] / fid["error_mean"] if fid["error_mean"] else None),
            "equal_speed_between": at_time and _between(curve, by_time, at_time[1], "seconds"),
            "vs_auto_speed": auto and auto["seconds"] / fid["seconds"],
            "vs_auto_error": auto and (auto["error_mean"] / fid["error_mean"] if fid["error_mean"] else None),
        })  # fmt: skip
    return results


def _between(curve: list[dict], points: list[tuple[float, float]], index: int, key: str) -> list[str]:
    ordered = sorted(range(len(points)), key=lambda i: points[i])
    return [curve[ordered[index]]["setting"], curve[ordered[index + 1]]["setting"]]


# --- the calibration's cost in a render ----------------------------------------------------------------------------


def attention_layers_per_depth(unet: dict) -> dict[int, int]:
    """Self-attention layers per UNet depth, from a UNet configuration as ComfyUI's ``UNetModel`` takes it."""
    levels, blocks = len(unet["channel_mult"]), unet["num_res_blocks"]
    inputs, outputs = list(unet["transformer_depth"]), list(unet["transformer_depth_output"])
    counts: dict[int, int] = defaultdict(int)
    for level in range(levels):  # input blocks take their entries from the front, shallowest level first
        counts[level + 1] += sum(inputs.pop(0) for _ in range(blocks[level]))
    for level in reversed(range(levels)):  # output blocks from the back, deepest level first
        counts[level + 1] += sum(outputs.pop() for _ in range(blocks[level] + 1))
    counts[levels] += max(0, unet["transformer_depth_middle"])
    return {depth: count for depth, count in sorted(counts.items()) if count}


def full_unets() -> dict[str, dict]:
    """The full-size UNet configurations the model level builds (``benchmarks/comfyui_level.py``)."""
    spec = importlib.util.spec_from_file_location("bench_comfyui_level", PACK_ROOT / "benchmarks" / "comfyui_level.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FULL_UNETS


def render_cost(config: FidelityConfig, layers: list[dict], timing: list[dict]) -> list[dict]:
    """Per model and resolution: the calibrations a render makes, their time, and the render's attention time."""
    counts = {model: attention_layers_per_depth(unet) for model, unet in full_unets().items()}
    seconds = {(t["model"], t["resolution"], t["depth"], t["path"], t["factor"]): t["seconds"] for t in timing}
    results = []
    for model in config.models:
        for resolution in config.resolutions(model):
            here = [r for r in layers if (r["model"], r["resolution"]) == (model, resolution)]
            depths = sorted({r["depth"] for r in here})
            calibration_s, attention_s, per_depth = 0.0, 0.0, {}
            for depth in depths:
                at_depth = [r for r in here if r["depth"] == depth]
                one = statistics.median(r["calibration_s"] for r in at_depth if r["family"] == "fidelity")
                chosen = [
                    r["factor"] for r in at_depth if r["setting"] == setting_name("fidelity", config.headline_max_error)
                ]
                layer_s = statistics.fmean(
                    seconds[(model, resolution, depth, path_for("fidelity", f), f)] for f in chosen
                )
                n_layers = counts[model].get(depth, 0)
                calibration_s += one * n_layers * len(NOISE_BANDS)
                attention_s += layer_s * n_layers * config.render_steps
                per_depth[str(depth)] = {"layers": n_layers, "calibration_s": one, "layer_s": layer_s}
            results.append({
                "model": model, "resolution": resolution, "max_error": config.headline_max_error,
                "steps": config.render_steps, "bands": len(NOISE_BANDS),
                "calibrations": sum(d["layers"] for d in per_depth.values()) * len(NOISE_BANDS),
                "calibration_s": calibration_s, "attention_s": attention_s,
                "share_of_attention": calibration_s / (calibration_s + attention_s), "depths": per_depth,
            })  # fmt: skip
    return results


def model_cost(model_rows: list[dict]) -> list[dict]:
    """Model level: each measured render's calibration seconds against its time, and the same seconds against a
    20-step render at the measured time per step (calibration happens once per band, whatever the step count)."""
    out = []
    for row in model_rows:
        if not row.get("calibration_seconds"):
            continue
        steps = row.get("steps", 1)
        calibration = statistics.median(row["calibration_seconds"])
        render = row["seconds"] * steps
        per_step = (render - calibration) / steps
        out.append({
            "model": row["model"], "size": row["size"], "setting": row["setting"], "steps": steps,
            "calibration_s": calibration, "render_s": render, "share": calibration / render, "per_step_s": per_step,
            "share_of_20_steps": calibration / (calibration + 20 * per_step),
            "bands": row.get("calibration_bands"), "report": row.get("calibration_report"),
        })  # fmt: skip
    return out


# --- report ------------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _per_step(cost: dict | None) -> str:
    return "—" if cost is None else f"{cost['per_step_s']:.1f}"


def _seconds(cost: dict | None) -> str:
    return "—" if cost is None else f"{cost['calibration_s']:.2f}"


def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _factors(factors: dict[str, list[float]]) -> str:
    """``d1 2, d2 1.5-2`` : the factor per depth, a range where the photographs differ."""
    parts = []
    for depth, values in factors.items():
        low, high = min(values), max(values)
        parts.append(f"d{depth} {low:g}" if low == high else f"d{depth} {low:g}–{high:g}")
    return ", ".join(parts)


def _layer_label(model: str, resolution: int) -> str:
    return f"{model} {resolution}² ({resolution / NATIVE[model]:g}× native)"


def headline(data: dict) -> dict:
    """The figures the README's summary sentence gives, at the headline budget: per model and resolution."""
    budget = data["meta"]["headline_max_error"]
    rows = []
    for comparison in data["comparisons"]:
        if comparison["max_error"] != budget:
            continue
        cost = next(c for c in data["render_cost"] if (c["model"], c["resolution"]) ==
                    (comparison["model"], comparison["resolution"]))  # fmt: skip
        rows.append({**comparison, "share_of_attention": cost["share_of_attention"]})
    return {"max_error": budget, "rows": rows}


def _relation(value: float | None, better: str, worse: str, missing: str = "outside the fixed settings' range") -> str:
    if value is None:
        return missing
    return f"{value:.2f}× {better}" if value >= 1 else f"{1 / value:.2f}× {worse}"


def summary_sentences(data: dict) -> str:
    """The headline figures in words, at the headline budget; every number from the results."""
    figures = headline(data)
    sentences = []
    for row in figures["rows"]:
        missing = "(no error to compare)" if row["error_mean"] == 0 else "outside the fixed settings' range"
        sentences.append(
            f"{_layer_label(row['model'], row['resolution'])}, fidelity {figures['max_error']:g} (mean error "
            f"{_pct(row['error_mean'])}, {_times(row['speedup'])} the speed of exact attention): at equal error "
            f"{_relation(row['equal_error_speedup'], 'faster', 'slower')} than the fixed factors, at equal speed "
            f"an error {_relation(row['equal_speed_error_ratio'], 'lower', 'higher', missing)}; against auto "
            f"{_relation(row['vs_auto_speed'], 'faster', 'slower')} with an error "
            f"{_relation(row['vs_auto_error'], 'lower', 'higher', missing)}; its calibration costs "
            f"{_pct(row['share_of_attention'])} of the attention time of a "
            f"{data['render_cost'][0]['steps']}-step render."
        )
    for cost in model_cost(data.get("model", [])):
        sentences.append(
            f"Through ComfyUI ({cost['model']} at {cost['size']}, {cost['steps']} steps, {cost['setting']}): "
            f"measuring took {cost['calibration_s']:.2f} s, {_pct(cost['share'])} of that render and "
            f"{_pct(cost['share_of_20_steps'])} of a 20-step render at the same time per step."
        )
    return "**In short.** " + " ".join(sentences) if sentences else ""


def markdown(data: dict, plot_name: str | None = None, beside: str | None = None) -> str:
    """results.md and the README's ``bench-fidelity`` section: every figure from the results file."""
    meta = data["meta"]
    load = meta.get("load_average_start")
    load_note = f" · load average {load} -> {meta.get('load_average_end')}" if load is not None else ""
    runtime = f" · {meta['runtime_s'] / 60:.0f} min" if "runtime_s" in meta else ""
    earlier = meta.get("attention_part")
    if earlier:
        runtime += (f" (the ComfyUI part; the attention part taken from the run of {earlier['date']}, command "
                    f"`{earlier['command']}`, {earlier['runtime_s'] / 60:.0f} min, load average "
                    f"{earlier.get('load_average_start')} -> {earlier.get('load_average_end')})")  # fmt: skip
    parts = [
        f"Measured {meta['date']} on {meta.get('machine', '?')} · torch {meta['torch']} · {meta['device']} · "
        f"float32 · command `{meta['command']}`{runtime}{load_note}",
    ]
    if plot_name:
        images = [f'<img src="{name}" width="49%" alt="{alt}">' for name, alt in
                  ((beside, "speed-up against fidelity, every method"), (plot_name, "fidelity mode against auto "
                   "and manual factors")) if name]  # fmt: skip
        parts.append(" ".join(images))
    if summary_sentences(data):
        parts.append(summary_sentences(data))
    parts.append(
        f"Photo tokens ({meta['photos']} photograph(s)), the SD1.5 and SDXL self-attention shapes of every depth "
        "ToDo reduces (one layer per depth), seeded projections. Factors: `auto` as the node computes them at the "
        "model's native resolution; `manual xF`: F at every depth; `fidelity E`: `choose_factor` with the mode's "
        f"{meta['sampled_rows']} seeded rows and max_error E, per photograph and layer. Error: relative L2 error of "
        f"the attention output against exact attention on {meta['query_sample']} seeded query rows, averaged over "
        "the depths and photographs (`max` column: the worst depth, averaged over the photographs). Time: the "
        "layers of one model summed (one per depth; q/k/v projections, reduction and SDPA; auto and manual "
        "through the attn1 patch's path, fidelity through the override's path that it runs), median of "
        f"{meta['repeats']} interleaved runs, one photograph (time does not depend on the content)."
    )
    summary = data["summary"]
    body = []
    for s in summary:
        body.append(f"| {_layer_label(s['model'], s['resolution'])} | {s['setting']} | {_factors(s['factors'])} | "
                    f"{s['seconds'] * 1000:,.0f} | {_times(s['speedup'])} | {_pct(s['error_mean'])} | "
                    f"{_pct(s['error_max'])} |")  # fmt: skip
    parts.append("**Every setting: factors chosen, time of the model's layers, error**\n\n"
                 "| model, size | setting | factor per depth | ms (layers summed) | speed-up | error (mean) | "
                 "error (max depth) |\n|---|---|---|---|---|---|---|\n" + "\n".join(body))  # fmt: skip
    body = []
    for c in data["comparisons"]:
        between = " / ".join(c["equal_error_between"]) if c["equal_error_between"] else "outside the fixed range"
        body.append(
            f"| {_layer_label(c['model'], c['resolution'])} | {c['setting']} | {_pct(c['error_mean'])} | "
            f"{_times(c['speedup'])} | {_times(c['equal_error_speedup'])} ({between}) | "
            f"{_times(c['equal_speed_error_ratio'])} | {_times(c['vs_auto_speed'])} | {_times(c['vs_auto_error'])} |"
        )
    parts.append(
        "**Fidelity mode against the fixed settings** (exact and manual x1.5 ... x4, interpolated linearly between "
        "the two around fidelity's point). Equal error: the fixed curve's time at fidelity's error over "
        "fidelity's time (above 1×: fidelity is faster). Equal speed: the fixed curve's error at fidelity's time "
        "over fidelity's error (above 1×: fidelity's error is lower). Against auto: auto's time over fidelity's, "
        "auto's error over fidelity's.\n\n"
        "| model, size | setting | error (mean) | speed-up | at equal error: faster by (between) | "
        "at equal speed: error lower by | vs auto: faster by | vs auto: error lower by |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(body)
    )
    body = []
    for c in data["render_cost"]:
        depths = "; ".join(f"d{d}: {v['layers']} × {v['calibration_s'] * 1000:,.0f} ms" for d, v in c["depths"].items())
        body.append(
            f"| {_layer_label(c['model'], c['resolution'])} | {depths} | {c['calibrations']} | "
            f"{c['calibration_s']:.2f} | {c['attention_s']:.1f} | {_pct(c['share_of_attention'])} |"
        )
    cost = data["render_cost"][0] if data["render_cost"] else {"steps": "?", "max_error": "?"}
    parts.append(
        f"**The calibration's cost in a {cost['steps']}-step render** (one calibration per self-attention layer "
        f"and noise band; per depth: the full UNet's layers × the median time of one `choose_factor`; against "
        f"the attention time of those layers over {cost['steps']} steps at fidelity {cost['max_error']:g}'s "
        "factors: an upper bound of the share of the whole render, which also runs convolutions, "
        "cross-attention and the deeper layers)\n\n"
        "| model, size | calibrations per depth (layers × one) | calibrations | calibration s | attention s | "
        "share |\n|---|---|---|---|---|---|\n" + "\n".join(body)
    )
    model_rows = data.get("model", [])
    if model_rows:
        base = {(r["model"], r["size"]): r["seconds"] for r in model_rows if r["setting"] == "unpatched"}
        costs = {(c["model"], c["size"], c["setting"]): c for c in model_cost(model_rows)}
        body = []
        for r in model_rows:
            c = costs.get((r["model"], r["size"], r["setting"]))
            speed = base.get((r["model"], r["size"]))
            report = (c["report"] or "—").replace("|", "/") if c else "—"
            body.append(
                f"| {r['model']} {r['size']} | {r['setting']} | {r.get('steps', 1)} | {r['seconds']:.1f} | "
                f"{_times(speed / r['seconds']) if speed else '—'} | "
                f"{_per_step(c)} | {_seconds(c)} | {_pct(c['share']) if c else '—'} | "
                f"{_pct(c['share_of_20_steps']) if c else '—'} | {report} |"
            )
        first = model_rows[0]
        native = f"; the node's native_resolution set to {first['todo_native']} px, so that auto acts as at " \
                 "twice native" if first.get("todo_native") else ""  # fmt: skip
        parts.append(
            f"**Model level through ComfyUI** (full-size UNet with seeded random weights, Euler, CFG 7, "
            f"`{first['backend']}` on the {first['device']}, {first['dtype']}{native}; s / step = the render's time "
            f"/ its steps, median of {len(first['runs'])} render(s) per setting"
            + (", the settings in rounds after a warm-up render at the same size" if first.get("interleaved") else "")
            + "; calibration s: `Calibration.seconds` of the render, read where the node closes it; "
            "20-step share: those seconds against 20 steps at the measured time per step). Random weights make "
            "attention diffuse: many keys matter about equally, so keys can be dropped with little error and "
            "fidelity mode's choices here say little about a trained model's.\n\n"
            "| model, size | setting | steps | s / step | speed-up | s / step besides measuring | calibration s | "
            "share of this render | share of 20 steps | the node's report |\n" + "|---" * 10 + "|\n" + "\n".join(body)
        )
    return "\n\n".join(parts) + "\n"


def plot(data: dict, path: Path) -> bool:
    """One panel per model and resolution: error against speed-up of exact, manual, auto and fidelity."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = sorted({(s["model"], s["resolution"]) for s in data["summary"]})
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for axis, (model, resolution) in zip(axes[0], panels, strict=True):
        here = [s for s in data["summary"] if (s["model"], s["resolution"]) == (model, resolution)]
        curve = fixed_curve(here, model, resolution)
        axis.plot([c["speedup"] for c in curve], [100 * c["error_mean"] for c in curve], "o-", color="tab:blue",
                  label="exact, manual x1.5 ... x4")  # fmt: skip
        for c in curve:
            axis.annotate(c["setting"].replace("manual ", ""), (c["speedup"], 100 * c["error_mean"]), fontsize=7,
                          textcoords="offset points", xytext=(4, -10))  # fmt: skip
        for s in here:
            if s["family"] == "auto":
                axis.scatter(s["speedup"], 100 * s["error_mean"], marker="s", s=70, facecolors="none",
                             edgecolors="tab:orange", label="auto", zorder=3)  # fmt: skip
        fidelity = sorted((s for s in here if s["family"] == "fidelity"), key=lambda s: s["value"])
        axis.plot([s["speedup"] for s in fidelity], [100 * s["error_mean"] for s in fidelity], "D--",
                  color="tab:green", label="fidelity (max_error)")  # fmt: skip
        for s in fidelity:
            axis.annotate(f"{s['value']:g}", (s["speedup"], 100 * s["error_mean"]), fontsize=7, color="tab:green",
                          textcoords="offset points", xytext=(4, 4))  # fmt: skip
        axis.set_xlabel("speed-up of the model's layers (×)")
        axis.set_ylabel("mean relative error of attention output (%)")
        axis.set_title(f"{model} at {resolution}² ({resolution / NATIVE[model]:g}× native)")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle("Fidelity mode against auto and manual factors (photo tokens, every depth ToDo reduces)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
