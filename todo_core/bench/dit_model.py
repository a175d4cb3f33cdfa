"""DiT model level: seconds per sampler step through ComfyUI, unpatched, with ToDo and at ToDo's zero-cost ceiling.

The runs themselves happen in ``benchmarks/dit_level.py``, one child process per
model (ComfyUI is imported there, never here). This module names the runs and
their settings, starts the children, and turns their rows into the results
file, its tables and the 4096² estimate.

Settings: ``unpatched``; ``todo-auto`` (the node's defaults); ``todo-F`` (mode
manual, ``depth_1_factor`` F); ``todo-F-no-mass-correction`` (the same with the
registered override's ``mass_correction`` set to False: no attention mask);
``ceiling-F`` and ``ceiling-auto``: the same model with an attention override
that hands the backend, for every call ToDo would reduce, a contiguous slice of
the keys and values of the length ToDo keeps and no mask. Gathering the kept
keys and the correction mask then cost nothing: the speed-up ToDo could reach
at most with those keys (Amdahl's bound for the step). Each ToDo row is shown
beside the ceiling that gets the same number of keys in every call.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .children import run_child
from .comfyui_path import PACK_ROOT

logger = logging.getLogger("comfyui_todo.bench")

RUNNER = PACK_ROOT / "benchmarks" / "dit_level.py"
NO_MASS_CORRECTION = "-no-mass-correction"


@dataclass(frozen=True)
class DiTSetting:
    """One setting of a DiT model run, parsed from its name."""

    name: str
    kind: str
    """``unpatched``, ``todo`` or ``ceiling``."""
    factor: float | None = None
    """The manual factor; ``None``: the node's auto mode."""
    mass_correction: bool = True

    @classmethod
    def parse(cls, name: str) -> DiTSetting:
        if name == "unpatched":
            return cls(name, "unpatched")
        kind, _, rest = name.partition("-")
        mass_correction = not rest.endswith(NO_MASS_CORRECTION)
        rest = rest.removesuffix(NO_MASS_CORRECTION)
        try:
            factor = None if rest == "auto" else float(rest)
        except ValueError:
            factor = -1.0
        if kind not in ("todo", "ceiling") or (factor is not None and factor < 1) or (
            kind == "ceiling" and not mass_correction
        ):  # fmt: skip
            raise ValueError(
                f"DiT setting {name!r}: use unpatched, todo-auto, todo-F, todo-F-no-mass-correction, ceiling-auto "
                "or ceiling-F (F a factor >= 1)"
            )
        return cls(name, kind, factor, mass_correction)

    def node_inputs(self) -> dict | None:
        """ToDoModelPatch inputs (``None``: the model is left as it is)."""
        if self.kind == "unpatched":
            return None
        return {} if self.factor is None else {"mode": "manual", "depth_1_factor": self.factor}


@dataclass(frozen=True)
class DiTRun:
    """One model at one or more sizes, every setting side by side in one process."""

    model: str
    sizes: tuple[str, ...]
    """``WIDTHxHEIGHT`` in pixels, or ``WIDTHxHEIGHTxFRAMES`` (latent frames) for a video model."""
    settings: tuple[str, ...]


CLASSIC_SETTINGS = ("unpatched", "todo-auto", "todo-2", "todo-2-no-mass-correction", "ceiling-2")
NEW_SETTINGS = ("unpatched", "todo-2", "todo-2-no-mass-correction", "ceiling-2")
RUNS: dict[str, tuple[DiTRun, ...]] = {
    "quick": (
        DiTRun("flux", ("1024x1024", "2048x2048"), CLASSIC_SETTINGS),
        DiTRun("sd3", ("1024x1024", "2048x2048"), CLASSIC_SETTINGS),
        DiTRun("zimage", ("2048x2048",), NEW_SETTINGS),
        DiTRun("wan", ("1664x960x3",), NEW_SETTINGS),
        DiTRun("flux2", ("2048x2048",), NEW_SETTINGS),  # last: the largest (about 16 GB at 2048² in float32)
    ),
    "tiny": (DiTRun("flux", ("128x128",), ("unpatched", "todo-2", "ceiling-2")),),  # tests: a narrow model
}
RUNS["full"] = RUNS["quick"]
MODELS = ("flux", "sd3", "zimage", "wan", "flux2")
"""The models ``benchmarks/dit_level.py`` builds (full width, a few blocks)."""


def parse_dit_run(text: str) -> DiTRun:
    """``model:SIZE[,SIZE...][:setting,setting...]``; without settings, those of the quick preset's run."""
    model, _, rest = text.partition(":")
    sizes, _, settings = rest.partition(":")
    default = next((run.settings for run in RUNS["quick"] if run.model == model), NEW_SETTINGS)
    run = DiTRun(model, tuple(sizes.split(",")), tuple(settings.split(",")) if settings else default)
    if model not in MODELS or not sizes:
        raise SystemExit(f"--dit-runs entries look like flux2:2048x2048[:unpatched,todo-2] ({', '.join(MODELS)}); "
                         f"got {text!r}")  # fmt: skip
    for size in run.sizes:
        parts = size.lower().split("x")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
            raise SystemExit(f"--dit-runs: size {size!r} is not WIDTHxHEIGHT or WIDTHxHEIGHTxFRAMES")
    if "unpatched" not in run.settings:
        raise SystemExit(f"--dit-runs {text!r}: the settings must include unpatched (every speed-up is against it)")
    for setting in run.settings:
        try:
            DiTSetting.parse(setting)
        except ValueError as error:
            raise SystemExit(f"--dit-runs: {error}") from None
    return run


def run_level(
    runs: tuple[DiTRun, ...],
    comfyui: Path,
    repeats: int | None,
    tiny: bool,
    env: dict[str, str],
    step: Callable[[str], None],
    save: Callable[[list[dict], dict, dict], object],
) -> tuple[list[dict], dict, dict]:
    """Run every model in its own child process; rows, checks and the children's meta (backend, device).

    ``save(rows, checks, meta)`` is called after each model, so a long run that fails late keeps what it measured;
    a model whose child fails is recorded in the checks and the others still run.
    """
    rows: list[dict] = []
    checks: dict = {}
    child_meta: dict = {}
    for run in runs:
        command = [sys.executable, str(RUNNER), "--comfyui", str(comfyui), "--model", run.model,
                   "--sizes", *run.sizes, "--settings", *run.settings]  # fmt: skip
        if repeats or tiny:
            command += ["--repeats", str(repeats or 1)]
        if tiny:
            command.append("--tiny")
        logger.info("%s", " ".join(command))
        status, written = run_child(command, env, lambda row: step(f"{row['model']} {row['size']} {row['setting']}"),
                                    quiet=False)  # fmt: skip
        if written is not None:
            rows += written["rows"]
            checks.update(written["checks"])
            child_meta.update(written["meta"])
        if status != 0:
            checks[f"{run.model}: run failed"] = f"exit {status}: {' '.join(command)}"
            logger.error("the DiT model run %s failed (exit %d)", run, status)
        save(rows, checks, child_meta)
    return rows, checks, child_meta


def stack_note() -> str:
    """The full-stack assumption, stated in every results file (and replacing older wording on regeneration)."""
    return (
        "Few-block models: nothing here times the full model. Carrying the speed-up over to it assumes that a full "
        "step takes the time of the fixed part measured here (embedders, final layer, unpatchify: once per step, "
        "alike with and without ToDo) plus the block count of the full model (named in 'blocks run') times the "
        "per-block time, every block doing the per-token work of the blocks run here. Under that assumption the "
        "full model's speed-up is at least the one measured, since the fixed part is a larger share of these short "
        "stacks; the same holds for the ceiling."
    )


def notes(rows: list[dict], extra: list[str]) -> list[str]:
    models = {r["model"]: r for r in rows}
    return [
        "Random weights normal(0, 0.02), seed 0; full model width, few blocks: "
        + "; ".join(f"{name}: {r['blocks']}, {r['text_tokens']} text tokens" for name, r in models.items()),
        stack_note(),
        "One Euler step, CFG 1 (a single model call) for every model; models used with CFG > 1 double patched "
        "and unpatched time alike. Flux and Flux.2 guidance 3.5 (embedded).",
        "Settings side by side in one process per model, order alternating between repeats; speed-up against "
        "unpatched of the same model and size in the same run.",
        "todo-auto: node defaults. todo-2: mode manual, depth_1_factor 2. todo-2-no-mass-correction: the same with "
        "the registered override's mass_correction = False (no attention mask: the mask's cost is the difference).",
        "ceiling-2: for every call ToDo would reduce, the backend gets a contiguous slice of the keys and values of "
        "the length ToDo keeps and no mask, so the gather and the mask cost nothing: the most ToDo could gain with "
        "those keys. Each ToDo row shows the ceiling that gets the same keys in every call, and the share of the "
        "ceiling's time saving that ToDo reaches.",
        "Keys per attention call counted by a recording override registered before the node (ToDo calls it with "
        "the keys it kept); it is present in every setting, unpatched included.",
        *extra,
    ]


def call_shapes(calls: list[dict]) -> tuple[tuple[int, int, int], ...]:
    """What the backend got, call by call: (queries, keys, count) of each kind of call, the mask left aside."""
    counts: dict[tuple[int, int], int] = {}
    for call in calls:
        key = (call["q_tokens"], call["kv_tokens"])
        counts[key] = counts.get(key, 0) + call["calls"]
    return tuple((q, k, n) for (q, k), n in sorted(counts.items()))


def _run(row: dict) -> tuple:
    return row["model"], row["size"], row.get("frames", 1)


def with_ceilings(rows: list[dict]) -> list[dict]:
    """Each ToDo row with ``ceiling_speedup`` and ``ceiling_share`` (the share of the ceiling's time saving ToDo
    reaches), from the ceiling (or unpatched) row of the same model and size that got the same keys."""
    baseline = {_run(r): r for r in rows if r["setting"] == "unpatched"}
    bounds: dict[tuple, dict] = {}
    for r in rows:
        if r["setting"] == "unpatched" or r["setting"].startswith("ceiling-"):
            bounds.setdefault((*_run(r), call_shapes(r["attention_calls"])), r)
    out = []
    for r in rows:
        row = dict(r)
        base, bound = baseline.get(_run(r)), bounds.get((*_run(r), call_shapes(r["attention_calls"])))
        if base and bound and r["setting"].startswith("todo"):
            t_base, t_todo, t_bound = base["seconds_per_step"], r["seconds_per_step"], bound["seconds_per_step"]
            row["ceiling_setting"] = bound["setting"]
            row["ceiling_speedup"] = t_base / t_bound
            row["ceiling_share"] = (t_base - t_todo) / (t_base - t_bound) if t_base > t_bound else None
        out.append(row)
    return out


def estimate_rows(rows: list[dict], target_side: int) -> list[dict]:
    """Fit ``t = a*N + b*N*K`` (N queries, K keys of the joint call) to the fastest unpatched runs at the two
    largest measured sizes, then predict every ToDo setting at ``target_side`` from its N and K (auto mode's
    factor there: the target side over the native one). Ignores the mask's and the key gather's cost, so it is
    an estimate of the ceiling too."""
    estimates = []
    by_key = {(r["model"], r["size"], r["setting"]): r for r in rows}
    for name in dict.fromkeys(r["model"] for r in rows):
        sides = sorted({int(r["size"].split("x")[0]) for r in rows if r["model"] == name and "x" in r["size"]})
        if len(sides) < 2:
            continue
        points = []
        for side in sides[-2:]:
            row = by_key.get((name, f"{side}x{side}", "unpatched"))
            if row is None:
                break
            n = max(c["q_tokens"] for c in row["attention_calls"])
            points.append((n, n * n, min(row["runs"])))  # the fastest run: the least disturbed by other load
        if len(points) < 2:
            continue
        (x1, y1, t1), (x2, y2, t2) = points
        det = x1 * y2 - x2 * y1
        a, b = (t1 * y2 - t2 * y1) / det, (x1 * t2 - x2 * t1) / det
        if a < 0 or b < 0:
            logger.warning("%s: the measured times do not fit t = a*N + b*N^2 with a, b >= 0; no estimate", name)
            continue
        sample = by_key[(name, f"{sides[-1]}x{sides[-1]}", "unpatched")]
        text = sample["text_tokens"]
        image = (target_side // sample.get("pixels_per_token", 16)) ** 2
        n = text + image
        unpatched = a * n + b * n * n
        for setting in dict.fromkeys(r["setting"] for r in rows if r["model"] == name):
            parsed = DiTSetting.parse(setting)
            if parsed.kind == "ceiling":
                continue  # the fit ignores gather and mask: its ToDo rows are ceiling estimates already
            native = sample.get("native_side", 1024)
            factor = {"unpatched": 1.0}.get(setting) or parsed.factor or max(1.0, target_side / native)
            k = text + int(image / (factor * factor))
            seconds = a * n + b * n * k
            estimates.append({
                "level": "model-dit-estimate", "estimate": True, "model": name, "size": f"{target_side}x{target_side}",
                "setting": setting, "seconds_per_step": seconds, "kv_tokens": k, "q_tokens": n,
                "speedup": unpatched / seconds,
                "fit": f"unpatched t = a*N + b*N^2 through {sides[-2]}² and {sides[-1]}²: a={a:.3g} s, b={b:.3g} s",
            })  # fmt: skip
    return estimates


def _keys(row: dict) -> str:
    longest = max(c["q_tokens"] for c in row["attention_calls"])
    calls = [c for c in row["attention_calls"] if c["q_tokens"] == longest]
    return ", ".join(f"{c['kv_tokens']:,} of {c['q_tokens']:,}{' +mask' if c['masked'] else ''} ×{c['calls']}"
                     for c in calls)  # fmt: skip


def _size(row: dict) -> str:
    frames = row.get("frames", 1)
    return row["size"] if frames == 1 else f"{row['size']}, {frames} latent frames"


def header(meta: dict) -> str:
    return (
        f"Measured {meta['date']} on {meta['cpu']} · torch {meta['torch']} · {meta['device']} · float32 · "
        f"backend {meta['backend']} · command `{meta['command']}` · {meta['runtime_s']:.0f} s in all"
    )


def table(rows: list[dict]) -> str:
    lines = [
        "**DiT model level: seconds per Euler step (CFG 1, one model call) through ComfyUI, full-width "
        "random-weight models with a few blocks (per-block-pair times; see notes); ceiling: the same keys handed "
        "to the backend at zero cost (a contiguous slice, no mask)**",
        "",
        "| model | blocks run | size | setting | s / step | speed-up | ceiling | share of the ceiling's saving | runs "
        "| keys per attention call (longest queries) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in with_ceilings(rows):
        ceiling = f"{row['ceiling_speedup']:.2f}×" if "ceiling_speedup" in row else "—"
        share = row.get("ceiling_share")
        runs = ", ".join(f"{s:.1f}" for s in row["runs"])
        lines.append(f"| {row['model']} | {row['blocks']} | {_size(row)} | {row['setting']} | "
                     f"{row['seconds_per_step']:.2f} | {row['speedup']:.2f}× | {ceiling} | "
                     f"{'—' if share is None else f'{share:.0%}'} | {runs} | {_keys(row)} |")  # fmt: skip
    return "\n".join(lines)


def markdown(meta: dict, rows: list[dict], estimates: list[dict], checks: dict, compact: bool = False) -> str:
    """The results as Markdown; ``compact`` (the README's section): the header and the measured table only."""
    lines = [header(meta), "", table(rows)]
    if compact:
        return "\n".join(lines) + "\n"
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
            lines.append(f"| {row['model']} | {row['size']} | {row['setting']} | ~{row['seconds_per_step']:.0f} | "
                         f"{row['speedup']:.2f}× | {row['kv_tokens']:,} of {row['q_tokens']:,} |")  # fmt: skip
    lines += ["", "**Checks**", ""] + [f"- {name}: {value}" for name, value in checks.items()]
    lines += ["", "**Notes**", ""] + [f"- {note}" for note in meta["notes"]]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, meta: dict, rows: list[dict], checks: dict, final: bool) -> str:
    """results.json and results.md in ``out_dir``; returns the README's compact section."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta["complete"] = final
    estimates = estimate_rows(rows, 4096) if final else []
    data = {"meta": meta, "checks": checks, "rows": rows, "estimates": estimates}
    (out_dir / "results.json").write_text(json.dumps(data, indent=2))
    (out_dir / "results.md").write_text(markdown(meta, rows, estimates, checks))
    return markdown(meta, rows, estimates, checks, compact=True)


def regenerate(data: dict, out_dir: Path) -> str:
    """Rewrite results.json and results.md (estimates, notes) from an earlier results file; run nothing."""
    meta, rows, checks = data["meta"], data["rows"], data["checks"]
    meta["notes"] = [stack_note() if note.startswith(("Per-block-pair times", "Few-block models")) else note
                     for note in meta["notes"]]  # fmt: skip
    return write(out_dir, meta, rows, checks, final=True)
