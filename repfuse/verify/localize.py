"""Localization: which rewrite (or module) is the first whose output diverges.

Whole-model outputs say *whether* a candidate differs; this module says *where*. Both models
run in float64 on the same batches and their activations are compared at checkpoints, each with
the float64 metric of :mod:`repfuse.verify.compare` (``max|a − b|`` against
``atol + rtol·max|a|``, ``a`` the reference activation).

**Provenance** (a GraphModule repfuse made, live or loaded back from a ``.pt`` file): the
reference is traced with :func:`repfuse.capture.trace`, which names its nodes exactly as the
trace the fused graph was made from. Checkpoints are

- every rewrite's boundary: the node that now computes a replaced node's value
  (:attr:`Rewrite.stands_for`) against that replaced node, followed through earlier rewrites
  to a node of the reference (a BN fold's conv against the BN; a later branch merge's conv
  against the original sum);
- every node both graphs share: same name, op and target, and not removed by any rewrite.

The first diverging checkpoint in the fused graph's topological order is named: its pass, node
and the original module paths it replaced. A rewrite whose output a later rewrite consumed has
no boundary of its own; it is listed in that later rewrite's ``includes``. ``torch.save``'s
loader renames nodes, so a loaded graph's nodes are mapped by position to the names recorded in
its history (:attr:`PassResult.node_names`).

A partially captured model (eager code around fused GraphModule parts) is localized part by
part: each part against the reference's module at its path, fed the inputs that module gets in
the reference run. Its nodes are named ``part/node`` and its module paths are from the root.

**Module paths** (any two models, e.g. a hand-written deploy model): forward hooks capture the
output of every leaf module of the reference and of the candidate module at the same path, call
by call; equal output shapes are compared. A train form and its deploy form legitimately differ
at some paths (a conv before its BatchNorm vs the conv with the BatchNorm folded in), so only
modules of the *same structure* in both (class, own parameter and buffer shapes: activations,
pools, unchanged layers) are checkpoints. The first that diverges is named, and its
``module_paths`` are the suspects: the reference modules upstream of it in the reference's fx
graph that are not upstream of a checkpoint that matched (e.g. ``layer2.0.conv1``,
``layer2.0.bn1`` for a diverging ``layer2.0.relu``).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter, Node

from repfuse.capture import trace
from repfuse.errors import RepfuseError
from repfuse.graph import origin_paths_of
from repfuse.passes.base import PassResult, Rewrite, history
from repfuse.verify.compare import Tolerance, json_float

F64 = torch.float64
Batch = tuple[Tensor, ...]

PROVENANCE, MODULE_PATHS, NONE = "provenance", "module_paths", "none"


@dataclass(frozen=True)
class Checkpoint:
    """One activation compared: a rewrite's output, a node both graphs share, or a module's."""

    kind: str  # "rewrite", "node" or "module"
    node: str  # candidate node (name recorded in its history) or module path
    reference: str  # the reference node (or module path) it is compared with
    module_paths: tuple[str, ...]  # original module paths it stands for
    pass_name: str | None
    max_abs: float
    ref_max_abs: float
    passed: bool
    includes: tuple[str, ...] = ()  # earlier rewrites absorbed into this one, "pass:node"
    call: int = 0  # module paths: which call of a module called more than once
    same_structure: bool = True  # module paths: same class and own tensors in both models

    @property
    def max_rel(self) -> float:
        if self.ref_max_abs == 0:
            return 0.0 if self.max_abs == 0 else math.inf
        return self.max_abs / self.ref_max_abs

    def to_dict(self) -> dict:
        if self.kind == "module":
            return {"module": self.node, "call": self.call, "max_abs": json_float(self.max_abs),
                    "max_rel": json_float(self.max_rel), "passed": self.passed,
                    "same_structure": self.same_structure}
        return {
            "pass": self.pass_name, "node": self.node, "reference_node": self.reference,
            "module_paths": list(self.module_paths), "max_abs": json_float(self.max_abs),
            "max_rel": json_float(self.max_rel), "passed": self.passed,
            "includes": list(self.includes),
        }

    def divergence(self) -> dict:
        """The ``first_divergence`` entry of a report."""
        return {
            "kind": self.kind, "pass": self.pass_name, "node": self.node,
            "reference_node": self.reference, "module_paths": list(self.module_paths),
            "max_abs": json_float(self.max_abs), "max_rel": json_float(self.max_rel),
        }


@dataclass(frozen=True)
class Localization:
    """Per-checkpoint errors of one float64 run and the first checkpoint that diverges."""

    method: str  # PROVENANCE, MODULE_PATHS or NONE
    tolerance: Tolerance
    rewrites: tuple[Checkpoint, ...] = ()  # provenance: one per rewrite boundary, graph order
    modules: tuple[Checkpoint, ...] = ()  # module paths: one per module call, execution order
    first: Checkpoint | None = None
    compared: int = 0  # checkpoints compared, shared nodes included
    note: str = ""
    dtype: str = "float64"

    def to_dict(self) -> dict:
        return {"method": self.method, "dtype": self.dtype,
                "tolerance": self.tolerance.to_dict(), "compared": self.compared,
                "note": self.note}


class _NotComparable(Exception):
    """Provenance localization does not apply; the message says why."""


def localize(
    reference: nn.Module,
    candidate: nn.Module,
    batches: Sequence[Batch],
    tolerance: Tolerance,
) -> Localization:
    """Compare ``reference`` and ``candidate`` activation by activation, in float64.

    ``batches`` are the inputs (cast to float64 here). Uses provenance when ``candidate`` is a
    GraphModule with a repfuse history, otherwise (or when its nodes cannot be matched to the
    reference's trace) module paths. Neither model is modified.
    """
    inputs = [tuple(t.to(F64) if t.is_floating_point() else t for t in b) for b in batches]
    note = ""
    try:
        if isinstance(candidate, GraphModule) and history(candidate).rewrites:
            return _by_provenance(reference, candidate, inputs, tolerance)
        parts = _fused_parts(candidate)
        if parts:
            return _by_parts(reference, parts, inputs, tolerance)
    except _NotComparable as why:
        note = f"provenance not usable ({why}); matched module paths instead"
    return _by_module_paths(reference, candidate, inputs, tolerance, note)


# --- provenance ---------------------------------------------------------------------------------


@dataclass
class _Point:
    """A checkpoint being measured: running maxima over batches."""

    kind: str
    node: str
    reference: str
    module_paths: tuple[str, ...]
    pass_name: str | None = None
    order: tuple[int, int] = (0, 0)
    includes: tuple[str, ...] = ()
    call: int = 0
    max_abs: float = 0.0
    ref_max_abs: float = 0.0
    comparable: bool = True

    def update(self, ref: Any, out: Any) -> None:
        if not (isinstance(ref, Tensor) and isinstance(out, Tensor)) or ref.shape != out.shape:
            self.comparable = False
            return
        ref, out = ref.detach().to(F64), out.detach().to(F64)
        if ref.numel() == 0:
            return
        diff = (ref - out).abs()
        worst = math.inf if bool(torch.isnan(diff).any()) else float(diff.max())
        self.max_abs = max(self.max_abs, worst)
        self.ref_max_abs = max(self.ref_max_abs, float(ref.abs().max()))

    def freeze(self, tolerance: Tolerance, same: bool = True) -> Checkpoint:
        return Checkpoint(
            kind=self.kind, node=self.node, reference=self.reference,
            module_paths=self.module_paths, pass_name=self.pass_name, max_abs=self.max_abs,
            ref_max_abs=self.ref_max_abs,
            passed=tolerance.allows(self.max_abs, self.ref_max_abs),
            includes=self.includes, call=self.call, same_structure=same,
        )


class _Recorder(Interpreter):
    """Runs a graph and hands the value of every watched node to ``sink(name, value)``."""

    def __init__(self, gm: GraphModule, names: dict[Node, str], sink) -> None:
        super().__init__(gm)
        self.names = names
        self.sink = sink

    def run_node(self, node: Node) -> Any:
        value = super().run_node(node)
        name = self.names.get(node)
        if name is not None:
            self.sink(name, value)
        return value


def _recorded_names(gm: GraphModule, recorded: PassResult) -> dict[Node, str]:
    """Each node of ``gm`` -> its name when the history was recorded.

    ``torch.save``'s loader re-traces the generated code, which renames nodes but keeps their
    order; the history keeps the names in order (:attr:`PassResult.node_names`).
    """
    nodes = list(gm.graph.nodes)
    saved = getattr(recorded, "node_names", ())
    if not saved or [n.name for n in nodes] == list(saved):
        return {n: n.name for n in nodes}
    if len(saved) != len(nodes):
        raise _NotComparable(
            f"the fused graph has {len(nodes)} nodes but its history recorded {len(saved)}"
        )
    return dict(zip(nodes, saved, strict=True))


def _target_key(node: Node) -> tuple[str, str]:
    return node.op, str(node.target)


def _provenance_points(
    rewrites: Sequence[Rewrite],
    fused_order: dict[str, int],
    reference_nodes: dict[str, Node],
    fused_nodes: dict[str, Node],
) -> tuple[list[_Point], list[_Point]]:
    """The rewrite boundaries and the shared nodes to compare."""
    origin: dict[str, str] = {}  # a fused node -> the reference node whose value it computes
    made_by: dict[str, list[str]] = {}  # a fused node -> the rewrites ("pass:node") behind it
    removed: set[str] = set()
    boundaries = []
    for index, rewrite in enumerate(rewrites):
        absorbed = tuple(dict.fromkeys(
            item for name in rewrite.replaced for item in made_by.pop(name, [])
        ))
        removed.update(rewrite.replaced)
        for root, out in rewrite.stands_for:
            target = origin.get(root, root)
            origin.setdefault(out, target)  # a bypass's source already stands for itself
            made_by[out] = [*made_by.get(out, []), *absorbed,
                            f"{rewrite.pass_name}:{rewrite.node}"]
            boundaries.append(_Point("rewrite", out, target, rewrite.module_paths,
                                     rewrite.pass_name, order=(0, index), includes=absorbed))
    points = []
    for point in boundaries:
        if point.node in fused_order and point.reference in reference_nodes:
            point.order = (fused_order[point.node], point.order[1])
            points.append(point)
    shared = []
    for name, node in fused_nodes.items():
        ref = reference_nodes.get(name)
        if (ref is None or name in removed or node.op in ("placeholder", "output")
                or _target_key(ref) != _target_key(node)):
            continue
        shared.append(_Point("node", name, name, origin_paths_of(ref), None,
                             order=(fused_order[name], -1)))
    return points, shared


def _by_provenance(
    reference: nn.Module, candidate: GraphModule, inputs: list[Batch], tolerance: Tolerance
) -> Localization:
    recorded = history(candidate)
    try:
        ref_gm = trace(copy.deepcopy(reference).to(F64), inputs[0])
    except RepfuseError as exc:
        raise _NotComparable(f"the reference cannot be traced: {exc}") from exc
    cand_gm = copy.deepcopy(candidate).to(F64).eval()
    names = _recorded_names(cand_gm, recorded)
    fused_nodes = {names[n]: n for n in cand_gm.graph.nodes}
    for rewrite in recorded.rewrites:  # the graph must still be the one the history describes
        node = fused_nodes.get(rewrite.node)
        if rewrite.module and node is not None and (node.op, node.target) != (
                "call_module", rewrite.module):
            raise _NotComparable(f"node '{rewrite.node}' of the fused graph no longer calls "
                                 f"'{rewrite.module}' as its history says")
    fused_order = {name: i for i, name in enumerate(fused_nodes)}
    reference_nodes = {n.name: n for n in ref_gm.graph.nodes}
    boundaries, shared = _provenance_points(recorded.rewrites, fused_order, reference_nodes,
                                            fused_nodes)
    if not boundaries:
        raise _NotComparable("no rewrite of the candidate's history matches a node of the "
                             "reference's trace")
    points = boundaries + shared
    by_fused: dict[str, list[_Point]] = defaultdict(list)
    for point in points:
        by_fused[point.node].append(point)
    wanted = {point.reference for point in points}
    ref_watch = {n: n.name for n in ref_gm.graph.nodes if n.name in wanted}
    cand_watch = {n: name for n, name in names.items() if name in by_fused}
    for batch in inputs:
        ref_values: dict[str, Any] = {}

        def keep(name: str, value: Any, ref_values=ref_values) -> None:
            ref_values[name] = _snapshot(value)

        _run(_Recorder(ref_gm, ref_watch, keep), batch, "reference")

        def compare(name: str, value: Any, ref_values=ref_values) -> None:
            for point in by_fused[name]:
                point.update(ref_values.get(point.reference), value)

        _run(_Recorder(cand_gm, cand_watch, compare), batch, "candidate")
    measured = sorted((p for p in points if p.comparable), key=lambda p: p.order)
    checks = [p.freeze(tolerance) for p in measured]
    rewrites = tuple(c for c in checks if c.kind == "rewrite")
    first = next((c for c in checks if not c.passed), None)
    skipped = len(points) - len(measured)
    note = f"{skipped} checkpoints not comparable (shape or type differs)" if skipped else ""
    return Localization(PROVENANCE, tolerance, rewrites=rewrites, first=first,
                        compared=len(checks), note=note)


def _fused_parts(model: nn.Module) -> list[tuple[str, GraphModule]]:
    """The fused GraphModules inside a partially captured model (outermost ones, with rewrites).
    """
    if isinstance(model, GraphModule):
        return []
    parts: list[tuple[str, GraphModule]] = []
    for path, module in model.named_modules():
        inside = any(path.startswith(f"{p}.") for p, _ in parts)
        if path and not inside and isinstance(module, GraphModule) and history(module).rewrites:
            parts.append((path, module))
    return parts


def _by_parts(
    reference: nn.Module, parts: list[tuple[str, GraphModule]], inputs: list[Batch],
    tolerance: Tolerance,
) -> Localization:
    """Provenance for a partially captured model: each fused part against the reference's
    module at its path, on the inputs that module receives in the reference run, so each part
    is judged on its own. Nodes are named ``part/node``, module paths from the model's root."""
    ref64 = copy.deepcopy(reference).to(F64).eval()
    seen: dict[str, list[Batch]] = {path: [] for path, _ in parts}
    order: list[str] = []  # the parts in the order the reference runs them

    def keep(path: str, args: tuple) -> None:
        if path not in order:
            order.append(path)
        seen[path].append(tuple(_snapshot(a) for a in args))

    handles = []
    for path, _ in parts:
        try:
            module = ref64.get_submodule(path)
        except AttributeError as exc:
            raise _NotComparable(f"the reference has no module '{path}'") from exc
        handles.append(module.register_forward_pre_hook(
            lambda _m, args, path=path: keep(path, args)))
    try:
        for batch in inputs:
            with torch.no_grad():
                ref64(*batch)
    except Exception as exc:
        raise _NotComparable(f"running the reference failed: {type(exc).__name__}: {exc}") \
            from exc
    finally:
        for handle in handles:
            handle.remove()
    called = sorted((p for p in parts if p[0] in order), key=lambda p: order.index(p[0]))
    rewrites: list[Checkpoint] = []
    first, compared, notes = None, 0, []
    for path, part in called:
        if not all(isinstance(a, Tensor) for args in seen[path] for a in args):
            notes.append(f"part '{path}' takes non-tensor inputs; not compared")
            continue
        located = _by_provenance(ref64.get_submodule(path), part, seen[path], tolerance)
        checks = [_in_part(path, c) for c in located.rewrites]
        rewrites.extend(checks)
        compared += located.compared
        if first is None and located.first is not None:
            first = _in_part(path, located.first)
        if located.note:
            notes.append(f"{path}: {located.note}")
    if not rewrites:
        raise _NotComparable("no fused part could be compared")
    return Localization(PROVENANCE, tolerance, rewrites=tuple(rewrites), first=first,
                        compared=compared, note=_join(*notes))


def _in_part(path: str, check: Checkpoint) -> Checkpoint:
    return replace(check, node=f"{path}/{check.node}", reference=f"{path}/{check.reference}",
                   module_paths=tuple(f"{path}.{p}" if p else path
                                      for p in check.module_paths))


def _snapshot(value: Any) -> Any:
    """A copy of a reference activation: a later in-place op (``ReLU(inplace=True)``) would
    otherwise change it before the candidate's value is compared with it. The candidate's
    values are compared as soon as they are computed."""
    return value.detach().clone() if isinstance(value, Tensor) else value


def _run(interpreter: Interpreter, batch: Batch, role: str) -> None:
    try:
        with torch.no_grad():
            interpreter.run(*batch)
    except Exception as exc:
        raise _NotComparable(f"running the {role} graph failed: {type(exc).__name__}: {exc}") \
            from exc


# --- module paths -------------------------------------------------------------------------------


def _leaf_paths(model: nn.Module) -> list[str]:
    return [path for path, module in model.named_modules()
            if path and next(module.children(), None) is None]


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def _own_tensors(module: nn.Module) -> dict[str, tuple[int, ...]]:
    named = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return {name: tuple(t.shape) for name, t in named}


def same_structure(a: nn.Module, b: nn.Module) -> bool:
    """Same class name and the same own parameters and buffers (names and shapes): given the
    same input, the two should compute the same output."""
    return type(a).__name__ == type(b).__name__ and _own_tensors(a) == _own_tensors(b)


def _capture_calls(model: nn.Module, paths: Sequence[str], batch: Batch, sink) -> None:
    """Run ``model`` with a forward hook on each of ``paths`` calling ``sink(path, output)``."""
    handles = []
    for path in paths:
        module = model.get_submodule(path)
        handles.append(module.register_forward_hook(
            lambda _m, _args, output, path=path: sink(path, _first_tensor(output))
        ))
    try:
        with torch.no_grad():
            model(*batch)
    finally:
        for handle in handles:
            handle.remove()


def _by_module_paths(
    reference: nn.Module, candidate: nn.Module, inputs: list[Batch], tolerance: Tolerance,
    note: str,
) -> Localization:
    if any(isinstance(m, torch.jit.ScriptModule) for m in (reference, candidate)):
        return Localization(NONE, tolerance, note=_join(
            note, "a TorchScript module takes no forward hooks; no module compared"))
    try:
        ref64 = copy.deepcopy(reference).to(F64).eval()
        cand64 = copy.deepcopy(candidate).to(F64).eval()
    except Exception as exc:  # e.g. a wrapper around an inference session
        raise RepfuseError(f"cannot copy the models to float64: {type(exc).__name__}: {exc}") \
            from exc
    candidate_modules = dict(cand64.named_modules())
    paths = [p for p in _leaf_paths(ref64) if p and p in candidate_modules]
    if not paths:
        return Localization(NONE, tolerance, note=_join(note, "the models share no module path"))
    points: dict[tuple[str, int], _Point] = {}
    order: dict[tuple[str, int], int] = {}  # reference execution order of the module calls
    for batch in inputs:
        ref_values: dict[tuple[str, int], Tensor | None] = {}
        ref_calls: dict[str, int] = defaultdict(int)

        def keep(path: str, value: Tensor | None, calls=ref_calls, values=ref_values) -> None:
            values[(path, calls[path])] = _snapshot(value)
            calls[path] += 1

        _capture_calls(ref64, paths, batch, keep)
        cand_calls: dict[str, int] = defaultdict(int)

        def compare(path: str, value: Tensor | None, calls=cand_calls,
                    values=ref_values) -> None:
            key = (path, calls[path])
            calls[path] += 1
            if key in values:
                point = points.setdefault(key, _Point("module", path, path, (path,),
                                                      call=key[1]))
                point.update(values[key], value)

        try:
            _capture_calls(cand64, paths, batch, compare)
        except Exception as exc:
            raise RepfuseError(f"running the candidate failed: {type(exc).__name__}: {exc}") \
                from exc
        order = order or {key: i for i, key in enumerate(ref_values)}
        for key, point in points.items():
            point.comparable &= key in ref_values
    ranked = sorted((p for p in points.values() if p.comparable and (p.node, p.call) in order),
                    key=lambda p: order[(p.node, p.call)])
    if not ranked:
        return Localization(NONE, tolerance, note=_join(
            note, "no module at a shared path has the same output shape in both models"))
    alike = [same_structure(ref64.get_submodule(p.node), candidate_modules[p.node])
             for p in ranked]
    checks = [p.freeze(tolerance, same=ok) for p, ok in zip(ranked, alike, strict=True)]
    first, how = _blame(ref64, inputs[0], checks)
    return Localization(MODULE_PATHS, tolerance, modules=tuple(checks), first=first,
                        compared=len(checks), note=_join(note, how))


def _join(*parts: str) -> str:
    return "; ".join(part for part in parts if part)


def _blame(reference: nn.Module, example: Batch, checks: list[Checkpoint]
           ) -> tuple[Checkpoint | None, str]:
    """The first module of the same structure in both models whose output differs, with the
    reference modules that may have caused it as its ``module_paths``.

    Modules of different structure (a conv before its BatchNorm vs the conv with it folded in)
    may legitimately differ, so only same-structure modules are checkpoints. The suspects are
    the first diverging checkpoint's upstream modules in the reference's fx graph that are not
    upstream of a checkpoint that matched before it (the region between the last good
    checkpoints and the first bad one), or, when the reference does not trace, the compared
    modules run since the last good checkpoint.
    """
    bad = next((i for i, c in enumerate(checks) if c.same_structure and not c.passed), None)
    if bad is None:
        return None, ""
    first = checks[bad]
    good = [i for i, c in enumerate(checks[:bad]) if c.same_structure and c.passed]
    try:
        gm = trace(reference, example)
    except RepfuseError:
        gm = None
    node_of: dict[tuple[str, int], Node] = {}
    if gm is not None:
        calls: dict[str, int] = defaultdict(int)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                node_of[(node.target, calls[node.target])] = node
                calls[node.target] += 1
    key = (first.node, first.call)
    if key in node_of:
        covered = _upstream([node_of[(checks[i].node, checks[i].call)] for i in good
                             if (checks[i].node, checks[i].call) in node_of])
        region = _upstream([node_of[key]]) - covered
        suspects = [n.target for n in gm.graph.nodes if n in region and n.op == "call_module"]
        how = ""
    else:
        last_good = max(good, default=-1)
        suspects = [c.node for c in checks[last_good + 1:bad + 1]]
        how = "suspects are the modules run since the last matching one (no fx graph)"
    own = _own_tensors(reference.get_submodule(first.node))
    paths = [p for p in dict.fromkeys(suspects) if p != first.node or own] or [first.node]
    return replace(first, module_paths=tuple(paths)), how


def _upstream(nodes: Sequence[Node]) -> set[Node]:
    """``nodes`` and every node they read from, transitively."""
    seen: set[Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen
