"""Turn a ComfyUI UI-format workflow (what users share) into the API prompt the server validates and runs."""

from __future__ import annotations

from typing import Any

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute"}
"""Nodes that live only in the editor and never reach the server."""


def _is_widget(spec: tuple) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def to_api_prompt(workflow: dict[str, Any], node_classes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Map links to ``[source_id, slot]`` and widget values to input names in the node's declared order.

    A workflow saved before a node gained an input has fewer widget values: the
    missing trailing ones take the input's default, as ComfyUI's frontend does.
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        declared = node_classes[node["type"]].INPUT_TYPES()
        specs = {**declared.get("required", {}), **declared.get("optional", {})}
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs: dict[str, Any] = {name: [str(link[1]), link[2]] for name, link in linked.items()}
        widgets = iter(node.get("widgets_values", []))
        for name, spec in specs.items():
            if not _is_widget(spec) or name in linked:
                continue
            inputs[name] = next(widgets, spec[1].get("default") if len(spec) > 1 else None)
            if len(spec) > 1 and spec[1].get("control_after_generate"):
                next(widgets)  # "randomize" / "fixed": UI-only
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
