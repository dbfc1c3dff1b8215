"""Capture: an eval-mode copy of a model as torch.fx graphs, with shapes on their nodes.

The user's model is never touched: it is deep-copied and put in eval mode. Then:

1. **Symbolic tracing** with ``torch.fx``. Standard ``torch.nn`` layers stay leaf calls, and so do
   BatchNorm subclasses that keep BatchNorm's forward; custom modules are traced through, so a
   drop-path module that returns its input in eval mode disappears here.
2. **Shape-specialized tracing**, when (1) fails: the same tracer, but every proxy also carries
   the value it has on the example inputs, so Python code asking for a *shape, dtype or device*
   (``if x.shape[-1] == 7``, ``for i in range(x.size(1))``, ``assert x.dim() == 4``,
   ``len(x)``) gets the concrete answer. Every such decision is recorded, and the graph then
   starts with ``torch._assert`` checks that its inputs have the example's shapes, so a fused
   model never silently runs a branch chosen for another shape. Branches on tensor *values*
   still fail.
3. **Partial capture** (:func:`capture`), when the model's own forward cannot be traced (a
   branch on values such as an early exit, an assert on values): that forward stays eager
   Python, and its submodules are captured the same way, recursively. A module whose forward
   traces becomes a GraphModule (its untraceable children are called from it as opaque
   modules, and captured in turn); a module not run on the example input is kept as it is (no
   shapes to fuse it with, no run to verify it with). Every module kept eager is reported with
   the reason.

Shape propagation on the example inputs records ``node.meta['tensor_meta']``.

Before tracing, the model is checked: quantized modules, tensors on the meta device and
example inputs on another device than the model are refused with one-line errors; forward
hooks (which a graph does not run) are removed from the copy, with a warning.
"""

from __future__ import annotations

import copy
import inspect
import io
import operator
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter, Node, Proxy, Tracer
from torch.fx.graph import CodeGen, _PyTreeCodeGen
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.fx.proxy import Attribute, TraceError
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map, tree_unflatten

from repfuse.errors import CaptureError, RepfuseError, RepfuseWarning, first_line
from repfuse.graph import (
    META_KEY,
    METADATA_ATTRIBUTES,
    METADATA_METHODS,
    SCALAR_FUNCTIONS,
    gc_paused,
)
from repfuse.passes.base import HISTORY_ATTR, PassResult

ExampleInputs = Tensor | Sequence[Tensor]

# Attribute on a captured (and fused) model holding its CaptureInfo; survives copy and pickle.
CAPTURE_ATTR = "_repfuse_capture"
# How every shape guard's message starts: exporters recognize guards by it (also in a model
# saved and loaded again, whose node metadata is gone).
GUARD_MESSAGE = "repfuse specialized this model's Python branches to "


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


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, TraceError) and str(exc).strip():
        return str(exc).strip().splitlines()[0]  # our own tracer's words
    return first_line(exc)


# --- what the result says about itself -------------------------------------------------------


@dataclass(frozen=True)
class SkippedModule:
    """A module whose own forward was kept as eager Python, and why."""

    path: str  # '' for the model itself
    kind: str  # its class name
    reason: str

    def describe(self) -> str:
        return f"'{self.path}' ({self.kind})" if self.path else f"the model ({self.kind})"

    def to_dict(self) -> dict:
        return {"path": self.path, "module": self.kind, "reason": self.reason}


@dataclass
class CaptureInfo:
    """How a model was captured: its traced parts, the modules kept eager, the decisions fixed
    to the example input's shapes, the hooks dropped."""

    parts: list[str] = field(default_factory=list)  # paths of traced GraphModules ('' = all)
    skipped: list[SkippedModule] = field(default_factory=list)
    specialized: list[str] = field(default_factory=list)
    dropped_hooks: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        """True when some forward code stays eager (the model is not one GraphModule)."""
        return bool(self.skipped)

    def to_dict(self) -> dict:
        return {
            "partial": self.partial,
            "parts": list(self.parts),
            "skipped": [s.to_dict() for s in self.skipped],
            "specialized": list(self.specialized),
            "dropped_hooks": list(self.dropped_hooks),
        }

def capture_info(model: nn.Module) -> CaptureInfo | None:
    """What :func:`capture` recorded about ``model`` (or the fused model made from it)."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and CAPTURE_ATTR in meta:
        return meta[CAPTURE_ATTR]
    return getattr(model, CAPTURE_ATTR, None)


# --- checks before anything is traced -------------------------------------------------------

_QUANTIZED_PACKAGES = ("torch.ao.nn.quantized", "torch.nn.quantized",
                       "torch.ao.nn.intrinsic.quantized", "torch.nn.intrinsic.quantized",
                       "torch.ao.nn.sparse.quantized")


def check_model(model: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """Refuse what cannot be fused exactly or at all, with a one-line reason."""
    for path, module in model.named_modules():
        if type(module).__module__.startswith(_QUANTIZED_PACKAGES):
            raise CaptureError(
                f"'{path or type(model).__name__}' ({type(module).__name__}) is a quantized "
                "module: repfuse fuses float models; fuse before quantizing"
            )
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if tensor.is_quantized:
            raise CaptureError(f"'{name}' is a quantized tensor: repfuse fuses float models; "
                               "fuse before quantizing")
        if tensor.is_meta:
            raise CaptureError(
                f"'{name}' is on the meta device: the model has no weights to fold; load them "
                "first (e.g. model.load_state_dict(state, assign=True))"
            )
    for index, tensor in enumerate(inputs):
        if tensor.is_meta or tensor.is_quantized:
            what = "on the meta device" if tensor.is_meta else "quantized"
            raise CaptureError(f"example input {index} is {what}: give a real float tensor")
    devices = {tensor.device for _, tensor in tensors}
    for index, tensor in enumerate(inputs):
        if devices and tensor.device not in devices:
            held = ", ".join(sorted(str(d) for d in devices))
            raise CaptureError(f"the model is on {held} but example input {index} is on "
                               f"{tensor.device}: move them to one device")


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs")


def drop_hooks(model: nn.Module) -> list[str]:
    """Remove the hooks of every module of ``model`` (a copy); return the paths that had any."""
    paths = []
    for path, module in model.named_modules():
        if any(getattr(module, name, None) for name in _HOOK_DICTS):
            paths.append(f"'{path}'" if path else "the model")
            for name in _HOOK_DICTS + _HOOK_FLAGS:
                hooks = getattr(module, name, None)
                if hooks:
                    hooks.clear()
    return paths


def _prepare(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[nn.Module, list[str]]:
    if not isinstance(model, nn.Module):
        raise RepfuseError(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_model(model, inputs)
    work = copy.deepcopy(model).eval()
    hooks = drop_hooks(work)
    if hooks:
        shown = ", ".join(hooks[:5]) + (f" and {len(hooks) - 5} more" if len(hooks) > 5 else "")
        warnings.warn(
            f"hooks on {shown} are not part of the traced graph and are dropped: the fused "
            "model does not run them", RepfuseWarning, stacklevel=3,
        )
    return work, hooks


# --- tracing ----------------------------------------------------------------------------------


def _keeps_batchnorm_forward(module: nn.Module) -> bool:
    """A BatchNorm (subclass) that computes what BatchNorm computes: a leaf, foldable as one."""
    return isinstance(module, _BatchNorm) and type(module).forward in (
        _BatchNorm.forward, nn.SyncBatchNorm.forward)


class _TraceFailure(Exception):
    """Tracing failed in the code of the module at ``path`` ('' = the traced module itself)."""

    def __init__(self, path: str, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.path, self.kind, self.reason = path, kind, reason

    def message(self) -> str:
        where = f"submodule '{self.path}' ({self.kind})" if self.path else \
            f"the forward of {self.kind}"
        return f"cannot trace {where} with torch.fx: {self.reason}"


class _Proxy(Proxy):
    """An fx proxy that also records item assignment, ``x[index] = value``, as an
    ``operator.setitem`` node (fx's own Proxy has no ``__setitem__``; fx prints the node back
    as the assignment). Real code writes borders in place this way, e.g. DBB's BN-and-pad."""

    def __getattr__(self, k: str) -> _Attribute:
        return _Attribute(self, k)

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class _Attribute(_Proxy, Attribute):
    pass


class _Tracer(Tracer):
    """An fx tracer that keeps ``opaque`` submodules as calls and locates failures."""

    def __init__(self, opaque: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque
        self.failed_module: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.opaque or _keeps_batchnorm_forward(m)
                or super().is_leaf_module(m, module_qualified_name))

    def proxy(self, node: Node) -> Proxy:
        return _Proxy(node, self)

    # torch.fx finds the name of every parameter or buffer it meets by scanning all of the
    # root's parameters (or buffers): quadratic in the model, seconds for a network of a few
    # hundred functional batch norms. These two methods look the name up in a table instead.

    def _tensor_name(self, tensor: Tensor, parameters: bool) -> str | None:
        tables = getattr(self, "_tensor_tables", None)
        if tables is None or tables[0] is not self.root:
            params: dict[int, str] = {}
            buffers: dict[int, str] = {}
            for name, p in self.root.named_parameters():
                params.setdefault(id(p), name)
            for name, b in self.root.named_buffers():
                buffers.setdefault(id(b), name)
            tables = self._tensor_tables = (self.root, params, buffers)
        name = tables[1 if parameters else 2].get(id(tensor))
        if name is None:
            return None
        # an attribute reassigned during the trace makes the table stale for it; read the
        # module dicts directly (fx patches nn.Module.__getattr__ to call back here)
        owner: Any = self.root
        *path, attr = name.split(".")
        for part in path:
            owner = owner._modules.get(part)
            if owner is None:
                return None
        found = (owner._parameters if parameters else owner._buffers).get(attr)
        return name if found is tensor else None

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, Tensor) and not isinstance(a, Proxy):
            name = self._tensor_name(a, isinstance(a, nn.Parameter))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        is_parameter = isinstance(attr_val, nn.Parameter)
        if is_parameter or (self.proxy_buffer_attributes and isinstance(attr_val, Tensor)):
            name = self._tensor_name(attr_val, is_parameter)
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module: its own code failed
                self.failed_module = (self.path_of_module(m), type(m).__name__)
            raise


_UNKNOWN = object()
_SYMBOLS = {operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=",
            operator.gt: ">", operator.ge: ">=", operator.add: "+", operator.sub: "-",
            operator.mul: "*", operator.floordiv: "//", operator.truediv: "/",
            operator.mod: "%"}


class _ConcreteProxy(_Proxy):
    """A proxy whose length and integer value can be asked for (the tracer answers). Item
    assignment is also run on the concrete value, in place, so later values see it."""

    def __getattr__(self, k: str) -> Any:
        plain = self.tracer.plain_attribute(self, k)
        return _ConcreteAttribute(self, k) if plain is _UNKNOWN else plain

    def __len__(self) -> int:
        return self.tracer.length(self)

    def __index__(self) -> int:
        return self.tracer.to_int(self)

    def __int__(self) -> int:
        return self.tracer.to_int(self)


class _ConcreteAttribute(_ConcreteProxy, Attribute):
    pass


class _SpecializingTracer(_Tracer):
    """An fx tracer whose proxies know their values on the example inputs.

    Every recorded node is also run on concrete values. Python control flow that depends only
    on metadata (shapes, dtypes, devices, non-tensor arguments) is resolved with those values
    and the decision recorded in :attr:`decisions`; control flow on tensor values still fails.
    """

    def __init__(self, inputs: Sequence[Any] = (), opaque: frozenset[str] = frozenset()) -> None:
        # No arguments when fx re-traces a saved model's code on load (``gm._tracer_cls()``).
        super().__init__(opaque)
        # Copies, also inside lists: the traced code may write into them (`x[i] = ...`).
        self.inputs = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, list(inputs))
        self.values: dict[Node, Any] = {}
        self.metadata: set[Node] = set()
        self.decisions: list[tuple[str, str]] = []  # (module path, what was decided)
        self.decided: list[tuple[Node, str]] = []  # (node decided on, how: its value or len)
        self._placeholders = 0
        self._evaluating = False

    # Calls the concrete evaluation makes must run for real, not be recorded.
    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: Node) -> Proxy:
        return _ConcreteProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind != "output":
            self.values[node] = self._evaluate(node)
            if self._is_metadata(node):
                self.metadata.add(node)
        return node

    @contextmanager
    def _running(self) -> Iterator[None]:
        self._evaluating = True
        try:
            with torch.no_grad():
                yield
        finally:
            self._evaluating = False

    def _evaluate(self, node: Node) -> Any:
        if node.op == "placeholder":
            index, self._placeholders = self._placeholders, self._placeholders + 1
            if index < len(self.inputs):
                return self.inputs[index]
            return node.args[0] if node.args else _UNKNOWN
        if node.op == "get_attr":
            with self._running():  # module attribute access is patched while tracing
                value = self._fetch(node.target)
            return value.detach().clone() if isinstance(value, Tensor) else value
        unknown = False

        def value_of(arg: Node) -> Any:
            nonlocal unknown
            value = self.values.get(arg, _UNKNOWN)
            unknown = unknown or value is _UNKNOWN
            return value

        args, kwargs = map_arg((node.args, node.kwargs), value_of)
        if unknown:
            return _UNKNOWN
        try:
            with self._running():
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    return self.root.get_submodule(node.target)(*args, **kwargs)
        except Exception:
            return _UNKNOWN  # the tracer goes on symbolically; asking this value will fail
        return _UNKNOWN

    def _fetch(self, target: str) -> Any:
        value: Any = self.root
        for part in target.split("."):
            value = getattr(value, part, _UNKNOWN)
            if value is _UNKNOWN:
                return _UNKNOWN
        return value

    def _is_metadata(self, node: Node) -> bool:
        """True when the node's value depends on shapes/dtypes/devices only, not on values."""
        if node.op == "placeholder":
            value = self.values[node]
            return value is not _UNKNOWN and not isinstance(value, Tensor)
        of_metadata = bool(node.args) and isinstance(node.args[0], Node) and (
            node.args[0] in self.metadata)  # x.device.type, x.shape.numel(), x.dtype.itemsize
        if node.op == "call_method":
            return node.target in METADATA_METHODS or of_metadata
        if node.op != "call_function":
            return False
        if node.target is getattr:
            return len(node.args) >= 2 and (node.args[1] in METADATA_ATTRIBUTES or of_metadata)
        if node.target in SCALAR_FUNCTIONS:
            inputs = node.all_input_nodes
            return bool(inputs) and all(n in self.metadata for n in inputs)
        return False

    def _known(self, obj: Proxy) -> tuple[Node, Any]:
        node = obj.node
        return node, self.values.get(node, _UNKNOWN)

    def _spell(self, node: Node) -> str:
        return _expression(node, self.metadata)

    def _decide(self, node: Node, what: str, value: Any) -> None:
        scope = next(reversed(self.module_stack.values()), None) if self.module_stack else None
        path = scope[0] if scope else ""
        self.decisions.append((path, f"{what} {self._spell(node)} is {value!r}"))
        self.decided.append((node, "len" if what in ("len of", "iteration over") else "value"))

    def plain_attribute(self, obj: Proxy, name: str) -> Any:
        """The value of ``obj.name`` when ``obj`` is a device or dtype the example fixes and the
        attribute a plain value (``x.device.type``, ``x.dtype.is_floating_point``): code hands
        those to Python that takes no proxy (``torch.autocast(device_type=...)``). Recorded as
        a decision; :data:`_UNKNOWN` otherwise (the attribute is traced)."""
        node, value = self._known(obj)
        if node not in self.metadata or not isinstance(value, (torch.device, torch.dtype)):
            return _UNKNOWN
        attribute = getattr(value, name, _UNKNOWN)
        if not isinstance(attribute, (str, bool, int, float)):
            return _UNKNOWN
        self._decide(node, f"attribute .{name} of", value)
        return attribute

    def to_bool(self, obj: Proxy) -> bool:
        node, value = self._known(obj)
        if node in self.metadata and value is not _UNKNOWN:
            self._decide(node, "branch on", bool(value))
            return bool(value)
        if node in self.metadata:
            raise TraceError(f"control flow on {self._spell(node)}, which could not be "
                             "computed on the example input")
        raise TraceError(f"control flow depends on tensor values ({self._spell(node)})")

    def to_int(self, obj: Proxy) -> int:
        node, value = self._known(obj)
        if node in self.metadata and value is not _UNKNOWN:
            self._decide(node, "Python int", int(value))
            return int(value)
        raise TraceError(f"a tensor value is used as a Python int ({self._spell(node)})")

    def length(self, obj: Proxy) -> int:
        node, value = self._known(obj)
        if isinstance(value, (Tensor, tuple, list)):
            if isinstance(value, Tensor) or node in self.metadata:
                self._decide(node, "len of", len(value))
            return len(value)
        raise TraceError(f"len() of an unknown value ({self._spell(node)})")

    def iter(self, obj: Proxy) -> Iterator:
        node, value = self._known(obj)
        if isinstance(value, (Tensor, tuple, list)):
            if isinstance(value, Tensor) or node in self.metadata:
                self._decide(node, "iteration over", f"{len(value)} items")
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)


def _expression(node: Node, metadata: set[Node], depth: int = 0) -> str:
    """A short Python-like spelling of a metadata expression, for the report; other nodes (the
    tensors whose metadata is read) by name."""
    if depth > 6 or node.op in ("placeholder", "get_attr", "call_module") or (
            depth > 1 and node not in metadata):
        return node.name  # the operands of a value-dependent condition are spelled once

    def spell(arg: Any) -> str:
        return _expression(arg, metadata, depth + 1) if isinstance(arg, Node) else repr(arg)

    def operand(arg: Any) -> str:  # what a method, attribute or index applies to
        text = spell(arg)
        return f"({text})" if " " in text else text

    args = node.args
    if node.op == "call_method":
        rest = ", ".join(spell(a) for a in args[1:])
        return f"{operand(args[0])}.{node.target}({rest})"
    if node.target is getattr and len(args) == 2:
        return f"{operand(args[0])}.{args[1]}"
    if node.target is operator.getitem and len(args) == 2:
        return f"{operand(args[0])}[{spell(args[1])}]"
    if node.target in _SYMBOLS and len(args) == 2:
        return f"{spell(args[0])} {_SYMBOLS[node.target]} {spell(args[1])}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name}({', '.join(spell(a) for a in args)})"


@dataclass(frozen=True)
class _Binding:
    """A forward's arguments, as tracing takes them: ``inputs``, one per placeholder in order,
    are the values the specializing tracer runs on; ``concrete`` (fx's ``concrete_args``) are
    fixed to their value while tracing, so Python code on them resolves (``if targets is not
    None``, ``self.predict(x, *args, **kwargs)``)."""

    inputs: list[Any]
    concrete: dict[str, Any]


def _bind(module: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> _Binding | None:
    """How ``module`` is traced for the call ``module(*args, **kwargs)``; None when fx cannot
    take that call (arguments that do not bind, or a non-empty ``*args`` or ``**kwargs``).

    Fixed: an empty ``*args``/``**kwargs`` and every argument that is None, given or left at
    its default (fx guards it with an assert in the graph). Other arguments stay placeholders:
    tensors, and scalars, on which the specializing tracer records its decisions.
    """
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    inputs: list[Any] = []
    concrete: dict[str, Any] = {}
    for name, parameter in signature.parameters.items():
        value = bound.arguments[name]
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            if value:
                return None
            stars = "*" if parameter.kind is parameter.VAR_POSITIONAL else "**"
            concrete[stars + name] = value
            continue
        if value is None:
            concrete[name] = None  # still a placeholder, with None as its default
        inputs.append(value)
    return _Binding(inputs, concrete)


def _root_binding(module: nn.Module, inputs: Sequence[Any] | None) -> _Binding | None:
    """The binding for a model called with ``inputs``; the inputs as they are when they do
    not bind (running the trace then says what is wrong)."""
    if inputs is None:
        return None
    return _bind(module, inputs, {}) or _Binding(list(inputs), {})


@dataclass
class _Traced:
    gm: GraphModule
    decisions: list[tuple[str, str]]  # (module path inside gm, what was decided)
    opaque: dict[str, str]  # submodule path -> why its own code could not be traced

    def described_decisions(self, path: str = "") -> list[str]:
        """The decisions as report lines, module paths taken from ``path``."""
        lines = []
        for scope, text in self.decisions:
            full = _join(path, scope) if scope else path
            lines.append(f"'{full}': {text}" if full else f"forward: {text}")
        return lines


def _finish(tracer: _Tracer, graph: torch.fx.Graph, binding: _Binding | None) -> GraphModule:
    for node in graph.nodes:
        # Annotations written under `from __future__ import annotations` are strings, which fx
        # turns into globals that torch.save cannot pickle; they carry no information we use.
        if isinstance(node.type, str):
            node.type = None
    if binding is not None:
        _plain_signature(graph, binding)
    return GraphModule(tracer.root, graph, type(tracer.root).__name__)


def _plain_signature(graph: torch.fx.Graph, binding: _Binding) -> None:
    """Give the graph the forward's own parameter names and no pytree wrapping.

    fx names the placeholder of a concrete argument ``name_1`` (a caller passing it by keyword
    would fail), and binding an empty ``*args`` makes it flatten inputs and outputs through
    pytree specs; with only empty containers among the arguments both are plain calls.
    """
    for node in graph.nodes:
        if node.op == "placeholder" and node.target.endswith("_1") and \
                node.target[:-2] in binding.concrete:
            node.target = node.target[:-2]
    codegen = graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        out_spec = codegen.pytree_info.out_spec
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        if out_spec is not None:
            output.args = (tree_unflatten(list(output.args[0]), out_spec),)
        graph._codegen = CodeGen()


def _trace_once(module: nn.Module, binding: _Binding | None,
                opaque: frozenset[str]) -> _Traced:
    """Trace symbolically; failing that (and given a binding), specialized to its inputs'
    shapes. A trace leaves ``module`` as it found it, failed or not."""
    concrete = binding.concrete if binding is not None else None
    traced = None
    with _restoring(module):
        plain = _Tracer(opaque)
        try:
            graph = plain.trace(module, concrete_args=concrete)
        except Exception as exc:
            failure = exc, plain.failed_module
        else:
            traced = _Traced(_finish(plain, graph, binding), [], {})
    if traced is None and binding is not None:
        tracer = _SpecializingTracer(binding.inputs, opaque)
        with _restoring(module):
            try:
                graph = tracer.trace(module, concrete_args=concrete)
            except Exception as exc:
                failure = exc, tracer.failed_module
            else:
                read = _inputs_read(tracer)  # before the dead queries go: it walks their args
                _remove_dead_metadata(graph, tracer.metadata)
                if tracer.decisions:
                    _guard_inputs(graph, tracer, read)
                traced = _Traced(_finish(tracer, graph, binding), tracer.decisions, {})
    if traced is not None:
        _keep_attributes(traced.gm, module)
        return traced
    exc, located = failure
    path, kind = located if located is not None else ("", type(module).__name__)
    raise _TraceFailure(path, kind, _first_line(exc)) from exc


# nn.Module's own state, which a GraphModule has its own of.
_MODULE_STATE = frozenset(vars(nn.Module())) | {"forward"}
# Attributes torch's GraphModule.__deepcopy__ sets again on the copy.
_PRESERVED_KEY = getattr(torch.fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY",
                         "_user_preserved_attributes")


def _keep_attributes(gm: GraphModule, module: nn.Module) -> None:
    """Give ``gm`` the plain attributes of the module it was traced from: code that calls the
    module may read them (e.g. a model's loop over its layers reading ``m.f`` and ``m.i``).
    They survive deepcopy, which rebuilds a GraphModule from its graph."""
    kept = {name: value for name, value in vars(module).items()
            if name not in _MODULE_STATE and name not in vars(gm) and name not in gm._parameters
            and name not in gm._buffers and name not in gm._modules}
    if kept:
        vars(gm).update(kept)
        gm.meta.setdefault(_PRESERVED_KEY, {}).update(kept)


@contextmanager
def _restoring(module: nn.Module) -> Iterator[None]:
    """Undo what tracing does to ``module`` and its submodules: attributes their forwards
    assign (proxies: ``self.cache = x``, anchors computed on the first call), containers they
    fill, the constants fx attaches to the root. The next trace, or the eager run of a module
    kept eager, then sees the module as the user built it."""
    saved = []
    for sub in module.modules():
        attributes = dict(vars(sub))
        contents = {name: copy.copy(value) for name, value in attributes.items()
                    if type(value) in (list, dict, set, OrderedDict)}
        saved.append((sub, attributes, contents))
    try:
        yield
    finally:
        for sub, attributes, contents in saved:
            vars(sub).clear()
            vars(sub).update(attributes)
            for name, content in contents.items():
                value = attributes[name]
                if isinstance(value, list):
                    value[:] = content
                else:
                    value.clear()
                    value.update(content)


def _remove_dead_metadata(graph: torch.fx.Graph, metadata: set[Node]) -> None:
    """Drop the shape queries whose answers only steered Python (they would count as users)."""
    for node in reversed(list(graph.nodes)):
        if node in metadata and node.op != "placeholder" and not node.users:
            graph.erase_node(node)


# What the decisions read of an input: these dims (``"rank"`` for ``x.dim()``), or all of it.
_ALL = None


def _inputs_read(tracer: _SpecializingTracer) -> dict[Node, frozenset | None]:
    """Per placeholder, what the recorded decisions read of it: the indices of the dims the
    code asked for (``x.shape[-1]``, ``x.size(1)``; ``len(x)`` is dim 0), ``"rank"`` for
    ``x.dim()``/``x.ndim``, or :data:`_ALL`. A decision on the shape of an intermediate tensor
    reads every tensor input entirely: which input dims it depends on is not known."""
    read: dict[Node, frozenset | None] = {}
    placeholders = [n for n in tracer.graph.nodes if n.op == "placeholder"]

    def add(node: Node, items: frozenset | None) -> None:
        known = read.get(node, frozenset())
        read[node] = None if known is None or items is None else known | items

    def shape_read(node: Node) -> Node | None:
        """The placeholder whose whole shape ``node`` is (``x.shape``, ``x.size()``)."""
        if not node.args or not isinstance(node.args[0], Node):
            return None
        source = node.args[0]
        whole = ((node.target is getattr and node.args[1:] == ("shape",))
                 or (node.op == "call_method" and node.target == "size" and len(node.args) == 1))
        return source if whole and source.op == "placeholder" else None

    def visit(node: Node, how: str = "value") -> None:
        if node.op == "placeholder":
            is_tensor = isinstance(tracer.values.get(node), Tensor)
            add(node, frozenset({0}) if is_tensor and how == "len" else
                (_ALL if is_tensor else frozenset()))
            return
        if node not in tracer.metadata:  # a tensor whose length or items were asked for
            for placeholder in placeholders:
                add(placeholder, _ALL)
            return
        args = node.args
        source = args[0] if args and isinstance(args[0], Node) else None
        on_input = source is not None and source.op == "placeholder"
        index = args[1] if len(args) == 2 and isinstance(args[1], int) else None
        if node.target is operator.getitem and source is not None and index is not None \
                and shape_read(source) is not None:
            add(shape_read(source), frozenset({index}))
        elif on_input and node.op == "call_method" and node.target == "size" and index is not None:
            add(source, frozenset({index}))
        elif on_input and (node.target in ("dim", "ndimension")
                           or (node.target is getattr and args[1:] == ("ndim",))):
            add(source, frozenset({"rank"}))
        elif (node.target is getattr and args[1:] in (("dtype",), ("device",))) or (
                on_input and node.target in ("is_floating_point", "get_device")):
            return  # not a shape (of an input or not): the guards check shapes only
        elif on_input and (node.target is getattr or node.op == "call_method"):
            add(source, _ALL)  # the whole shape, numel(), ...
        else:
            for arg in node.all_input_nodes:
                visit(arg)

    for node, how in tracer.decided:
        visit(node, how)
    return read


def _guard_inputs(graph: torch.fx.Graph, tracer: _SpecializingTracer,
                  read: dict[Node, frozenset | None]) -> None:
    """Start the graph with checks that the inputs are those the decisions were made for: the
    dims the code read (the whole shape when not known), the rank, an argument's value."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first = next(n for n in graph.nodes if n.op != "placeholder")

    def guard(actual: Any, expected: Any, what: str) -> None:
        same = graph.call_function(operator.eq, (actual, expected))
        graph.call_function(torch._assert, (
            same, f"{GUARD_MESSAGE}{what}; convert it again for other inputs"))

    with graph.inserting_before(first):
        for node in placeholders:
            if node not in read:
                continue
            value, items = tracer.values.get(node, _UNKNOWN), read[node]
            if isinstance(value, Tensor):
                if items is _ALL:
                    guard(graph.call_function(getattr, (node, "shape")), tuple(value.shape),
                          f"input '{node.name}' of shape {list(value.shape)}")
                    continue
                if "rank" in items:
                    guard(graph.call_method("dim", (node,)), value.dim(),
                          f"input '{node.name}' of rank {value.dim()}")
                dims = sorted(d for d in items if d != "rank")
                shape = graph.call_function(getattr, (node, "shape")) if dims else None
                for dim in dims:
                    guard(graph.call_function(operator.getitem, (shape, dim)), value.shape[dim],
                          f"input '{node.name}' with shape[{dim}] == {value.shape[dim]}")
            elif isinstance(value, (bool, int, float, str, type(None))):
                guard(node, value, f"argument '{node.name}' = {value!r}")


def _trace_largest(module: nn.Module, binding: _Binding | None) -> _Traced:
    """Trace ``module``, keeping as opaque calls the submodules whose own code does not trace.

    Raises :class:`_TraceFailure` (path '') when ``module``'s own forward cannot be traced.
    """
    opaque: dict[str, str] = {}
    while True:
        try:
            traced = _trace_once(module, binding, frozenset(opaque))
        except _TraceFailure as failure:
            if not failure.path:
                raise
            if failure.path in opaque:  # cannot happen: an opaque module is not traced into
                raise _TraceFailure("", type(module).__name__, failure.reason) from failure
            opaque[failure.path] = failure.reason
            continue
        traced.opaque = opaque
        return traced


def symbolic_trace(model: nn.Module, inputs: Sequence[Any] | None = None) -> GraphModule:
    """fx-trace ``model`` (already a copy), specialized to ``inputs``' shapes if need be; raise
    :class:`CaptureError` naming the innermost culprit."""
    try:
        traced = _trace_once(model, _root_binding(model, inputs), frozenset())
    except _TraceFailure as failure:
        raise CaptureError(failure.message()) from failure.__cause__
    _record(traced.gm, CaptureInfo(parts=[""], specialized=traced.described_decisions()))
    return traced.gm


# --- shapes ---------------------------------------------------------------------------------


class _NodeFailure(Exception):
    """``node`` raised the exception that is this one's ``__cause__``."""

    def __init__(self, node: Node) -> None:
        super().__init__(node.name)
        self.node = node


class _NodeLocator(Interpreter):
    """Runs a graph node by node and says which node failed (:class:`_NodeFailure`)."""

    def run_node(self, node: Node) -> Any:
        try:
            return super().run_node(node)
        except Exception as exc:
            raise _NodeFailure(node) from exc


class _ShapeRecorder(_NodeLocator):
    """Runs the graph once and records each node's output shape/dtype as fx's ShapeProp does,
    but reports a failure as one error naming the node, without printing a traceback."""

    def run_node(self, node: Node) -> Any:
        result = super().run_node(node)
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


def _shapes(inputs: Sequence[Any]) -> str:
    return ", ".join(str(list(t.shape)) for t in inputs if isinstance(t, Tensor))


def propagate_shapes(gm: GraphModule, inputs: Sequence[Any]) -> None:
    """Record each node's output shape and dtype in ``node.meta['tensor_meta']``."""
    shapes = _shapes(inputs)
    inputs = tree_map(lambda leaf: leaf, list(inputs))  # lists the graph may write into
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*inputs)
    except _NodeFailure as failure:
        node, exc = failure.node, failure.__cause__
        where = node.target if node.op == "call_module" else node.name
        raise CaptureError(f"running the traced model failed at '{where}': {_first_line(exc)} "
                           f"(inputs of shape {shapes})") from exc
    except Exception as exc:  # e.g. the wrong number of inputs
        raise CaptureError(
            f"running the traced model on inputs of shape {shapes} failed: {_first_line(exc)}"
        ) from exc


# --- the public entry points ------------------------------------------------------------------


def _record(model: nn.Module, info: CaptureInfo) -> None:
    """Keep ``info`` in a GraphModule's ``meta`` (survives deepcopy) and in an attribute
    (survives ``torch.save``, whose loader rebuilds ``meta`` empty but restores attributes)."""
    if isinstance(model, GraphModule):
        model.meta[CAPTURE_ATTR] = info
    setattr(model, CAPTURE_ATTR, info)


@gc_paused()
def trace(model: nn.Module, example_inputs: ExampleInputs) -> GraphModule:
    """An eval-mode GraphModule of a copy of ``model``, with shapes from ``example_inputs``.

    The whole model must trace (symbolically, or specialized to the example's shapes);
    otherwise :class:`CaptureError` names the innermost submodule that did not. A GraphModule
    (e.g. a loaded ``.pt2`` program's module) is copied as it is, not re-traced.
    """
    inputs = as_input_tuple(example_inputs)
    work, hooks = _prepare(model, inputs)
    if isinstance(work, GraphModule):
        gm = work
        _record(gm, CaptureInfo(parts=[""]))
    else:
        gm = symbolic_trace(work, inputs)
    capture_info(gm).dropped_hooks = hooks
    gm.eval()
    propagate_shapes(gm, inputs)
    return gm


@dataclass
class Captured:
    """A captured model: one GraphModule, or an eager module with traced GraphModule parts."""

    module: nn.Module  # its traced parts: parts_of(module)
    info: CaptureInfo


@gc_paused()
def capture(model: nn.Module, example_inputs: ExampleInputs) -> Captured:
    """Capture a copy of ``model``: whole if it traces, else its largest traceable parts.

    See the module docstring. The returned module computes what ``model`` computes in eval
    mode; :attr:`Captured.info` says what was traced, what was kept eager and why.
    """
    inputs = as_input_tuple(example_inputs)
    work, hooks = _prepare(model, inputs)
    if isinstance(work, GraphModule):
        work.eval()
        propagate_shapes(work, inputs)
        info = CaptureInfo(parts=[""], dropped_hooks=hooks)
        _record(work, info)
        return Captured(work, info)
    partial = _PartialCapture(hooks)
    module = partial.capture_root(work, inputs)
    _record(module, partial.info)
    return Captured(module, partial.info)


class _PartialCapture:
    """Captures a module and, where its forward does not trace, its submodules (recursively)."""

    def __init__(self, hooks: list[str]) -> None:
        self.info = CaptureInfo(dropped_hooks=hooks)
        self.calls: dict[int, _Calls] = {}
        self.done: dict[int, nn.Module] = {}
        self.replaced: list[_Replaced] = []  # traced parts called from eager code
        self.decisions: dict[str, list[str]] = {}  # per part, its lines in info.specialized

    def capture_root(self, root: nn.Module, inputs: tuple[Tensor, ...]) -> nn.Module:
        kind = type(root).__name__
        try:
            traced = _trace_largest(root, _root_binding(root, inputs))
        except _TraceFailure as failure:
            self.calls = _record_calls(root, inputs)
            self.info.skipped.append(SkippedModule("", kind, failure.reason))
            self._capture_children(root, "")
            self._keep_what_callers_use(root, inputs)
            return root
        gm = traced.gm
        gm.eval()
        propagate_shapes(gm, inputs)
        self._add_part("", traced)
        if traced.opaque:
            self.calls = _record_calls(gm, inputs)
            self._capture_opaque(gm, "", traced.opaque)
            self._keep_what_callers_use(gm, inputs)
        return gm

    def _add_part(self, path: str, traced: _Traced) -> None:
        self.info.parts.append(path)
        self.decisions[path] = traced.described_decisions(path)
        self.info.specialized += self.decisions[path]

    def _keep_what_callers_use(self, model: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        """Eager code may use more of a module than its call (``self.head.decode(y)``, a
        property), which a traced replacement lacks: run the captured model once, and put
        back each module whose caller missed something, kept eager, its children captured."""
        while self.replaced:  # each round puts modules back, never the same one again
            missed = _missed_attributes(model, inputs, self.replaced)
            if not missed:
                return
            for replaced, name in missed:
                self._put_back(replaced, name)

    def _put_back(self, replaced: _Replaced, name: str) -> None:
        """Undo the replacement, at every path where the module is (it may be shared)."""
        for item in [item for item in self.replaced if item.traced is replaced.traced]:
            setattr(item.parent, item.name, item.original)
            self.replaced.remove(item)
            if item.path in self.info.parts:
                self.info.parts.remove(item.path)
            for line in self.decisions.pop(item.path, []):
                self.info.specialized.remove(line)
        kind = type(replaced.original).__name__
        self.info.skipped.append(SkippedModule(
            replaced.path, kind, f"code outside it uses its '{name}', which its traced and "
                                 "fused graph may not have"))
        self.done[id(replaced.original)] = replaced.original
        self._capture_children(replaced.original, replaced.path)

    def _capture_opaque(self, gm: GraphModule, path: str, opaque: dict[str, str]) -> None:
        for inner, reason in opaque.items():
            module = gm.get_submodule(inner)
            full = _join(path, inner)
            self.info.skipped.append(SkippedModule(full, type(module).__name__, reason))
            self.done[id(module)] = module
            self._capture_children(module, full)

    def _capture_children(self, module: nn.Module, path: str) -> None:
        for name, child in list(module.named_children()):
            replacement = self._capture_module(child, _join(path, name))
            if replacement is not child:
                setattr(module, name, replacement)
                self.replaced.append(_Replaced(_join(path, name), module, name, child,
                                               replacement))

    def _capture_module(self, module: nn.Module, path: str) -> nn.Module:
        if id(module) in self.done:  # a module shared with an earlier path
            return self.done[id(module)]
        result = self._capture_new(module, path)
        self.done[id(module)] = result
        return result

    def _capture_new(self, module: nn.Module, path: str) -> nn.Module:
        kind = type(module).__name__
        container = isinstance(module, (nn.ModuleList, nn.ModuleDict))
        if not container and _Tracer().is_leaf_module(module, path):
            return module  # a plain layer: nothing inside it to fuse
        calls = self.calls.get(id(module))
        if calls is None:
            if self._any_called(module):
                self._capture_children(module, path)  # a container, e.g. nn.ModuleList
            else:
                self.info.skipped.append(SkippedModule(
                    path, kind, "not run on the example input, so there are no shapes to fuse "
                                "it with nor a run to verify it: kept as it is"))
            return module
        binding = _bind(module, calls.args, calls.kwargs)
        try:
            if binding is None:
                raise _TraceFailure("", kind, "its recorded call does not bind to the parameters "
                                              "of its forward (or fills its *args or **kwargs)")
            inputs = binding.inputs
            traced = _trace_largest(module, binding)
            if traced.decisions and len(calls.shapes) > 1:
                raise _TraceFailure("", kind, "its trace is specialized to one input shape but "
                                              "it is called with several")
            gm = traced.gm
            gm.eval()
            propagate_shapes(gm, inputs)
        except (_TraceFailure, CaptureError) as failure:
            reason = failure.reason if isinstance(failure, _TraceFailure) else str(failure)
            self.info.skipped.append(SkippedModule(path, kind, reason))
            self._capture_children(module, path)
            return module
        self._add_part(path, traced)
        self._capture_opaque(gm, path, traced.opaque)
        return gm

    def _any_called(self, module: nn.Module) -> bool:
        return any(id(m) in self.calls for m in module.modules())


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@dataclass(frozen=True, eq=False)
class _Replaced:
    """A module replaced by its traced GraphModule in an eager parent."""

    path: str
    parent: nn.Module
    name: str
    original: nn.Module
    traced: nn.Module


def _missed_attributes(model: nn.Module, inputs: tuple[Tensor, ...],
                       replaced: list[_Replaced]) -> list[tuple[_Replaced, str]]:
    """Run ``model`` once and return the replacements that code outside their own forward asked
    for something of (the first name each): an attribute only the module they replaced has (a
    method, a property), or a submodule, parameter or buffer, which fusing may remove."""
    missed: dict[int, tuple[_Replaced, str]] = {}
    running: set[int] = set()  # replacements inside their own forward

    def watch(item: _Replaced) -> Callable[[nn.Module, str], Any]:
        def lookup(module: nn.Module, name: str) -> Any:
            try:
                value = nn.Module.__getattr__(module, name)
            except AttributeError:
                if hasattr(item.original, name):
                    missed.setdefault(id(item), (item, name))
                raise
            if id(module) not in running:
                missed.setdefault(id(item), (item, name))
            return value
        return lookup

    def enter(module: nn.Module, args: tuple) -> None:
        running.add(id(module))

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        running.discard(id(module))

    # Each GraphModule has a class of its own: watching it watches that one instance (once,
    # when it replaces a module shared by several paths).
    watched = list({id(item.traced): item for item in reversed(replaced)}.values())
    handles = []
    for item in watched:
        type(item.traced).__getattr__ = watch(item)
        handles += [item.traced.register_forward_pre_hook(enter),
                    item.traced.register_forward_hook(leave)]
    try:
        run_quietly(model, inputs)
    except Exception:
        pass  # what fails for another reason, fuse's run of the fused model reports
    finally:
        for item in watched:
            del type(item.traced).__getattr__
        for handle in handles:
            handle.remove()
    return list(missed.values())


def check_runs(model: nn.Module, example_inputs: ExampleInputs) -> None:
    """Run a fused ``model`` once on the example input (no autograd); if it fails, raise
    :class:`RepfuseError` naming the innermost module that failed and, inside a traced part,
    the node, instead of handing back a model that does not run."""
    inputs = as_input_tuple(example_inputs)
    entered: list[tuple[str, nn.Module, tuple, dict]] = []  # called, not returned yet

    def enter(path: str) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            entered.append((path, module, args, kwargs))
        return hook

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        entered.pop()

    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(path), with_kwargs=True))
        handles.append(module.register_forward_hook(leave))
    try:
        run_quietly(model, inputs)
    except Exception as exc:
        failure = exc
    else:
        return
    finally:
        for handle in handles:
            handle.remove()
    raise RepfuseError(f"the fused model does not run on the example input: "
                       f"{_failure_site(entered, failure)}; it is not returned (a repfuse bug, "
                       "or eager code that uses a module the passes fused away)") from failure


def _failure_site(entered: list[tuple[str, nn.Module, tuple, dict]], exc: Exception) -> str:
    """Where the run failed, as the innermost module called and not returned from and, when a
    traced part was running, its node that failed (found by running that part again)."""
    if not entered:
        return _first_line(exc)
    path, module, _, _ = entered[-1]
    kind = type(module).__name__
    where = f"'{path}' ({kind})" if path else f"the model ({kind})"
    part = next((item for item in reversed(entered) if isinstance(item[1], GraphModule)), None)
    if part is not None:
        part_path, gm, args, kwargs = part
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        values = [*args] + [kwargs[n.target] if n.target in kwargs else n.args[0]
                            for n in placeholders[len(args):]]
        try:
            with torch.no_grad(), redirect_stderr(io.StringIO()):
                _NodeLocator(gm).run(*values)
        except _NodeFailure as located:
            node = _join(part_path, located.node.name)
            return f"at node '{node}' in {where}: {_first_line(located.__cause__)}"
        except Exception:
            pass
    return f"in {where}: {_first_line(exc)}"


def run_quietly(model: nn.Module, inputs: Sequence[Any]) -> Any:
    """``model(*inputs)`` without autograd, and without the generated code fx prints to stderr
    when a GraphModule fails (the caller reports the failure)."""
    with torch.no_grad(), redirect_stderr(io.StringIO()):
        return model(*inputs)


@dataclass
class _Calls:
    """The inputs of a module's first call on the example input, and the shapes of all calls."""

    args: tuple
    kwargs: dict
    shapes: set = field(default_factory=set)


def _record_calls(model: nn.Module, inputs: tuple[Tensor, ...]) -> dict[int, _Calls]:
    """Run ``model`` once and record the inputs of every call of its non-leaf submodules."""
    calls: dict[int, _Calls] = {}
    leaf = _Tracer()

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        shapes = tuple(tuple(t.shape) for t in (*args, *kwargs.values())
                       if isinstance(t, Tensor))
        seen = calls.get(id(module))
        if seen is None:
            cloned = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t,
                              (args, kwargs))
            seen = calls[id(module)] = _Calls(*cloned)
        seen.shapes.add(shapes)

    handles = [m.register_forward_pre_hook(record, with_kwargs=True)
               for path, m in model.named_modules() if not leaf.is_leaf_module(m, path)]
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:
        raise CaptureError(f"running the model on inputs of shape {_shapes(inputs)} failed: "
                           f"{_first_line(exc)}") from exc
    finally:
        for handle in handles:
            handle.remove()
    return calls


# --- fusing the parts -------------------------------------------------------------------------


def parts_of(module: nn.Module) -> list[tuple[str, GraphModule]]:
    """The traced GraphModule parts of a captured (or fused) module, as ``(path, part)``; the
    module itself (path '') when it is one GraphModule."""
    info = capture_info(module)
    if info is None:
        return [("", module)] if isinstance(module, GraphModule) else []
    return [(path, module.get_submodule(path)) for path in info.parts]


def fuse_parts(module: nn.Module, run: Callable[[GraphModule], Any]) -> Any:
    """Run ``run`` (a pipeline: GraphModule -> PassResult) on every traced part, in place.

    Returns the combined :class:`~repfuse.passes.PassResult`, node names and module paths
    prefixed with the part's path, also recorded as ``repfuse.history(module)``. New
    parameters keep the ``requires_grad`` flag of the parameters they were made from.
    """

    flags = _grad_flags(module)
    parts = parts_of(module)
    if len(parts) == 1 and parts[0][0] == "" and not capture_info(module).partial:
        result = run(module)
        _keep_requires_grad(module, result, flags, "")
        return result
    combined = PassResult(())
    for path, part in parts:
        result = run(part)
        _keep_requires_grad(part, result, flags, path)
        combined.extend(_prefixed(result, path))
    if isinstance(module, GraphModule):
        module.meta[META_KEY] = combined
    setattr(module, HISTORY_ATTR, combined)
    return combined


def _prefixed(result: Any, path: str) -> Any:
    """``result`` with node names and module paths seen from the whole model."""
    if not path:
        return result

    def full(name: str | None) -> str | None:
        return None if name is None else _join(path, name)

    rewrites = [replace(r, node=full(r.node), replaced=tuple(map(full, r.replaced)),
                        module_paths=tuple(map(full, r.module_paths)), module=full(r.module),
                        detail=f"in '{path}': {r.detail}")
                for r in result.rewrites]
    declined = [replace(d, node=full(d.node), module_paths=tuple(map(full, d.module_paths)),
                        reason=f"in '{path}': {d.reason}")
                for d in result.declined]
    return replace(result, rewrites=rewrites, declined=declined)


def _grad_flags(module: nn.Module) -> dict[str, bool]:
    """``requires_grad`` per parameter name and per module path (any of its own parameters)."""
    flags: dict[str, bool] = {}
    for path, sub in module.named_modules():
        own = [p.requires_grad for p in sub.parameters(recurse=False)]
        if own:
            flags[path] = any(own)
    for name, parameter in module.named_parameters():
        flags[name] = parameter.requires_grad
    return flags


def _keep_requires_grad(part: GraphModule, result: Any, flags: dict[str, bool],
                        path: str) -> None:
    """Give each module a rewrite created the flag of the parameters it replaced: trainable
    if any of them was (all of the model's, when the rewrite names none)."""
    default = any(flags.values())
    for rewrite in result.rewrites:
        if rewrite.module is None:
            continue
        try:
            new = part.get_submodule(rewrite.module)
        except AttributeError:
            continue  # replaced again by a later rewrite
        known = [flags[_join(path, p)] for p in rewrite.module_paths if _join(path, p) in flags]
        wanted = any(known) if known else default
        for parameter in new.parameters(recurse=False):
            parameter.requires_grad_(wanted)
