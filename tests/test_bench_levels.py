"""The one benchmark command: ``--levels`` chooses among the four levels, each level runs at tiny sizes and writes its
results and README section, and the DiT model level's ceiling hands the backend the keys ToDo keeps, for free.

Structure only: no test here asserts a timing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from todo_core.bench import __main__ as cli
from todo_core.bench import dit_model, report
from todo_core.bench.comfyui_path import PACK_ROOT
from todo_core.bench.dit_attention import LAYOUTS
from todo_core.bench.dit_model import DiTSetting, with_ceilings

COMMITTED = PACK_ROOT / "bench-results"


def test_levels_take_commas_spaces_all_and_the_former_name():
    assert cli.parse_levels(["attention,dit-attention", "comfyui"]) == ("attention", "dit-attention", "comfyui")
    assert cli.parse_levels(["attention, dit-model"]) == ("attention", "dit-model")
    assert cli.parse_levels(["dit-model,attention"]) == ("attention", "dit-model"), "run in the order of LEVELS"
    assert cli.parse_levels(["model"]) == ("comfyui",), "the comfyui level's former name"
    assert (
        cli.parse_levels(["all"])
        == cli.LEVELS
        == ("attention", "dit-attention", "routes", "comfyui", "dit-model", "fidelity")
    )
    for wrong in (["dit"], [","], ["attention,unet"]):
        with pytest.raises(ValueError, match="choose from"):
            cli.parse_levels(wrong)


def test_the_default_is_todays_default_and_bad_arguments_stop_early():
    args = cli.parse_args([])
    assert args.levels == ("attention", "comfyui") and args.preset == "quick" and args.dit_runs is None
    assert cli.parse_args(["--levels", "dit-model", "--dit-runs", "wan:1664x960x3"]).dit_runs == (
        dit_model.DiTRun("wan", ("1664x960x3",), dit_model.NEW_SETTINGS),
    )
    for wrong in (
        ["--levels", "bogus"],
        ["--dit-runs", "sdxl:1024x1024"],
        ["--dit-runs", "flux:1024"],
        ["--dit-runs", "flux:1024x1024:todo-2"],
        ["--dit-runs", "flux:1024x1024:unpatched,todo-0.5"],
    ):
        with pytest.raises(SystemExit):
            cli.parse_args(wrong)


def test_every_preset_names_runnable_dit_settings():
    for preset in cli.PRESETS.values():
        for run in preset.dit_model:
            assert run.model in dit_model.MODELS and "unpatched" in run.settings
            assert all(DiTSetting.parse(setting).name == setting for setting in run.settings)
    quick = {run.model: run for run in cli.PRESETS["quick"].dit_model}
    assert {"flux", "sd3", "zimage", "flux2", "wan"} <= set(quick)
    assert quick["zimage"].sizes == quick["flux2"].sizes == ("2048x2048",), "twice the native 1024²"
    assert quick["wan"].sizes == ("1664x960x3",), "twice Wan 2.1 1.3B's 832x480, three latent frames"
    assert all(any(s.startswith("ceiling-") for s in run.settings) for run in quick.values())


def test_dit_settings_parse():
    assert DiTSetting.parse("unpatched").node_inputs() is None
    assert DiTSetting.parse("todo-auto").node_inputs() == {}
    two = DiTSetting.parse("todo-2-no-mass-correction")
    assert (two.kind, two.factor, two.mass_correction) == ("todo", 2.0, False)
    assert two.node_inputs() == {"mode": "manual", "depth_1_factor": 2.0}
    assert DiTSetting.parse("ceiling-1.5").factor == 1.5 and DiTSetting.parse("ceiling-auto").factor is None
    for wrong in ("todo", "todo-x", "ceiling-2-no-mass-correction", "tome-0.5", "todo-0.5"):
        with pytest.raises(ValueError):
            DiTSetting.parse(wrong)


def _row(setting: str, seconds: float, keys: int, masked: bool = False) -> dict:
    return {"model": "flux", "size": "2048x2048", "frames": 1, "setting": setting, "seconds_per_step": seconds,
            "runs": [seconds], "speedup": 10.0 / seconds, "blocks": "1 + 1", "text_tokens": 512,
            "attention_calls": [{"q_tokens": 100, "kv_tokens": keys, "masked": masked, "calls": 2}]}  # fmt: skip


def test_each_todo_row_gets_the_ceiling_with_its_keys():
    rows = [_row("unpatched", 10.0, 100), _row("todo-auto", 9.9, 100), _row("todo-2", 6.0, 40, masked=True),
            _row("todo-2-no-mass-correction", 5.5, 40), _row("ceiling-2", 5.0, 40)]  # fmt: skip
    by_setting = {row["setting"]: row for row in with_ceilings(rows)}
    assert by_setting["todo-2"]["ceiling_setting"] == "ceiling-2", "matched by keys, the mask aside"
    assert by_setting["todo-2"]["ceiling_speedup"] == pytest.approx(2.0)
    assert by_setting["todo-2"]["ceiling_share"] == pytest.approx(0.8)
    assert by_setting["todo-2-no-mass-correction"]["ceiling_share"] == pytest.approx(0.9)
    assert by_setting["todo-auto"]["ceiling_setting"] == "unpatched", "a no-op's ceiling is the model itself"
    assert by_setting["todo-auto"]["ceiling_share"] is None
    assert "ceiling_speedup" not in by_setting["ceiling-2"] and "ceiling_speedup" not in by_setting["unpatched"]
    table = dit_model.table(rows)
    assert "| todo-2 | 6.00 | 1.67× | 2.00× | 80% |" in table
    assert "| ceiling-2 | 5.00 | 2.00× | — | — |" in table


def test_committed_results_of_every_level_regenerate(tmp_path, monkeypatch):
    """--from-results reads the results files as committed (older ones lack the newer fields) and writes each
    level's tables to its folder and its README section."""
    readme = tmp_path / "README.md"
    sections = [report.readme_markers(name) for name in ("bench-dit", "bench-dit-model")]
    readme.write_text("".join(f"{start}\nold\n{end}\n" for start, end in sections))
    monkeypatch.setattr(cli, "README", readme)
    out = tmp_path / "out"
    for level in ("dit-attention", "dit-model"):
        args = ["--from-results", str(COMMITTED / level / "results.json"), "--out-dir", str(out), "--update-readme"]
        assert cli.main(args) == 0
        assert (out / level / "results.md").read_text().startswith(("Measured", "CPU"))
        assert json.loads((out / level / "results.json").read_text())["meta"]
    assert "old" not in readme.read_text() and "| text-first | 96x96 | 2 |" in readme.read_text()
    assert "| flux | 1 double + 1 single block" in readme.read_text()


def test_dit_attention_level_measures_every_layout(tmp_path):
    pytest.importorskip("skimage", reason="the benchmark's tokens come from scikit-image's photos")
    assert cli.main(["--preset", "tiny", "--levels", "dit-attention", "--out-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit-attention"], "only the level asked for"
    data = json.loads((tmp_path / "dit-attention" / "results.json").read_text())
    assert data["meta"]["command"].startswith("python -m todo_core.bench --preset tiny --levels dit-attention")
    fidelity = {(r["layout"], r["factor"], r["temporal_factor"], r["mass_correction"]): r for r in data["fidelity"]}
    for name in LAYOUTS:
        plain, corrected = fidelity[(name, 2, 1, False)], fidelity[(name, 2, 1, True)]
        assert 0 < corrected["error_mean"] < 1 and 0 < plain["error_mean"] < 1
        assert corrected["kv_tokens"] < corrected["tokens"]
        variants = {r["variant"] for r in data["timing"] if r["layout"] == name}
        assert {"exact", "todo_uncorrected", "todo_mask", "zero_cost"} <= variants
    assert fidelity[("padded-32", 2, 1, True)]["tokens"] % 32 == 0
    assert fidelity[("video", 2, 2, True)]["kv_tokens"] < fidelity[("video", 2, 1, True)]["kv_tokens"]
    assert fidelity[("video", 2, 1, True)]["text_query_error_mean"] is None, "no text in video self-attention"
    assert all(r["seconds"] > 0 for r in data["timing"])
    text = (tmp_path / "dit-attention" / "results.md").read_text()
    assert all(f"| {name} |" in text for name in LAYOUTS)


# Through ComfyUI: the child process of the DiT model level, and its ceiling override in this process.


@pytest.mark.comfyui
def test_dit_model_level_runs_a_model_with_its_ceiling(tmp_path, monkeypatch, node):
    readme = tmp_path / "README.md"
    start, end = report.readme_markers("bench-dit-model")
    readme.write_text(f"{start}\nold\n{end}\n")
    monkeypatch.setattr(cli, "README", readme)
    out = tmp_path / "results"
    assert cli.main(["--preset", "tiny", "--levels", "dit-model", "--out-dir", str(out), "--update-readme"]) == 0
    data = json.loads((out / "dit-model" / "results.json").read_text())
    assert [row["setting"] for row in data["rows"]] == ["unpatched", "todo-2", "ceiling-2"]
    assert data["meta"]["complete"] and data["meta"]["backend"] == "attention_pytorch"
    assert all(row["seconds_per_step"] > 0 and row["todo_acts"] is not False for row in data["rows"])
    assert data["checks"]["flux 128² ceiling-2: the backend gets the keys todo-2 keeps, call by call"] is True
    assert data["checks"]["flux 128² todo-2: finite, differs from unpatched"] is True
    ceiling = with_ceilings(data["rows"])[1]
    assert ceiling["ceiling_setting"] == "ceiling-2" and ceiling["ceiling_speedup"] > 0
    assert "share of the ceiling's saving" in readme.read_text() and "old" not in readme.read_text()


class ViewProbe:
    """Records, per attention call, the keys' length, whether they are a view into a larger tensor, the mask."""

    passes_attention_masks = True  # ToDo's correction reaches it as a mask, as it reaches the backend

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool, bool]] = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, attention, q, k, v, *args, **kwargs):
        dim = 2 if kwargs.get("skip_reshape", False) else 1
        mask = args[1] if len(args) >= 2 else kwargs.get("mask")
        view = k.untyped_storage().nbytes() > k.numel() * k.element_size()
        self.calls.append((k.shape[dim], view, mask is not None))
        return attention(q, k, v, *args, **kwargs)


@pytest.fixture(scope="module")
def dit_level(node):
    spec = importlib.util.spec_from_file_location("bench_dit_level", PACK_ROOT / "benchmarks" / "dit_level.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.comfyui
@pytest.mark.parametrize(
    ("name", "size"), [("wan", "64x64x3"), ("sd3", "64x48"), ("zimage", "96x80"), ("flux2", "64x48")]
)
def test_the_ceiling_gets_todos_keys_as_a_free_slice(dit_level, name, size):
    """Every call ToDo reduces reaches the backend, under the ceiling, with as many keys, sliced from the full
    keys (a view: no gather) and without a correction mask; the other calls are left alone."""
    spec = dit_level.tiny(dit_level.MODELS[name])
    base, _ = dit_level.build_model(spec, torch.device("cpu"))
    probe = ViewProbe()
    base.model_options["transformer_options"][dit_level.OVERRIDE_KEY] = probe
    seen = {}
    for setting in ("unpatched", "todo-2", "ceiling-2"):
        probe.calls.clear()
        out = dit_level.one_step(dit_level.patched(base, DiTSetting.parse(setting)), spec, size, seed=1)
        assert torch.isfinite(out).all()
        seen[setting] = list(probe.calls)
    reduced = [i for i, (todo, full) in enumerate(zip(seen["todo-2"], seen["unpatched"], strict=True)) if todo != full]
    assert reduced, f"ToDo reduces some calls of {name}"
    for i, (keys, view, masked) in enumerate(seen["ceiling-2"]):
        assert keys == seen["todo-2"][i][0]
        if i in reduced:
            assert view and not masked
        else:
            assert (keys, view, masked) == seen["unpatched"][i]


@pytest.mark.comfyui
def test_every_dit_model_of_the_level_builds_and_steps(dit_level):
    """The narrow version of every model the level measures: built from ComfyUI's classes, one finite step."""
    for name, spec in dit_level.MODELS.items():
        tiny = dit_level.tiny(spec)
        base, probe = dit_level.build_model(tiny, torch.device("cpu"))
        size = "64x64x2" if name == "wan" else "64x64"
        assert torch.isfinite(dit_level.one_step(base, tiny, size, seed=0)).all()
        assert probe.calls, f"{name}: its attention goes through the override"


def test_the_former_dit_attention_entry_point_is_the_one_command():
    done = subprocess.run([sys.executable, "-m", "todo_core.bench.dit_attention", "--levels", "bogus"],
                          capture_output=True, text=True, cwd=PACK_ROOT)  # fmt: skip
    assert done.returncode == 2 and "python -m todo_core.bench" in done.stderr and "choose from" in done.stderr


def test_the_routes_level_times_every_route_and_each_equals_the_oracle(tmp_path):
    """``--levels routes``: every route of the mass correction timed beside the same keys uncorrected, each one's
    error against the float64 oracle at float32 rounding, a results file and a table."""
    assert cli.main(["--levels", "routes", "--preset", "tiny", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "routes" / "results.json").read_text())
    variants = {(r["head_dim"], r["variant"]) for r in data["routes"]}
    for head_dim in (128, 64):
        assert {(head_dim, v) for v in ("uncorrected", "mask", "fold", "lse-merge", "zero_cost")} <= variants
    routes = [r for r in data["routes"] if r["variant"] in ("mask", "fold", "lse-merge")]
    assert routes and all(r["error_vs_float64_oracle"] < 1e-5 for r in routes)
    assert "| lse-merge |" in (tmp_path / "routes" / "results.md").read_text()
