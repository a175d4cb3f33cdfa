"""Benchmark ToDo against exact attention and its peers: speed, memory and fidelity, side by side in one run.

    python -m todo_core.bench                    # quick: 1024² layers, one 512² model step (~20 min, 2 loaded cores)
    python -m todo_core.bench --preset full      # 1024² to 2048², every depth, both CPU backends (hours)

Writes results.json, results.md and results.png to a new folder, bench-results/runs/<date-time>/ (git-ignored),
and prints the tables. The committed bench-results/ and the README's tables change only when asked:
--update-readme (which then writes to bench-results/ unless --out-dir says otherwise) or --out-dir bench-results.
Attention level needs torch and scikit-image (photographs); the model level needs
a ComfyUI checkout (COMFYUI_PATH or ~/comfy/ComfyUI) and is skipped without one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..downsample import DownsampleMethod
from .attention_level import AttentionConfig, count_fidelity_steps, count_timing_steps, fidelity_rows, timing_rows
from .comfyui_path import ENABLE_HINT, PACK_ROOT, find_comfyui
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


PRESETS = {
    "quick": (
        AttentionConfig(
            resolutions=(1024,),
            query_sample=1024,
            timed_factors=(1.5, 2.0, 2.5, 4.0),
            timed_methods=(DownsampleMethod.NEAREST,),
            repeats=2,
        ),
        (ModelRun("sd15", "512x512", "pytorch", ("unpatched", "todo-2", "tome-0.5", "hypertile-256")),),
    ),
    "full": (
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
    ),
    "tiny": (  # for tests: seconds, not minutes
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
    ),
}


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


def _with_progress(rows, total: int, label: str) -> list[dict]:
    """Collect rows, advancing the bar each time a new layer (model, depth, resolution) starts or ends."""
    progress, collected, current = Progress(total, label), [], None
    for row in rows:
        layer = (row["model"], row["depth"], row["resolution"])
        if current is not None and layer != current:
            progress.step(f"{current[0]} d{current[1]} {current[2]}²")
        current = layer
        collected.append(row)
    if current is not None:
        progress.step(f"{current[0]} d{current[1]} {current[2]}²")
    progress.close()
    return collected


def run_model_level(runs: tuple[ModelRun, ...], comfyui: Path, repeats: int, peers: list[Path]) -> list[dict]:
    rows: list[dict] = []
    progress = Progress(sum(len(r.settings) for r in runs), "model level")
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            command = [sys.executable, str(MODEL_RUNNER), "--comfyui", str(comfyui), "--attention", run.attention,
                       "--model", run.model, "--size", run.size, "--repeats", str(repeats),
                       "--settings", *run.settings, "--out", str(out),
                       *(arg for peer in peers for arg in ("--peer", str(peer)))]  # fmt: skip
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  env={**os.environ, **MMAP_ENV}) as child:  # fmt: skip
                for line in child.stdout:
                    if line.startswith("{"):
                        row = json.loads(line)
                        progress.step(f"{run.model} {run.size} {run.attention} {row['setting']}")
            if child.returncode != 0:
                raise SystemExit(f"the model-level run {run} failed (exit {child.returncode}): {' '.join(command)}")
            rows += json.loads(out.read_text())
    progress.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m todo_core.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sizes and settings (default quick)")
    parser.add_argument("--levels", nargs="+", choices=["attention", "model"], default=["attention", "model"])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where results go (default: a new folder bench-results/runs/<date-time>/, git-ignored; "
        "with --update-readme: the committed bench-results/)",
    )
    parser.add_argument("--comfyui", type=Path, default=None, help="ComfyUI checkout (default: found automatically)")
    parser.add_argument("--repeats", type=int, default=1, help="model-level runs per setting (median)")
    parser.add_argument(
        "--peer",
        type=Path,
        action="append",
        default=[],
        help="another node pack to load at model level (the official comfy-todo for its settings)",
    )
    parser.add_argument(
        "--model-runs",
        nargs="+",
        default=None,
        metavar="MODEL:SIZE:ATTENTION:SETTING,...",
        help="model-level runs instead of the preset's, e.g. sd15:1024x1024:sub-quad:unpatched,todo-2",
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="replace the README's generated section (and, without --out-dir, the committed bench-results/)",
    )
    parser.add_argument("--readme-section", default="bench", help="which generated README section (default bench)")
    parser.add_argument(
        "--from-results",
        type=Path,
        default=None,
        metavar="JSON",
        help="write tables, plot and README section from an earlier results.json; run nothing",
    )
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or default_out_dir(args.update_readme)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"results go to {args.out_dir}", file=sys.stderr)
    if args.from_results:
        meta, rows = read_json(args.from_results)
        publish(meta, rows, args.out_dir, args.update_readme and args.readme_section)
        return 0

    started = time.perf_counter()
    config, runs = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".replace("  ", " "),
        "torch": torch.__version__, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
        "preset": args.preset, "photos": len(config.photos), "command": "python -m todo_core.bench "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average_start": _load_average(),
    }  # fmt: skip
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    rows: list[dict] = []
    if "attention" in args.levels:
        peers = load_peers(args.comfyui)
        meta["peers"] = peers.source
        rows += run_attention_level(config, device, dtype, peers)
    if "model" in args.levels:
        comfyui = args.comfyui or find_comfyui()
        if comfyui is None:
            print(f"model level skipped: ComfyUI not found ({ENABLE_HINT})", file=sys.stderr)
        else:
            meta["comfyui"] = str(comfyui)
            if args.model_runs:
                runs = tuple(parse_model_run(text) for text in args.model_runs)
            rows += run_model_level(runs, comfyui, args.repeats, args.peer)

    meta["load_average_end"] = _load_average()
    meta["runtime_s"] = round(time.perf_counter() - started)
    write_json(args.out_dir / "results.json", meta, rows)
    publish(meta, rows, args.out_dir, args.update_readme and args.readme_section)
    return 0


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
        if not update_readme(README, section_text, readme_section):
            print(f"README.md has no {readme_section} markers; not updated", file=sys.stderr)


def _with_measurable_memory(argv: list[str]) -> None:
    """Re-run once with the allocator set so that freed buffers leave the resident set (Linux, glibc)."""
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, "-m", "todo_core.bench", *argv], {**os.environ, **MMAP_ENV})


if __name__ == "__main__":
    _with_measurable_memory(sys.argv[1:])
    sys.exit(main())
