"""Side-by-side eager latency: models timed in one process, interleaved round by round.

Interleaving (A, B, B, A, ...) keeps slow drifts of the machine (frequency, other load) from
favouring one model; the ratio of medians is the number to quote, not the absolute times.

:func:`benchmark` is ``repfuse bench``: it converts a model once and puts the original and the
fused model side by side: eager CPU latency per batch size, parameters, MACs, bytes moved, graph
ops (in all and per kind, :data:`OP_KINDS`), and the fused model's error against the original
run in float64. JSON layout (``schema_version`` 1, :meth:`BenchResult.to_dict`)::

    {
      "kind": "bench", "schema_version": 1,
      "model": "repvgg_a0",
      "torch": "2.x.y", "threads": 2, "device": "cpu", "dtype": "float32",
      "repeat": 20, "warmup": 3,
      "convert_seconds": 0.41,                 # trace + passes, once (no verification)
      "input_shapes": [[1, 3, 224, 224]],     # the inputs converted with; costs are for them
      "capture": {"partial": false, "specialized": []},
      "models": {
        "original": {"params": 9.1e6, "macs": 1.5e9, "bytes": 1.2e8, "ops": 117,
                     "ops_by_kind": {"conv": 43, "linear": 1, "batchnorm": 64, "add": ...}},
        "fused": {...same keys...}
      },
      "batches": [
        {"batch": 1, "input_shapes": [[1, 3, 224, 224]],
         "latency_ms": {"original": {"median_ms": ..., "min_ms": ..., "runs": 20},
                        "fused": {...}},
         "speedup": 1.9,                       # original median / fused median
         "max_rel_error": {"original": 3e-7, "fused": 4e-7}}
      ]
    }

The table of ``repfuse bench`` (:meth:`BenchResult.rows`) is drawn from this JSON by
:func:`repfuse.verify.render.bench_rows`, like every other rendering of it.

``max_rel_error`` is ``max|y - y64| / max|y64|`` (the verifier's ``max_rel``, the largest over
the output tensors), where ``y64`` is the original model run in float64 on the timed input and
``y`` the model in its own dtype: the fused error next to the original's own rounding error.
Non-finite floats are written as the strings ``"inf"``/``"nan"``.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves

from repfuse.capture import ExampleInputs, as_input_tuple, capture, parts_of
from repfuse.convert import Conversion, convert
from repfuse.cost import GraphCost, op_name
from repfuse.errors import RepfuseError
from repfuse.graph import arith_kind, batchnorm_view, layer_view
from repfuse.passes import resolve
from repfuse.passes.nonlinear import not_mergeable
from repfuse.verify import deploy_dtype_of, eval_mode
from repfuse.verify.compare import ErrorMetrics, json_float
from repfuse.verify.render import bench_rows

SCHEMA_VERSION = 1

# The kinds graph ops are counted by; every op falls in exactly one (the last is the rest:
# views, flatten, mul, getitem, LRN, ...).
OP_KINDS = ("conv", "linear", "batchnorm", "add", "cat", "pool", "activation", "other")
_CATS = {"cat", "concat", "concatenate"}

# Called as progress(what is running, steps done, steps in all).
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    runs: int

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "runs": self.runs}


def time_models(
    models: Mapping[str, nn.Module],
    inputs: tuple[Tensor, ...],
    *,
    warmup: int = 3,
    repeat: int = 20,
    on_round: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Median and min wall time of ``model(*inputs)`` per model, interleaved, under no_grad.

    ``on_round`` is called after each round (warm-up rounds included): every model run once.
    """
    names = list(models)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                models[name](*inputs)
            if on_round is not None:
                on_round()
        for round_index in range(repeat):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                start = time.perf_counter()
                models[name](*inputs)
                samples[name].append((time.perf_counter() - start) * 1e3)
            if on_round is not None:
                on_round()
    return {
        name: Timing(statistics.median(s), min(s), len(s)) for name, s in samples.items()
    }


# --- what the graphs hold ---------------------------------------------------------------------


def op_kind(gm: GraphModule, node: Node, activations: set[Node]) -> str | None:
    """The :data:`OP_KINDS` entry of ``node``, None for plumbing (placeholders, get_attr,
    output); ``activations`` are the nodes :func:`~repfuse.passes.nonlinear.not_mergeable`
    calls activations."""
    name = op_name(gm, node)
    if name is None:
        return None
    view = layer_view(gm, node)
    if view is not None:
        return "linear" if view.kind == "linear" else "conv"
    lowered = name.lower()
    if lowered.startswith("conv"):
        return "conv"  # weights computed at run time (dynamic conv), or called with kwargs
    if lowered.startswith("linear"):
        return "linear"
    if batchnorm_view(gm, node) is not None:
        return "batchnorm"
    if "pool" in lowered:
        return "pool"
    if node in activations:
        return "activation"
    if arith_kind(node) == "add":
        return "add"
    if lowered.split(".")[0] in _CATS:
        return "cat"
    return "other"


def count_op_kinds(module: nn.Module) -> Counter:
    """Ops per kind over the traced graph(s) of a captured or fused module (its eager
    remainder, for a partial capture, is not counted)."""
    counts: Counter = Counter(dict.fromkeys(OP_KINDS, 0))
    for _, gm in parts_of(module):
        activations = set(_activation_nodes(gm))
        for node in gm.graph.nodes:
            kind = op_kind(gm, node, activations)
            if kind is not None:
                counts[kind] += 1
    return counts


def _activation_nodes(gm: GraphModule) -> Iterable[Node]:
    by_name = {node.name: node for node in gm.graph.nodes}
    return (by_name[op.node] for op in not_mergeable(gm) if op.kind == "activation")


@dataclass(frozen=True)
class ModelStats:
    """Size and graph of one model: the cost model's numbers and the ops per kind."""

    params: int
    macs: int
    bytes: int
    ops_by_kind: dict[str, int]

    @property
    def ops(self) -> int:
        return sum(self.ops_by_kind.values())

    @classmethod
    def of(cls, module: nn.Module, cost: GraphCost) -> ModelStats:
        return cls(cost.params, cost.macs, cost.bytes, dict(count_op_kinds(module)))

    def to_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "bytes": self.bytes, "ops": self.ops,
                "ops_by_kind": dict(self.ops_by_kind)}


# --- timing and fidelity ----------------------------------------------------------------------


@dataclass(frozen=True)
class BatchResult:
    """Latency and error of both models at one batch size."""

    batch: int
    input_shapes: list[list[int]]
    original: Timing
    fused: Timing
    max_rel_error: dict[str, float]  # "original", "fused": own dtype vs the float64 original

    @property
    def speedup(self) -> float:
        return self.original.median_ms / self.fused.median_ms

    def to_dict(self) -> dict:
        return {
            "batch": self.batch, "input_shapes": self.input_shapes,
            "latency_ms": {"original": self.original.to_dict(), "fused": self.fused.to_dict()},
            "speedup": json_float(self.speedup),
            "max_rel_error": {k: json_float(v) for k, v in self.max_rel_error.items()},
        }


def with_batch(inputs: tuple[Tensor, ...], size: int) -> tuple[Tensor, ...]:
    """``inputs`` with ``size`` rows along dimension 0, the example's rows repeated in turn
    (the same trailing shape and values)."""
    if all(t.dim() > 0 and t.shape[0] == size for t in inputs):
        return inputs
    batched = []
    for t in inputs:
        if t.dim() == 0 or t.shape[0] == 0:
            raise RepfuseError(f"cannot make a batch of {size} from an input of shape "
                               f"{list(t.shape)}: it has no batch dimension")
        batched.append(t[torch.arange(size) % t.shape[0]])
    return tuple(batched)


def output_tensors(model, inputs: tuple[Tensor, ...], role: str = "model") -> list[Tensor]:
    """The tensor leaves of ``model(*inputs)``, in order (``model``: any callable)."""
    try:
        with torch.no_grad():
            outputs = model(*inputs)
    except Exception as exc:
        raise RepfuseError(f"running the {role} failed: {type(exc).__name__}: {exc}") from exc
    return [t for t in tree_leaves(outputs) if isinstance(t, Tensor)]


def max_rel_between(expected: Sequence[Tensor], actual: Sequence[Tensor]) -> float:
    """``max|y - y64| / max|y64|`` per output tensor (the verifier's ``max_rel``), the largest
    over the outputs."""
    if len(expected) != len(actual) or not expected:
        raise RepfuseError(f"the models return {len(expected)} and {len(actual)} tensors; "
                           "cannot compare them")
    return max(ErrorMetrics.between(e, a).max_rel for e, a in zip(expected, actual, strict=True))


def float64_outputs(reference64: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """The outputs of ``reference64`` (a float64 copy of the original) on ``inputs`` cast to
    float64: the truth every model's error is measured against."""
    as64 = tuple(t.to(torch.float64) if t.is_floating_point() else t for t in inputs)
    return output_tensors(reference64, as64, "original in float64")


# --- the whole benchmark ----------------------------------------------------------------------


@dataclass(frozen=True)
class BenchResult:
    """Original and fused model side by side (see the module docstring for the JSON)."""

    model: str
    conversion: Conversion  # the fused model and its record (not in the JSON)
    original: ModelStats
    fused: ModelStats
    batches: list[BatchResult]
    input_shapes: list[list[int]]  # what the model was converted (and costed) with
    repeat: int
    warmup: int
    threads: int
    dtype: str

    def rows(self) -> list[list[str]]:
        """The table of ``repfuse bench``: (metric, original, fused, original / fused), as
        every rendering of the report draws it (:func:`repfuse.verify.render.bench_rows`)."""
        return bench_rows(self.to_dict())

    def to_dict(self) -> dict:
        info = self.conversion.capture
        return {
            "kind": "bench", "schema_version": SCHEMA_VERSION, "model": self.model,
            "torch": torch.__version__, "threads": self.threads, "device": "cpu",
            "dtype": self.dtype, "repeat": self.repeat, "warmup": self.warmup,
            "convert_seconds": self.conversion.seconds, "input_shapes": self.input_shapes,
            "capture": {"partial": info.partial, "specialized": list(info.specialized)},
            "models": {"original": self.original.to_dict(), "fused": self.fused.to_dict()},
            "batches": [b.to_dict() for b in self.batches],
            **({"approximate": self.conversion.approximate.to_dict()}
               if self.conversion.approximate is not None else {}),
        }


def parse_batch_sizes(values: Iterable[str]) -> tuple[int, ...]:
    """``["1,8", "16"]`` -> ``(1, 8, 16)``: positive integers, duplicates dropped, in order."""
    sizes: list[int] = []
    for value in values:
        for part in value.split(","):
            try:
                size = int(part)
            except ValueError:
                raise RepfuseError(f"bad --batch '{value}': expected positive integers like "
                                   "1,8") from None
            if size < 1:
                raise RepfuseError(f"bad --batch '{value}': batch sizes must be at least 1")
            if size not in sizes:
                sizes.append(size)
    return tuple(sizes)


def benchmark(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    batches: Sequence[int] | None = None,
    repeat: int = 20,
    warmup: int = 3,
    passes: Sequence[str] | str | None = None,
    allow_costlier: bool = False,
    prune_below: float | None = None,
    prune_by: str | None = None,
    name: str = "model",
    progress: ProgressCallback | None = None,
) -> BenchResult:
    """Convert ``model`` once and compare it with its fused form on CPU.

    ``batches`` are the batch sizes to time (default: the example's); inputs of another
    size repeat the example's rows. The model is converted (and costed) with the first size.
    Each size runs ``warmup`` untimed and ``repeat`` timed rounds of both models, interleaved
    (:func:`time_models`). ``progress(what, done, total)`` is told of every step.
    ``prune_below``/``prune_by`` add the APPROXIMATE pruning pass, as for
    :func:`repfuse.convert` (the result says so, with its measured error).
    """
    if repeat < 1 or warmup < 0:
        raise RepfuseError(f"repeat must be at least 1 and warmup at least 0, got {repeat} "
                           f"and {warmup}")
    example = as_input_tuple(example_inputs)
    sizes = tuple(batches) if batches else (example[0].shape[0] if example[0].dim() else 1,)
    if any(size < 1 for size in sizes):
        raise RepfuseError(f"batch sizes must be at least 1, got {list(sizes)}")
    resolve(passes, allow_costlier=allow_costlier)  # an unknown pass fails before any work
    steps = _Steps(1 + len(sizes) * (warmup + repeat + 1), progress)

    steps.start(f"converting {name}")
    first = with_batch(example, sizes[0])
    conversion = convert(model, first, passes=passes, verify=None, name=name,
                         allow_costlier=allow_costlier, prune_below=prune_below,
                         prune_by=prune_by)
    if conversion.capture.specialized and len(sizes) > 1:
        raise RepfuseError(f"{name} was traced specialized to its input shapes (its forward "
                           "branches on them), so the fused model runs at one batch size only: "
                           "bench one batch size at a time")
    # The passes rewrote convert's own capture: capture again to count the unfused graph's ops.
    original = ModelStats.of(capture(model, first).module, conversion.cost_before)
    fused = ModelStats.of(conversion.fused, conversion.cost_after)
    steps.done()

    reference64 = copy.deepcopy(model).to(torch.float64).eval()
    results = []
    with eval_mode(model):
        for size in sizes:
            inputs = with_batch(example, size)
            steps.start(f"timing batch {size}")
            timings = time_models({"original": model, "fused": conversion.fused}, inputs,
                                  warmup=warmup, repeat=repeat, on_round=steps.done)
            steps.start(f"checking batch {size} against float64")
            expected = float64_outputs(reference64, inputs)  # once for both models
            errors = {role: max_rel_between(expected, output_tensors(candidate, inputs, role))
                      for role, candidate in (("original", model),
                                              ("fused", conversion.fused))}
            steps.done()
            results.append(BatchResult(size, _shapes(inputs), timings["original"],
                                       timings["fused"], errors))
    return BenchResult(
        model=name, conversion=conversion, original=original, fused=fused, batches=results,
        input_shapes=_shapes(first), repeat=repeat, warmup=warmup,
        threads=torch.get_num_threads(),
        dtype=str(deploy_dtype_of(model, example)).removeprefix("torch."),
    )


def _shapes(inputs: tuple[Tensor, ...]) -> list[list[int]]:
    return [list(t.shape) for t in inputs]


class _Steps:
    """Counts the steps of a benchmark and tells ``progress`` (if any) about each."""

    def __init__(self, total: int, progress: ProgressCallback | None) -> None:
        self.total, self.progress = total, progress
        self.count, self.what = 0, ""

    def start(self, what: str) -> None:
        self.what = what
        self._tell()

    def done(self) -> None:
        self.count += 1
        self._tell()

    def _tell(self) -> None:
        if self.progress is not None:
            self.progress(self.what, self.count, self.total)
