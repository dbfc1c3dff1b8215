"""Capture: an eval-mode copy of a model as a torch.fx GraphModule, with shapes on its nodes.

The user's model is never touched: it is deep-copied, put in eval mode, and traced with
``torch.fx`` symbolic tracing. Standard ``torch.nn`` layers stay leaf calls; custom modules are
traced through, so a drop-path module that returns its input in eval mode disappears here.
Shape propagation on the example inputs then records ``node.meta['tensor_meta']``.

A model that cannot be traced gets a :class:`CaptureError` naming the innermost submodule whose
tracing failed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter, Node, Tracer
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from repfuse.errors import CaptureError, RepfuseError

ExampleInputs = Tensor | Sequence[Tensor]


def as_input_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    """Normalize a tensor or a tuple/list of tensors to a tuple of tensors."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(
        isinstance(t, Tensor) for t in example_inputs
    ):
        return tuple(example_inputs)
    raise RepfuseError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs)}"
    )


class _LocatingTracer(Tracer):
    """An fx tracer that remembers the innermost module whose tracing raised."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_module: tuple[str, str] | None = None

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = (self.path_of_module(m), type(m).__name__)
            raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def symbolic_trace(model: nn.Module) -> GraphModule:
    """fx-trace ``model`` (already a copy); raise :class:`CaptureError` naming the culprit."""
    tracer = _LocatingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        if tracer.failed_module is not None:
            path, kind = tracer.failed_module
            where = f"submodule '{path}' ({kind})"
        else:
            where = f"the forward of {type(model).__name__}"
        raise CaptureError(
            f"cannot trace {where} with torch.fx: {_first_line(exc)}"
        ) from exc
    for node in graph.nodes:
        # Annotations written under `from __future__ import annotations` are strings, which fx
        # turns into globals that torch.save cannot pickle; they carry no information we use.
        if isinstance(node.type, str):
            node.type = None
    return GraphModule(tracer.root, graph, type(model).__name__)


class _ShapeRecorder(Interpreter):
    """Runs the graph once and records each node's output shape/dtype as fx's ShapeProp does,
    but reports a failure as one error naming the node, without printing a traceback."""

    def run_node(self, node: Node) -> Any:
        try:
            result = super().run_node(node)
        except Exception as exc:
            where = node.target if node.op == "call_module" else node.name
            raise CaptureError(
                f"running the traced model failed at '{where}': {_first_line(exc)}"
            ) from exc
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            node.meta["tensor_meta"] = meta
        node.meta["type"] = type(result)
        return result


def propagate_shapes(gm: GraphModule, inputs: tuple[Tensor, ...]) -> None:
    """Record each node's output shape and dtype in ``node.meta['tensor_meta']``."""
    shapes = ", ".join(str(list(t.shape)) for t in inputs)
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*inputs)
    except CaptureError as exc:
        raise CaptureError(f"{exc} (inputs of shape {shapes})") from exc.__cause__
    except Exception as exc:  # e.g. the wrong number of inputs
        raise CaptureError(
            f"running the traced model on inputs of shape {shapes} failed: {_first_line(exc)}"
        ) from exc


def trace(model: nn.Module, example_inputs: ExampleInputs) -> GraphModule:
    """An eval-mode GraphModule of a copy of ``model``, with shapes from ``example_inputs``.

    A GraphModule (e.g. a loaded ``.pt2`` program's module) is copied as it is, not re-traced.
    """
    if not isinstance(model, nn.Module):
        raise RepfuseError(f"expected a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    work = copy.deepcopy(model).eval()
    gm = work if isinstance(work, GraphModule) else symbolic_trace(work)
    gm.eval()
    propagate_shapes(gm, inputs)
    return gm
