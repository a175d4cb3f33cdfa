"""Every ToDoModelPatch input at and beyond its bounds, NaN/inf and wrong types: refused naming the input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

FACTORS = ["depth_1_factor", "depth_2_factor", "depth_3_factor"]
ACCEPTED = [
    *[(name, value) for name in FACTORS for value in (1.0, 1, 1.25, 8.0, 8)],
    *[(name, value) for name in ("start_percent", "end_percent") for value in (0.0, 1.0)],
    *[("native_resolution", value) for value in (0, 64, 1024, 8192)],
    *[("mode", value) for value in ("auto", "manual", "fidelity")],
    *[("method", v) for v in ("nearest", "avg_pool", "max_pool", "area", "bilinear", "bicubic", "nearest-exact")],
    *[("temporal_factor", value) for value in (1.0, 1, 2.5, 8.0)],
    *[("dit_blocks", v) for v in ("all", "", " ALL ", "double", "single:0-19", "double, single:5", "0-9, 30", "7")],
    *[("max_error", value) for value in (0.001, 0.03, 0.5)],
    *[("report_error", value) for value in (True, False)],
]  # fmt: skip
NON_FINITE = (math.nan, math.inf, -math.inf)
REFUSED = [
    *[(name, value) for name in FACTORS for value in (0.0, 0.999, 8.001, 100.0, -1.0, *NON_FINITE, "2", True, [2.0])],
    *[(name, value) for name in ("start_percent", "end_percent") for value in (-0.001, 1.001, *NON_FINITE, "0.5")],
    *[("native_resolution", value) for value in (-8, 8, 63, 8193, 100.5, *NON_FINITE, "512")],
    ("mode", "Auto"), ("mode", "fast"), ("mode", 1), ("mode", ""),
    ("method", "nearest-ish"), ("method", "NEAREST"), ("method", 0), ("method", ""),
    *[("temporal_factor", value) for value in (0.0, 0.999, 8.001, -1.0, *NON_FINITE, "2", True)],
    *[("dit_blocks", v) for v in ("doubles", "3-1", "a-b", "1,,2", "-1", "single:0-", 5, ["all"])],
    *[("max_error", value) for value in (0.0, 0.0009, 0.501, 1.0, -0.03, *NON_FINITE, "0.03", True)],
    *[("report_error", value) for value in ("yes", 1, 0, 1.0)],
]  # fmt: skip


def case_id(case) -> str:
    return f"{case[0]}={case[1]!r}"


def test_every_input_of_the_node_has_bad_input_cases(node):
    declared = node.define_schema().inputs
    names = {i.id for i in declared} - {"model"}
    assert names == {case[0] for case in ACCEPTED} == {case[0] for case in REFUSED}


@pytest.mark.parametrize("case", ACCEPTED, ids=case_id)
def test_values_at_the_bounds_are_accepted(node, case):
    name, value = case
    assert node.validate_inputs(**{name: value}) is True


@pytest.mark.parametrize("case", REFUSED, ids=case_id)
def test_values_beyond_the_bounds_are_refused_naming_the_input(node, case):
    name, value = case
    result = node.validate_inputs(**{name: value})
    assert isinstance(result, str) and name in result, result


def test_start_after_end_names_both(node):
    result = node.validate_inputs(start_percent=0.6, end_percent=0.4)
    assert isinstance(result, str) and "start_percent" in result and "end_percent" in result


def test_execute_refuses_what_validation_refuses(node, sd15):
    """A client that skips validation (or a linked value) still gets the input named, not a broken patch."""
    from comfy_support import apply_node

    with pytest.raises(Exception, match="depth_2_factor"):
        apply_node(node, sd15, mode="manual", depth_2_factor=math.nan)


# --- through the server's /prompt, as a client sends them (slow: starts ComfyUI) -----------------------------------

API_REFUSED = [
    ("depth_1_factor", 8.5), ("depth_2_factor", -1.0), ("depth_3_factor", "abc"), ("depth_1_factor", math.nan),
    ("start_percent", 1.5), ("end_percent", "inf"), ("native_resolution", 8193), ("native_resolution", 32),
    ("native_resolution", "many"), ("mode", "fast"), ("mode", 3), ("method", None),
    ("temporal_factor", 9.0), ("dit_blocks", "tripple"), ("max_error", 0.9), ("mode", "Fidelity"),
]  # fmt: skip


@pytest.mark.slow
def test_bad_inputs_through_the_api(server):
    from test_e2e_server import WORKFLOWS, ObjectInfo
    from workflow_api import to_api_prompt

    template = to_api_prompt(
        json.loads(Path(WORKFLOWS[0]).read_text()), ObjectInfo.node_classes(server.get("/object_info"))
    )
    for name, value in API_REFUSED:
        prompt = json.loads(json.dumps(template))
        todo = next(entry for entry in prompt.values() if entry["class_type"] == "ToDoModelPatch")
        todo["inputs"][name] = value
        status, reply = server.post("/prompt", {"prompt": prompt})
        assert status == 400, (name, value, reply)
        assert name in json.dumps(reply.get("node_errors", reply)), (name, value, reply)
