"""The hot path: no host sync and no per-call allocation beyond the reduction itself, in every attention call.

A GPU pays for what a CPU hides: a device-to-host read (``.item()``,
``float(tensor)``, ``.tolist()``) stalls the stream, and an index tensor built
or copied per call allocates and launches. Every aten op ToDo's attention paths
run is counted here with a ``TorchDispatchMode``, per attention call in steady
state (after a warm-up call that fills the caches), and compared with exactly
what the work needs:

- UNet attn1 patch, integer factors (nearest): a strided view of the grid and
  the copy that makes the kept keys contiguous (``view``, ``slice``, ``clone``,
  ``_unsafe_view``);
- fractional factors (nearest): one gather with the cached row and column
  indices (``view``, ``unsqueeze``, ``index``); pooling and interpolation: the
  kernel on a channels-last view (``view``, ``permute`` and the kernel);
- DiT override: one ``index_select`` per tensor reduced (keys, values, the
  caller's mask) and, with mass correction, a ``view`` of the cached bias and
  the ``add`` onto a caller's mask;
- outside the step window: nothing at all (the window is decided once per model
  call by the node's wrapper, which reads the sigma once).

``.tolist()`` on a CPU tensor reads memory without the dispatcher, so it is
counted by patching ``torch.Tensor.tolist``.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager, nullcontext

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from todo_core import DownsampleMethod, ToDoAttn1Patch, ToDoConfig
from todo_core.dit import DIT_FAMILIES, LATENT_INFO_KEY, BlockSelection, ToDoAttentionOverride
from todo_core.downsample import nearest_indices, nearest_rows, output_side
from todo_core.families import LatentInfo
from todo_core.patch import IN_WINDOW_KEY, ModelCall, in_sigma_window, published

HOST_SYNCS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default", "tolist"}
FACTORIES = {
    f"aten.{name}"
    for name in (
        "arange.default",
        "arange.start",
        "arange.start_step",
        "empty.memory_format",
        "empty_strided.default",
        "zeros.default",
        "ones.default",
        "full.default",
        "scalar_tensor.default",
        "lift_fresh.default",
        "lift_fresh_copy.default",
        "_to_copy.default",
    )
}
"""What must never run per attention call: tensor creation, and copies of cached indices to a device or dtype."""

UNET_NEAREST_INTEGER = Counter(
    {"aten.view.default": 1, "aten.slice.Tensor": 2, "aten.clone.default": 1, "aten._unsafe_view.default": 1}
)
UNET_NEAREST_FRACTIONAL = Counter({"aten.view.default": 2, "aten.unsqueeze.default": 2, "aten.index.Tensor": 1})


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
"""On a GPU, a copy of a cached index tensor to the device would show as ``_to_copy``."""


def unet_kernel_ops(kernel: str) -> Counter:
    return Counter({"aten.view.default": 2, "aten.permute.default": 2, f"aten.{kernel}.default": 1})


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run while active and not paused (the attention backend itself is paused)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def pause(self):
        self.paused, was = True, self.paused
        try:
            yield
        finally:
            self.paused = was


@contextmanager
def counting(monkeypatch):
    """An :class:`OpCounter` that also counts ``Tensor.tolist`` (a host read the dispatcher does not see)."""
    counter = OpCounter()
    original = torch.Tensor.tolist

    def tolist(tensor):
        if not counter.paused:
            counter.ops["tolist"] += 1
        return original(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with counter:
        yield counter
    monkeypatch.setattr(torch.Tensor, "tolist", original)


def assert_clean(ops: Counter, allowed: Counter) -> None:
    syncs = {op: n for op, n in ops.items() if op in HOST_SYNCS}
    factories = {op: n for op, n in ops.items() if op in FACTORIES}
    assert not syncs, f"host syncs per attention call: {syncs}"
    assert not factories, f"tensor creations per attention call: {factories}"
    assert ops == allowed, f"ops per attention call changed: {dict(ops)}, allowed {dict(allowed)}"


def unet_options(height: int, width: int, **extra) -> dict:
    return {
        "original_shape": [2, 4, height, width],
        "activations_shape": [2, 320, height, width],
        "block": ("input", 1),
        "sigmas": torch.tensor([5.0, 5.0]),
        **extra,
    }


UNET_CASES = {
    "nearest-2": (2.0, DownsampleMethod.NEAREST, UNET_NEAREST_INTEGER),
    "nearest-1.5": (1.5, DownsampleMethod.NEAREST, UNET_NEAREST_FRACTIONAL),
    "nearest-2.5": (2.5, DownsampleMethod.NEAREST, UNET_NEAREST_FRACTIONAL),
    "avg_pool-2": (2.0, DownsampleMethod.AVG_POOL, unet_kernel_ops("avg_pool2d")),
    "avg_pool-1.5": (1.5, DownsampleMethod.AVG_POOL, unet_kernel_ops("_adaptive_avg_pool2d")),
    "bilinear-1.5": (1.5, DownsampleMethod.BILINEAR, unet_kernel_ops("upsample_bilinear2d")),
}


@pytest.mark.parametrize("window", ["no window", "in window", "published"])
@pytest.mark.parametrize("case", list(UNET_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_unet_patch_per_call(monkeypatch, case, window, dtype, device):
    factor, method, allowed = UNET_CASES[case]
    patch = ToDoAttn1Patch(ToDoConfig.create("manual", factor, 1.0, 1.0, method=method))
    n = torch.randn(2, 27 * 20, 16, dtype=dtype, device=device)
    k, v = torch.randn_like(n), torch.randn_like(n)
    options = unet_options(27, 20, **({IN_WINDOW_KEY: True} if window == "in window" else {}))
    call = ModelCall(True, None, patch.settings)
    patch(n, k, v, options)  # warm-up: the caches fill
    with published(call), counting(monkeypatch) as counter:
        out = patch(n, k, v, options)
    assert out[1].shape[1] == output_side(27, factor) * output_side(20, factor)
    assert_clean(counter.ops, Counter({op: 2 * count for op, count in allowed.items()}))  # keys and values


def test_unet_patch_outside_the_window_runs_nothing(monkeypatch):
    patch = ToDoAttn1Patch(ToDoConfig.create("manual", 1.5, 1.0, 1.0))
    n = torch.randn(2, 16 * 16, 16)
    options = unet_options(16, 16, **{IN_WINDOW_KEY: False})
    with counting(monkeypatch) as counter:
        out = patch(n, n, n, options)
    assert out[1] is n
    assert counter.ops == Counter()


FLUX = DIT_FAMILIES["flux"]
LATENT = LatentInfo(1, 30, 22, 4)  # 15 x 11 tokens: fractional factors leave smaller border groups
TOKENS = 4 + 15 * 11


def dit_call(
    counters: list[OpCounter], mass_correction: bool, factor: float, mask_kind: str | None, dtype, device="cpu"
):
    """An override, a function calling it once, and the key counts its backend saw (not counted in ``counters``)."""
    override = ToDoAttentionOverride(
        ToDoConfig.create(mode="manual", depth_1_factor=factor),
        FLUX,
        BlockSelection.parse("all"),
        mass_correction=mass_correction,
    )
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, TOKENS, 8, generator=generator).to(device, dtype) for _ in range(3))
    mask = None if mask_kind is None else torch.zeros(1, 1, TOKENS, TOKENS, dtype=dtype, device=device)
    seen = []

    def backend(q, k, v, heads, mask=None, **kwargs):
        seen.append(k.shape[2])
        with counters[0].pause() if counters else nullcontext():
            return q.clone()

    def run(options):
        return override(backend, q, k, v, 2, mask=mask, skip_reshape=True, transformer_options=options)

    return override, run, seen


@pytest.mark.parametrize("window", ["no window", "in window", "published"])
@pytest.mark.parametrize("mask_kind", [None, "float"], ids=["no-mask", "float-mask"])
@pytest.mark.parametrize("mass_correction", [True, False], ids=["corrected", "uncorrected"])
@pytest.mark.parametrize("factor", [2.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_dit_override_per_call(monkeypatch, window, mask_kind, mass_correction, factor, dtype, device):
    holder: list[OpCounter] = []
    override, run, seen = dit_call(holder, mass_correction, factor, mask_kind, dtype, device)
    options = {LATENT_INFO_KEY: LATENT, **({IN_WINDOW_KEY: True} if window == "in window" else {})}
    run(options)  # warm-up
    call = ModelCall(True, LATENT, override.settings)
    with published(call), counting(monkeypatch) as counter:
        holder.append(counter)
        run(options)
    kept = 4 + output_side(15, factor) * output_side(11, factor)
    assert seen == [kept, kept]
    allowed = Counter({"aten.index_select.default": 2 + (mask_kind is not None)})
    if mass_correction:
        allowed["aten.view.default"] = 1  # the cached bias, as a row of the mask
        if mask_kind is not None:
            allowed["aten.add.Tensor"] = 1  # the bias onto the caller's mask: the mask is the work
    assert_clean(counter.ops, allowed)


def test_dit_override_outside_the_window_runs_nothing(monkeypatch):
    holder: list[OpCounter] = []
    _, run, seen = dit_call(holder, True, 1.5, None, torch.float32)
    with counting(monkeypatch) as counter:
        holder.append(counter)
        run({LATENT_INFO_KEY: LATENT, IN_WINDOW_KEY: False})
    assert seen == [TOKENS]
    assert counter.ops == Counter()


def test_in_sigma_window_reads_no_tensor(monkeypatch):
    """The per-call window check is a dictionary lookup: even a sigma on the options is never read."""
    sigmas = torch.tensor([3.0])
    with counting(monkeypatch) as counter:
        assert in_sigma_window({"sigmas": sigmas})
        assert not in_sigma_window({"sigmas": sigmas, IN_WINDOW_KEY: False})
        with published(ModelCall(False)):  # eager code never reads the published record
            assert in_sigma_window({"sigmas": sigmas, IN_WINDOW_KEY: True})
    assert counter.ops == Counter()


@given(side=st.integers(1, 300), factor=st.floats(1.0, 8.0, allow_nan=False))
def test_the_nearest_rows_are_the_float64_formula(side, factor):
    """The index cache is built from Python floats: the same rows the float64 tensor formula gives."""
    count = output_side(side, factor)
    formula = torch.floor(torch.arange(count, dtype=torch.float64) * factor + 1e-6).long().clamp_(max=side - 1)
    assert nearest_rows(side, factor) == tuple(formula.tolist())
    assert torch.equal(nearest_indices(side, factor, torch.device("cpu")), formula)


# --------------------------------------------------------------------------------------------------------------
# Traced by torch.compile: every path in one graph (fullgraph), decided from the published record.
# --------------------------------------------------------------------------------------------------------------


def compiled_once(function):
    """``function`` compiled whole (a graph break raises), with dynamo reset before and after."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(function, fullgraph=True, backend="eager")


@pytest.mark.parametrize("in_window", [True, False], ids=["in-window", "window-closed"])
@pytest.mark.parametrize("case", [*UNET_CASES, "temporal tokens"])
def test_unet_patch_traces_in_one_graph(case, in_window):
    """No graph break in the attn1 patch: not for a fractional factor, a pooling method or a pass-through (the
    temporal-attention warning is not logged while tracing), and the window comes from the published record."""
    factor, method, _ = UNET_CASES.get(case, (2.0, DownsampleMethod.NEAREST, None))
    patch = ToDoAttn1Patch(ToDoConfig.create("manual", factor, 1.0, 1.0, method=method))
    n = torch.randn(2 * 27 * 20, 3, 16) if case == "temporal tokens" else torch.randn(2, 27 * 20, 16)
    options = unet_options(27, 20, sample_sigmas=torch.tensor([1.0, 0.0]))
    expected = patch(n, n, n, {**options, IN_WINDOW_KEY: in_window})[1]
    compiled = compiled_once(lambda x: patch(x, x, x, options)[1] + 0)
    with published(ModelCall(in_window, None, patch.settings)):
        out = compiled(n)
    assert torch.equal(out, expected)
    assert out.shape == n.shape if case == "temporal tokens" or not in_window else out.shape[1] < n.shape[1]


@pytest.mark.parametrize("in_window", [True, False], ids=["in-window", "window-closed"])
@pytest.mark.parametrize("mask_kind", [None, "float"], ids=["no-mask", "float-mask"])
@pytest.mark.parametrize("mass_correction", [True, False], ids=["corrected", "uncorrected"])
def test_dit_override_traces_in_one_graph(mass_correction, mask_kind, in_window):
    """No graph break in the DiT override (kept keys, group sizes and their uniformity decided without reading a
    tensor); its latent grid and window come from the published record, not from the unguarded options."""
    override, run, seen = dit_call([], mass_correction, 1.5, mask_kind, torch.float32)
    expected = run({LATENT_INFO_KEY: LATENT, IN_WINDOW_KEY: in_window})
    compiled = compiled_once(lambda: run({}))  # nothing in the options: the record is all the graph reads
    with published(ModelCall(in_window, LATENT, override.settings)):
        out = compiled()
    assert torch.equal(out, expected)
    assert seen[0] == seen[1] == (4 + 10 * 8 if in_window else TOKENS)


# --------------------------------------------------------------------------------------------------------------
# Through ComfyUI's sampler: every ToDo attention call of a second render, and ToDo's own work per model call.
# --------------------------------------------------------------------------------------------------------------


class Recorder:
    """Per call of a wrapped ToDo callable, the aten ops it ran itself (its attention backend paused)."""

    def __init__(self) -> None:
        self.calls: list[Counter] = []
        self.current: OpCounter | None = None

    def wrap(self, monkeypatch, cls, attribute: str = "__call__") -> None:
        original = getattr(cls, attribute)
        recorder = self

        def counted(this, *args, **kwargs):
            counter = OpCounter()
            recorder.current = counter
            try:
                with counter:
                    return original(this, *args, **kwargs)
            finally:
                recorder.current = None
                recorder.calls.append(counter.ops)

        monkeypatch.setattr(cls, attribute, counted)

    def paused(self):
        return self.current.pause() if self.current is not None else nullcontext()


class PausingExecutor:
    """The apply-model executor handed to ToDo's model-call wrapper, with the model's own ops not counted."""

    def __init__(self, executor, recorder: Recorder) -> None:
        self.executor, self.recorder, self.class_obj = executor, recorder, executor.class_obj

    def __call__(self, *args, **kwargs):
        with self.recorder.paused():
            return self.executor(*args, **kwargs)


def render_twice(kind: str, patched) -> None:
    """A warm-up render, then the render whose calls count (same size: every cache already filled)."""
    if kind == "sd15":
        from comfy_support import sample

        sample(patched, (16, 16), steps=3, cfg=1.0)
    else:
        from dit_support import sample_dit

        sample_dit(patched, 8, 8, steps=3)


@pytest.mark.comfyui
@pytest.mark.parametrize("kind", ["sd15", "flux"])
@pytest.mark.parametrize("end_percent", [1.0, 0.5], ids=["whole-schedule", "window"])
def test_sampler_attention_calls_and_model_calls(node, monkeypatch, kind, end_percent):
    """A sampler run: ToDo's attention calls run only the reduction; its model-call wrapper reads the sigma once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # op counts do not depend on threads; shared CI cores make OpenMP threads slow
    try:
        run_sampler_case(node, monkeypatch, kind, end_percent)
    finally:
        torch.set_num_threads(threads)


def run_sampler_case(node, monkeypatch, kind: str, end_percent: float) -> None:
    from comfy.patcher_extension import WrappersMP
    from comfy_support import apply_node, import_comfyui, tiny_model
    from dit_support import tiny_dit, with_probe

    import_comfyui()
    base = tiny_model("sd15") if kind == "sd15" else tiny_dit("flux")
    attention_calls, model_calls = Recorder(), Recorder()
    if kind == "flux":
        base, probe = with_probe(base)  # ToDo's inner override: the backend's own ops are not ToDo's
        monkeypatch.setattr(type(probe), "__call__", pausing(type(probe).__call__, attention_calls))
    settings = {"mode": "manual", "depth_1_factor": 1.5, "end_percent": end_percent}
    patched = apply_node(node, base, **settings)
    if kind == "sd15":
        (patch,) = patched.model_options["transformer_options"]["patches"]["attn1_patch"]
        attention_calls.wrap(monkeypatch, type(patch))
    else:
        attention_calls.wrap(
            monkeypatch, type(patched.model_options["transformer_options"]["optimized_attention_override"])
        )
    (wrapper,) = patched.get_wrappers(WrappersMP.APPLY_MODEL, "comfyui_todo")
    original = type(wrapper).__call__

    def with_pausing_executor(this, executor, *args, **kwargs):
        return original(this, PausingExecutor(executor, model_calls), *args, **kwargs)

    monkeypatch.setattr(type(wrapper), "__call__", with_pausing_executor)
    model_calls.wrap(monkeypatch, type(wrapper))

    render_twice(kind, patched)
    attention_calls.calls.clear()
    model_calls.calls.clear()
    render_twice(kind, patched)

    assert model_calls.calls and attention_calls.calls
    window = end_percent < 1.0
    # The sigma of each model call, read once, only to decide the window; the window itself is converted from
    # percents (ComfyUI's percent_to_sigma reads tensors) once per render, in its first model call.
    expected = Counter({"aten.select.int": 1, "aten._local_scalar_dense.default": 1}) if window else Counter()
    first, *others = [ops - Counter({"aten.view.default": ops["aten.view.default"]}) for ops in model_calls.calls]
    assert others and all(ops == expected for ops in others), [dict(ops) for ops in others]
    assert first == expected or window
    reduced = 0
    for ops in attention_calls.calls:
        syncs = {op: n for op, n in ops.items() if op in HOST_SYNCS}
        factories = {op: n for op, n in ops.items() if op in FACTORIES}
        assert not syncs and not factories, (dict(ops), syncs, factories)
        reduced += bool(ops)
    assert reduced, "ToDo must have reduced some calls"
    if window:
        assert reduced < len(attention_calls.calls), "calls outside the window run no op at all"


def pausing(call, recorder: Recorder):
    """An inner override's ``__call__`` during which the recorder's current counter is paused."""

    def paused(this, *args, **kwargs):
        with recorder.paused():
            return call(this, *args, **kwargs)

    return paused
