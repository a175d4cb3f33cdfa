"""Results file, tables and plot of a benchmark run; the README's figures are generated from here."""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from .attention_level import FAMILIES

logger = logging.getLogger("comfyui_todo")


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def read_json(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    return data["meta"], data["rows"]


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def first_layer(rows: list[dict], model: str) -> int:
    depths = [r["depth"] for r in rows if r["model"] == model]
    return min(depths) if depths else 1


def fidelity_table(rows: list[dict], families: tuple[str, ...] | None = None) -> str:
    """Relative error per variant (rows) and model/depth/resolution (columns), at each model's first attention depth."""
    fidelity = [r for r in rows if r.get("kind") == "fidelity"]
    if not fidelity:
        return ""
    columns = sorted(
        {(r["model"], r["depth"], r["resolution"]) for r in fidelity if r["depth"] == first_layer(fidelity, r["model"])}
    )
    by_variant: dict[tuple[str, str], dict] = defaultdict(dict)
    work: dict[tuple[str, str], float] = {}
    for r in fidelity:
        key = (r["family"], r["setting"])
        if families and r["family"] not in families:
            continue
        by_variant[key][(r["model"], r["depth"], r["resolution"])] = r["rel_error"]
        work.setdefault(key, r["work"])
    header = ["method", "attention work kept", *(f"{m} d{d} {res}²" for m, d, res in columns)]
    body = [
        [f"{family} {setting}", _pct(work[(family, setting)]),
         *(_pct(by_variant[(family, setting)][c]) if c in by_variant[(family, setting)] else "—" for c in columns)]
        for family, setting in sorted(by_variant, key=lambda k: (-work[k], k))
    ]  # fmt: skip
    return _table(header, body)


def best_method_table(rows: list[dict]) -> str:
    """Lowest mean error per ToDo factor over every layer and resolution measured: the basis of the default."""
    errors: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("kind") == "fidelity" and r["family"] == "todo":
            method, factor = r["setting"].rsplit(" ", 1)
            errors[factor][method].append(r["rel_error"])
    body = []
    for factor in sorted(errors, key=lambda f: float(f.lstrip("x"))):
        means = {m: sum(v) / len(v) for m, v in errors[factor].items()}
        ranked = sorted(means, key=means.get)
        body.append([factor, ranked[0], _pct(means[ranked[0]]), ranked[1], _pct(means[ranked[1]]),
                     _pct(means.get("nearest", float("nan")))])  # fmt: skip
    return _table(["factor", "best method", "mean error", "runner-up", "its error", "nearest"], body) if body else ""


def _ms_spread(row: dict) -> str:
    runs = row.get("runs")
    if not runs or len(runs) < 2:
        return "—"
    return f"{min(runs) * 1000:,.0f}–{max(runs) * 1000:,.0f}"


def attention_timing_table(rows: list[dict], first_layers_only: bool = False) -> str:
    timing = [r for r in rows if r.get("kind") == "timing"]
    if first_layers_only:
        timing = [r for r in timing if r["depth"] == first_layer(timing, r["model"])]
    body = [
        [f"{r['model']} d{r['depth']} {r['resolution']}²", f"{r['family']} {r['setting']}".strip(),
         _pct(r["work"]) if "work" in r else "—", f"{r['seconds'] * 1000:,.0f}", _ms_spread(r),
         f"{r['speedup']:.2f}×", f"{100 * r['overhead']:+.1f} %" if "overhead" in r else "—",
         _mib(r.get("peak_bytes")), _mib(r.get("dense_score_bytes"))]
        for r in timing
    ]  # fmt: skip
    header = ["layer", "variant", "attention work kept", "ms (median)", "ms (min–max)", "speed-up",
              "ToDo overhead vs pre-reduced K/V", "peak MiB (measured)", "dense scores MiB (computed)"]  # fmt: skip
    return _table(header, body) if body else ""


def equal_work_rows(rows: list[dict]) -> list[dict]:
    """Timed variants joined with their error on the same layer and size, grouped by the attention work kept.

    Only groups holding ToDo and at least one peer are kept: the like-for-like comparison."""
    errors = {(r["model"], r["depth"], r["resolution"], r["family"], r["setting"]): r["rel_error"]
              for r in rows if r.get("kind") == "fidelity"}  # fmt: skip
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("kind") != "timing" or r["family"] == "exact":
            continue
        error = errors.get((r["model"], r["depth"], r["resolution"], r["family"], r["setting"]))
        if error is not None:
            groups[(r["model"], r["depth"], r["resolution"], round(r["work"], 4))].append({**r, "rel_error": error})
    joined = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], -k[3])):
        families = {r["family"] for r in groups[key]}
        if "todo" in families and len(families) > 1:
            joined += sorted(groups[key], key=lambda r: r["rel_error"])
    return joined


def equal_work_table(rows: list[dict]) -> str:
    body = [
        [f"{r['model']} d{r['depth']} {r['resolution']}²", _pct(r["work"]), f"{r['family']} {r['setting']}",
         _pct(r["rel_error"]), f"{r['speedup']:.2f}×"]
        for r in equal_work_rows(rows)
    ]  # fmt: skip
    return _table(["layer", "attention work kept", "variant", "error", "speed-up"], body) if body else ""


def model_table(rows: list[dict]) -> str:
    model_rows = [r for r in rows if r.get("level") == "model"]
    baseline = {
        (r["model"], r["size"], r["attention"]): r["seconds"] for r in model_rows if r["setting"] == "unpatched"
    }
    body = []
    for r in model_rows:
        base = baseline.get((r["model"], r["size"], r["attention"]))
        body.append([r["model"], r["size"], f"{r['backend']} ({r['device']}, {r['dtype']})", r["setting"],
                     f"{r['seconds']:.1f}", f"{base / r['seconds']:.2f}×" if base else "—",
                     _mib(r.get("peak_bytes"))])  # fmt: skip
    header = ["model", "size", "attention backend", "setting", "s / step", "speed-up", "peak MiB"]
    return _table(header, body) if body else ""


def markdown(meta: dict, rows: list[dict], plot_name: str | None, compact: bool = False) -> str:
    """The results as Markdown; ``compact`` keeps only each model's first attention depth in the timing table."""
    parts = [
        f"Measured {meta.get('date', '?')} on {meta.get('machine', '?')} · torch {meta.get('torch', '?')} · "
        f"device {meta.get('device', '?')} · dtype {meta.get('dtype', '?')} · command `{meta.get('command', '?')}`"
        + (f" · {meta['runtime_s'] / 60:.0f} min in all" if "runtime_s" in meta else "")
        + (f" · load average {meta['load_average_start']} at the start, {meta.get('load_average_end')} at the end"
           if meta.get("load_average_start") is not None else "")
    ]  # fmt: skip
    if plot_name:
        parts.append(f"![speed-up against fidelity]({plot_name})")
    if any(r.get("level") == "attention" for r in rows):
        parts.append("Variants: " + "; ".join(f"`{name}`: {text}" for name, text in FAMILIES.items()) + ". "
                     f"Peers: {meta.get('peers', '?')}. The peers act at every layer measured here "
                     "(ComfyUI's nodes act only at the full-resolution depth by default).")  # fmt: skip
    repeats = max((len(r.get("runs", [])) for r in rows if r.get("kind") == "timing"), default=0)
    sections = [
        ("Attention-level fidelity: relative error of the attention output against exact attention "
         f"(mean over {meta.get('photos', '?')} photograph(s); first attention depth of each model)",
         fidelity_table(rows)),
        ("At equal attention work: error and measured speed-up of ToDo and its peers on the timed layers "
         "(same layer, same size; sorted by error)", equal_work_table(rows)),
        ("Which ToDo method is most faithful, per factor (mean over every layer and resolution measured)",
         best_method_table(rows)),
        ("Attention-level speed and memory (one layer from the same precomputed hidden states for every variant: "
         "the variant's patch, Q, K and V projections and torch SDPA, output projection excluded for all; "
         f"median of {repeats} runs after a warm-up"
         + ("; first attention depth of each model, every depth in results.md)" if compact else ")"),
         attention_timing_table(rows, first_layers_only=compact)),
        ("Model level: one Euler step with CFG (cond + uncond) through ComfyUI, full-size UNet, random weights",
         model_table(rows)),
    ]  # fmt: skip
    parts += [f"**{title}**\n\n{table}" for title, table in sections if table]
    return "\n\n".join(parts) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    """Fidelity against measured speed-up (timed layers) and against attention work kept (all layers)."""
    if not any(r.get("kind") == "fidelity" for r in rows):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written (pip install matplotlib)")
        return False
    fidelity = {(r["model"], r["depth"], r["resolution"], r["family"], r["setting"]): r["rel_error"]
                for r in rows if r.get("kind") == "fidelity"}  # fmt: skip
    timing = [r for r in rows if r.get("kind") == "timing" and r["family"] != "exact"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    markers = {"todo": "o", "hypertile": "s", "hypertile-qkv": "D", "tome": "^", "tome-qkv": "v"}
    colors = {"nearest": "tab:blue", "avg_pool": "tab:orange", "hypertile": "tab:purple", "hypertile-qkv": "tab:pink",
              "tome": "tab:gray", "tome-qkv": "tab:brown"}  # fmt: skip
    labelled = set()
    for r in timing:
        error = fidelity.get((r["model"], r["depth"], r["resolution"], r["family"], r["setting"]))
        if error is None:
            continue
        kind = r["setting"].split(" ")[0] if r["family"] == "todo" else r["family"]
        label = f"todo {kind}" if r["family"] == "todo" else kind
        color = colors.get(kind, "tab:green")
        left.scatter(r["speedup"], 100 * error, marker=markers.get(r["family"], "x"), color=color,
                     label=None if label in labelled else label)  # fmt: skip
        labelled.add(label)
    left.legend(fontsize=8)
    left.set_xlabel("measured attention speed-up (×)")
    left.set_ylabel("relative error of attention output (%)")
    left.set_title("Speed-up against fidelity (timed layers)")
    # Right: mean error over every layer and resolution, one line per method, against the share of work kept.
    grouped: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("kind") == "fidelity":
            method, level = r["setting"].rsplit(" ", 1) if r["family"] == "todo" else (r["family"], r["setting"])
            grouped[method][level].append((r["work"], 100 * r["rel_error"]))
    for method, levels in sorted(grouped.items()):
        if method == "max_pool":
            continue  # far off the scale; it is in the tables
        points = sorted((sum(w for w, _ in v) / len(v), sum(e for _, e in v) / len(v)) for v in levels.values())
        family = method if method in markers else "todo"
        right.plot([p[0] for p in points], [p[1] for p in points], marker=markers[family],
                   linestyle="-" if family == "todo" else "--", label=method)  # fmt: skip
    right.set_xscale("log")
    right.set_xlabel("attention score work kept (log scale)")
    right.set_ylabel("mean relative error (%)")
    right.set_title("Fidelity against attention cost (mean over layers and sizes)")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def readme_markers(name: str = "bench") -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def update_readme(readme: Path, section: str, name: str = "bench") -> bool:
    """Replace the README's generated section called ``name``; False when its markers are missing."""
    start, end = readme_markers(name)
    text = readme.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: f"{start}\n{section}\n{end}", text))
    return True
