"""The pass framework: candidates, exactness checks with reasons, one rewriter, a worklist.

A pass is a small frozen dataclass whose ``name`` is its command-line name and whose fields are
its options. It looks at one node at a time (:meth:`Pass.visit`) and answers with

- ``None``: this node is not a candidate for the pass at all;
- a :class:`Decline`: it is a candidate, but rewriting it would not be exact (or not safe), and
  the reason says why in a sentence naming the node;
- a :class:`Rewrite`: it rewrote the graph, through :class:`Rewriter`, the only code that
  mutates a graph. The rewriter records provenance (pass, replaced nodes, original module paths)
  on the new node's ``meta['repfuse']`` and in ``gm.meta['repfuse']``, which survives
  ``torch.save``.

:func:`run_passes` drives a list of passes to a fixed point with a worklist: every node is
visited once, and after a rewrite only the new node's neighbourhood is visited again, so the
work is linear in the graph size.
"""

from __future__ import annotations

import operator
import os
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from repfuse.cost import NodeCost, node_cost, nodes_cost
from repfuse.errors import GraphInvariantError, PassBugWarning, first_line
from repfuse.graph import (
    META_KEY,
    UseIndex,
    arith_kind,
    describe,
    gc_paused,
    is_metadata_helper,
    meta_with_size,
    metadata_readers,
    origin_paths_of,
    shape_of,
    use_direct_module_access,
)
from repfuse.lift import LinearStep, affine_op, lift
from repfuse.passes.nonlinear import classify


@dataclass(frozen=True)
class Rewrite:
    """One applied rewrite: which pass, which node now stands for which original ones."""

    pass_name: str
    node: str  # the node that now computes the replaced nodes' result
    replaced: tuple[str, ...]  # names of the nodes removed
    module_paths: tuple[str, ...]  # original module paths covered, through earlier rewrites too
    module: str | None = None  # path of the new module, if one was created
    exact: bool = True
    detail: str = ""
    cost_before: NodeCost | None = None  # estimated cost of the replaced nodes
    cost_after: NodeCost | None = None  # and of the nodes that replaced them
    # (replaced node, node now computing its value), per redirected node; the verifier
    # compares the two to name the first rewrite whose output diverges
    stands_for: tuple[tuple[str, str], ...] = ()

    @property
    def cost_change(self) -> NodeCost:
        """``after - before`` (negative: saved); zero when no estimate was recorded."""
        if self.cost_before is None or self.cost_after is None:
            return NodeCost()
        return self.cost_after - self.cost_before

    def to_dict(self) -> dict:
        cost = None
        if self.cost_before is not None and self.cost_after is not None:
            cost = {"before": self.cost_before.to_dict(), "after": self.cost_after.to_dict()}
        return {
            "pass": self.pass_name, "node": self.node, "replaced": list(self.replaced),
            "module_paths": list(self.module_paths), "module": self.module,
            "exact": self.exact, "detail": self.detail, "cost": cost,
        }


@dataclass(frozen=True)
class Decline:
    """A candidate left alone, and why."""

    pass_name: str
    node: str
    reason: str
    module_paths: tuple[str, ...] = ()  # original module paths of the declined node

    def to_dict(self) -> dict:
        return {"pass": self.pass_name, "node": self.node, "reason": self.reason,
                "module_paths": list(self.module_paths)}


@dataclass
class PassResult:
    """What a run of passes did to a graph: the rewrites applied and the candidates declined."""

    passes: tuple[str, ...]
    rewrites: list[Rewrite] = field(default_factory=list)
    declined: list[Decline] = field(default_factory=list)
    # The graph's node names when last recorded: torch.save's loader renames nodes, and the
    # verifier maps the loaded graph's nodes back to these (same order) to read the rewrites.
    node_names: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.rewrites)

    def counts(self) -> dict[str, int]:
        """Rewrites applied per pass, in pipeline order (passes with none are listed as 0)."""
        applied = Counter(r.pass_name for r in self.rewrites)
        return {name: applied.get(name, 0) for name in self.passes}

    def extend(self, other: PassResult) -> None:
        """Append a later run: its declines replace earlier ones for the same pass and node."""
        self.passes = tuple(dict.fromkeys(self.passes + other.passes))
        self.rewrites.extend(other.rewrites)
        stale = _removed(other)
        renewed = {(d.pass_name, d.node) for d in other.declined}
        self.declined = [
            d for d in self.declined
            if d.node not in stale and (d.pass_name, d.node) not in renewed
        ]
        self.declined.extend(other.declined)

    def cost_change_by_pass(self) -> dict[str, NodeCost]:
        """The estimated cost change (after - before) of each pass's rewrites, pipeline order."""
        change = {name: NodeCost() for name in self.passes}
        for rewrite in self.rewrites:
            change[rewrite.pass_name] = change.get(rewrite.pass_name, NodeCost()) + (
                rewrite.cost_change)
        return change

    def to_dict(self) -> dict:
        return {
            "passes": list(self.passes), "counts": self.counts(),
            "rewrites": [r.to_dict() for r in self.rewrites],
            "declined": [d.to_dict() for d in self.declined],
        }


def block_of(module_paths: Sequence[str]) -> str:
    """The block a rewrite or decline belongs to: the common parent of its module paths."""
    if not module_paths:
        return ""
    split = [p.split(".") for p in module_paths]
    common: list[str] = []
    for parts in zip(*split, strict=False):  # stops at the shortest path
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    if len(common) == min(len(parts) for parts in split):
        common = common[:-1]  # one path (or one inside another): its parent is the block
    return ".".join(common)


def _removed(result: PassResult) -> set[str]:
    return {name for r in result.rewrites for name in r.replaced}


class RewriteRefused(Exception):
    """A rewrite found, before changing anything, that it would not be exact or safe; the
    pipeline records the message as the candidate's decline."""


# Set (e.g. by a test suite) to make a pass that raises while examining a candidate fail
# loudly instead of declining it with a PassBugWarning.
STRICT_ENV = "REPFUSE_STRICT_PASSES"


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


class Pass:
    """Base of all passes. Subclasses are frozen dataclasses; fields are options."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, shown by ``repfuse passes``
    # Passes of a later stage run after those of earlier stages reach their fixed point, e.g.
    # horizontal fusion after every sum and concat of branches has been merged.
    stage: ClassVar[int] = 0

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        raise NotImplementedError

    def decline(self, node: Node, reason: str) -> Decline:
        return Decline(self.name, node.name, reason, origin_paths_of(node))


class Rewriter:
    """The one object that changes the graph; it keeps the :class:`UseIndex` and records."""

    def __init__(self, gm: GraphModule, index: UseIndex | None = None) -> None:
        self.gm = gm
        self.index = index if index is not None else UseIndex(gm)
        self.erased: set[Node] = set()
        self.rewrites: list[Rewrite] = []
        self.touched: list[Node] = []  # nodes whose neighbourhood a rewrite changed
        self.pending: set[Node] = set()  # nodes the pipeline will still visit
        self.mutating = False  # True while a rewrite is changing the graph

    @contextmanager
    def _mutation(self) -> Iterator[None]:
        self.mutating = True
        yield
        self.mutating = False

    def replace_with_module(
        self,
        pass_name: str,
        *,
        root: Node,
        replaced: Sequence[Node],
        module: nn.Module,
        args: tuple | Callable[[], tuple],
        module_path: str,
        detail: str = "",
        exact: bool = True,
        wrap: Callable[[Node], Node] | None = None,
        same_shape_as_new: Node | None = None,
    ) -> Rewrite:
        """Compute ``root``'s value with a new ``module(*args)`` and delete ``replaced``.

        ``args`` may be a function that builds the argument nodes (called where the new nodes
        go, before ``root``), e.g. a global pool moved in front of the new layer. ``wrap``, if
        given, builds (before ``root``) the expression around the new node that stands for
        ``root``, e.g. ``new + other_terms`` when only part of a sum was merged.

        ``root`` must be in ``replaced``; every other replaced node must be read only by
        replaced nodes. ``module_path`` is reused when only ``replaced`` use the module there
        (so the fused conv keeps the train-form conv's name and state-dict keys); otherwise a
        fresh path is derived from it. ``same_shape_as_new``, a replaced node whose output has
        the new module's shape on every input (the layer a fold rewrites), takes the reads of
        its metadata to the new node.
        """
        return self._replace(pass_name, [root], replaced, module, args, module_path, detail,
                             exact, wrap, split=None, same_shape_as_new=same_shape_as_new)

    def replace_with_split(
        self,
        pass_name: str,
        *,
        roots: Sequence[Node],
        sizes: Sequence[int],
        dim: int,
        replaced: Sequence[Node],
        module: nn.Module,
        args: tuple,
        module_path: str,
        detail: str = "",
    ) -> Rewrite:
        """Compute all of ``roots`` with one new ``module(*args)`` split along ``dim``.

        ``torch.split(new, sizes, dim)[i]`` takes the place of ``roots[i]`` (horizontal
        fusion of sibling layers).
        """
        return self._replace(pass_name, list(roots), replaced, module, args, module_path,
                             detail, True, None, split=(tuple(sizes), dim))

    def _replace(self, pass_name, roots, replaced, module, args, module_path, detail, exact,
                 wrap, split, same_shape_as_new: Node | None = None) -> Rewrite:
        # may refuse: before any change
        metadata = self._metadata_plan(replaced, roots, same_shape_as_new)
        # before the module at the path changes; with the ops inside the pattern that go
        # with it (an exported batch norm between a conv and the getitem that reads it)
        cost_before = nodes_cost(self.gm, [*replaced, *_inner(replaced)])
        with self._mutation():
            target = self._place_module(module_path, module, replaced)
            first = roots[0]
            anchor = first.prev
            with self.gm.graph.inserting_before(first):
                if callable(args):
                    args = args()
                new = self.gm.graph.call_module(target, args)
                if "tensor_meta" in first.meta:
                    new.meta["tensor_meta"] = first.meta["tensor_meta"]  # wrap/split may refine
                results = [new]
                if wrap is not None:
                    results = [wrap(new)]
                elif split is not None:
                    results = self._split(new, roots, *split)
            created = _between(anchor, first)
            for node in created:
                self.index.on_create(node)
            paths = _merge_paths(origin_paths_of(n) for n in replaced)
            record = Rewrite(pass_name, new.name, tuple(n.name for n in replaced), paths,
                             module=target, exact=exact, detail=detail,
                             cost_before=cost_before, cost_after=nodes_cost(self.gm, created),
                             stands_for=tuple(
                                 (r.name, x.name) for r, x in zip(roots, results, strict=True)))
            new.meta[META_KEY] = record
            for reader, node, root in metadata:
                result = new if root is None else results[roots.index(root)]
                reader.replace_input_with(node, result)
                _move_after(reader, result)
            for root, result in zip(roots, results, strict=True):
                root.replace_all_uses_with(result)
            self._erase(replaced)
        self.rewrites.append(record)
        self.touched.extend(created)
        return record

    def _metadata_plan(self, replaced: Sequence[Node], roots: Sequence[Node],
                       same_shape_as_new: Node | None) -> list[tuple[Node, Node, Node | None]]:
        """Where the metadata reads (``x.shape``, ``x.device``) of the replaced nodes that are
        not roots go: ``(reader, node, root)``, the root's replacement having the same
        metadata as ``node`` on every input (root None: the new module's output). Raise
        :class:`RewriteRefused` when there is no such node."""
        doomed = set(replaced)
        plan: list[tuple[Node, Node, Node | None]] = []
        for node in replaced:
            if node in roots:
                continue
            for reader in metadata_readers(node):
                if reader in doomed:
                    continue
                if node is same_shape_as_new:
                    plan.append((reader, node, None))
                    continue
                root = _same_metadata_root(node, doomed, roots)
                if root is None:
                    raise RewriteRefused(
                        f"{describe(reader, self.gm)} reads the metadata of "
                        f"{describe(node, self.gm)}, which the rewrite removes, and no tensor "
                        "it leaves is sure to have the same shape on every input")
                plan.append((reader, node, root))
        return plan

    def _split(self, new: Node, roots: Sequence[Node], sizes: tuple[int, ...],
               dim: int) -> list[Node]:
        parts = self.gm.graph.call_function(torch.split, (new, list(sizes), dim))
        metas = [root.meta.get("tensor_meta") for root in roots]
        if all(m is not None for m in metas):
            new.meta["tensor_meta"] = meta_with_size(metas[0], dim, sum(sizes))
            parts.meta["tensor_meta"] = tuple(metas)
        items = []
        for index, root in enumerate(roots):
            item = self.gm.graph.call_function(operator.getitem, (parts, index))
            if "tensor_meta" in root.meta:
                item.meta["tensor_meta"] = root.meta["tensor_meta"]
            items.append(item)
        return items

    def replace_with_constant(
        self, pass_name: str, node: Node, value: Tensor, detail: str = "",
        parameter: nn.Parameter | None = None,
    ) -> Rewrite:
        """Replace ``node`` by a new buffer holding ``value`` (read with ``get_attr``), or by
        ``parameter`` when given (a weight computed from weights is still a weight)."""
        cost_before = node_cost(self.gm, node)
        with self._mutation():
            target = self.add_constant(parameter if parameter is not None else value,
                                       parameter=parameter is not None)
            with self.gm.graph.inserting_before(node):
                new = self.gm.graph.get_attr(target)
            self.index.on_create(new)
            new.meta["tensor_meta"] = node.meta.get("tensor_meta")
            new.meta["type"] = type(value)
            record = Rewrite(pass_name, new.name, (node.name,), origin_paths_of(node),
                             module=None, detail=detail, cost_before=cost_before,
                             cost_after=NodeCost(), stands_for=((node.name, new.name),))
            new.meta[META_KEY] = record
            node.replace_all_uses_with(new)
            self._erase([node])
        self.rewrites.append(record)
        self.touched.append(new)
        return record

    def bypass(self, pass_name: str, node: Node, source: Node, detail: str = "") -> Rewrite:
        """Remove ``node``, whose value equals ``source``'s, rerouting its users to ``source``."""
        cost_before = node_cost(self.gm, node)
        with self._mutation():
            node.replace_all_uses_with(source)
            record = Rewrite(pass_name, source.name, (node.name,), origin_paths_of(node),
                             detail=detail, cost_before=cost_before, cost_after=NodeCost(),
                             stands_for=((node.name, source.name),))
            self._erase([node])
        self.rewrites.append(record)
        self.touched.append(source)
        return record

    def inline_value(self, pass_name: str, node: Node, value: Any, detail: str) -> Rewrite:
        """Replace a node computing a plain value (a rank, a flag) by that value in the
        arguments of its users, and remove it."""
        users = list(node.users)
        with self._mutation():
            for user in users:
                user.args = map_arg(user.args, lambda n: value if n is node else n)
                user.kwargs = map_arg(user.kwargs, lambda n: value if n is node else n)
            record = Rewrite(pass_name, users[0].name if users else "", (node.name,),
                             origin_paths_of(node), detail=detail)
            self._erase([node])
        self.rewrites.append(record)
        self.touched.extend(users)
        return record

    def remove(self, pass_name: str, node: Node, detail: str) -> Rewrite:
        """Remove ``node``, which nothing reads and whose call has no effect (e.g. an assert
        whose condition is the constant True)."""
        neighbours = list(node.all_input_nodes)
        with self._mutation():
            record = Rewrite(pass_name, "", (node.name,), origin_paths_of(node), detail=detail)
            self._erase([node])
        self.rewrites.append(record)
        self.touched.extend(n for n in neighbours if n not in self.erased)
        return record

    def replace_region(
        self,
        pass_name: str,
        *,
        nodes: Sequence[Node],
        layers: Mapping[Node, tuple[nn.Module, str, Node]],
        roots: Sequence[Node],
        detail: str = "",
    ) -> Rewrite:
        """Recompute the region ``nodes`` (graph order) with copies, each node of ``layers``
        computed instead by a new module, and delete the originals (:meth:`replace_many`).

        ``layers[node] = (module, module_path, data)``: the copy of ``node`` calls ``module``
        (placed at ``module_path`` as by :meth:`place_module`) on the copy of ``data``.
        ``roots`` are the region's nodes read from outside it; only their copies must compute
        the same values (they stand for the originals), the values inside the region may
        differ (e.g. channels rescaled by cross-layer equalization). Every other node of the
        region must be read only inside it, but for reads of its shape (a copy has it too).
        """
        region = list(nodes)
        copies: dict[Node, Node] = {}

        def copy_of(node: Node) -> Callable[[], Node]:
            def build() -> Node:
                if node in layers:
                    module, path, data = layers[node]
                    target = self.place_module(path, module, region)
                    new = self.gm.graph.call_module(target, (copies.get(data, data),))
                    new.meta = dict(node.meta)
                else:  # its arguments already name the copies made before it
                    new = self.gm.graph.node_copy(node)
                copies[node] = new
                return new
            return build

        return self.replace_many(pass_name, changes=[(n, copy_of(n)) for n in region],
                                 detail=detail, standing=roots)

    def replace_many(
        self,
        pass_name: str,
        *,
        changes: Sequence[tuple[Node, Callable[[], Node]]],
        resized: Mapping[Node, object] | None = None,
        erased: Sequence[Node] = (),
        detail: str = "",
        exact: bool = True,
        cost_before: NodeCost | None = None,
        standing: Sequence[Node] | None = None,
    ) -> Rewrite:
        """Replace several nodes at once and give others new shape metadata, as one rewrite:
        a change made everywhere or nowhere, e.g. a channel removed from the layers that write
        and read it and from the ops between them.

        ``changes`` are ``(old, build)`` pairs in graph order. ``build()`` runs just before
        ``old``, after the earlier replacements (so ``old.args`` already name the new nodes),
        creates the nodes that replace ``old`` (modules through :meth:`place_module`) and
        returns the one that takes its place, with its ``tensor_meta`` set. ``resized`` maps
        nodes that stay to their new ``tensor_meta``; ``erased`` nodes are read only by replaced
        ones and go too. Each new node records its own origin (the node it replaced); the
        returned record covers them all. ``cost_before`` replaces the estimate from the
        replaced nodes (for an op the cost model does not price, e.g. a whole attention).
        ``standing`` names the replaced nodes whose replacements compute the same values (the
        verifier compares them); by default, those whose shape did not change.
        """
        resized = dict(resized or {})
        if cost_before is None:
            cost_before = nodes_cost(self.gm, [*(old for old, _ in changes), *erased, *resized])
        pairs: list[tuple[Node, Node, list[Node]]] = []
        with self._mutation():
            for old, build in changes:
                anchor = old.prev
                with self.gm.graph.inserting_before(old):
                    new = build()
                created = _between(anchor, old)
                for node in created:
                    self.index.on_create(node)
                pairs.append((old, new, created))
                old.replace_all_uses_with(new)
            for node, meta in resized.items():
                node.meta["tensor_meta"] = meta
            news = {old: new for old, new, _ in pairs}
            standing_set = set(standing) if standing is not None else None

            def stands(old: Node) -> bool:
                if standing_set is not None:
                    return old in standing_set
                return _same_shape(old, news[old])

            created_all = [n for _, _, created in pairs for n in created]
            main = pairs[0][1]
            gone = [*news, *erased]
            record = Rewrite(
                pass_name, main.name, tuple(n.name for n in gone),
                _merge_paths(origin_paths_of(n) for n in gone),
                module=main.target if main.op == "call_module" else None, exact=exact,
                detail=detail, cost_before=cost_before,
                cost_after=nodes_cost(self.gm, [*created_all, *resized]),
                stands_for=tuple((old.name, new.name) for old, new in news.items()
                                 if stands(old)),
            )
            for old, new, created in pairs:
                own = replace(record, node=new.name, replaced=(old.name,),
                              module_paths=origin_paths_of(old),
                              module=new.target if new.op == "call_module" else None,
                              stands_for=((old.name, new.name),) if stands(old) else ())
                for node in created:
                    node.meta[META_KEY] = own
            self._erase(gone)
        self.rewrites.append(record)
        self.touched.extend([*created_all, *resized])
        return record

    def place_module(self, path: str, module: nn.Module, replaced: Sequence[Node]) -> str:
        """Add ``module`` at ``path`` when nothing is there or only ``replaced`` use the module
        there (and its submodules and tensors), else at a fresh path derived from it; returns
        the path to call."""
        parent, _, name = path.rpartition(".")
        owner = self.gm.get_submodule(parent) if parent and _path_exists(self.gm, parent) else (
            None if parent else self.gm)
        free = bool(path) and owner is not None and not hasattr(owner, name)
        if free or (path and _path_exists(self.gm, path) and self._only_used_by(path, replaced)):
            module.train(self.gm.training)  # a new layer is born in training mode
            self.gm.add_submodule(path, module)
            return path
        return self._place_module(path, module, replaced)

    def _only_used_by(self, path: str, replaced: Sequence[Node]) -> bool:
        """True when no node but ``replaced`` calls or reads anything at or under ``path``."""
        def under(target: str) -> bool:
            return target == path or target.startswith(f"{path}.")

        used = sum(n for t, n in self.index.module_sites.items() if under(t))
        used += sum(n for t, n in self.index.attr_reads.items() if under(t))
        own = sum(1 for n in replaced if n.op in ("call_module", "get_attr") and under(n.target))
        if used != own:
            return False
        held = self.gm.get_submodule(path)
        return all(self.index.tensor_names[id(t)] <= 1
                   for t in (*held.parameters(), *held.buffers()))

    def add_constant(self, value: Tensor, parameter: bool = False) -> str:
        """Register ``value`` on the graph module as a new buffer (or parameter: ``value``
        itself if it is one, else a frozen one) and return its name, for a ``get_attr``."""
        name, n = "_repfuse_constant", 0
        while hasattr(self.gm, f"{name}{n}"):
            n += 1
        target = f"{name}{n}"
        if parameter:
            if not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=False)
            self.gm.register_parameter(target, value)
        else:
            self.gm.register_buffer(target, value)
        return target

    def is_erased(self, node: Node) -> bool:
        return node in self.erased

    def _place_module(self, path: str, module: nn.Module, replaced: Sequence[Node]) -> str:
        if not self._reusable(path, replaced):
            path = self._fresh_path(path)
        module.train(self.gm.training)  # a new layer is born in training mode; the graph is not
        self.gm.add_submodule(path, module)  # replaces the old module when reusing its path
        return path

    def _reusable(self, path: str, replaced: Sequence[Node]) -> bool:
        """True when the module at ``path`` is used only by ``replaced`` (calls and weights).

        Then the fused layer takes its place, keeping the train-form layer's name and state-dict
        keys, also for functional and exported graphs whose weights live in plain containers.
        """
        if not path:
            return False
        try:
            existing = self.gm.get_submodule(path)
        except AttributeError:
            return False
        if next(existing.children(), None) is not None:
            return False
        calls = sum(1 for n in replaced if n.op == "call_module" and n.target == path)
        if self.index.module_sites[path] != calls:
            return False
        doomed = set(replaced)
        dying_attrs = {
            a for n in replaced for a in n.all_input_nodes
            if a.op == "get_attr" and all(u in doomed for u in a.users)
        }
        dying_reads = Counter(a.target for a in dying_attrs)
        own = [*existing.named_parameters(recurse=False), *existing.named_buffers(recurse=False)]
        return all(
            self.index.attr_reads[f"{path}.{name}"] == dying_reads[f"{path}.{name}"]
            for name, _ in own
        )

    def _fresh_path(self, base: str) -> str:
        base = base or "fused"
        candidate, n = f"{base}_fused", 0
        while _path_exists(self.gm, candidate):
            n += 1
            candidate = f"{base}_fused{n}"
        return candidate

    def _erase(self, nodes: Iterable[Node]) -> None:
        """Erase ``nodes`` and what only they read and has no effect of its own (weights,
        metadata reads, pure aten ops such as an exported batch norm whose output getitem is
        among ``nodes``), recursively."""
        doomed = _with_dead_inputs(list(nodes))
        doomed_set = set(doomed)
        for node in doomed:
            outside = [u for u in node.users if u not in doomed_set]
            if outside:
                raise GraphInvariantError(
                    f"cannot erase {node.format_node()}: still used by {outside[0].format_node()}"
                )
        for node in _users_first(doomed):
            self.gm.graph.erase_node(node)
            self.index.on_erase(node)
            self.erased.add(node)


def _with_dead_inputs(doomed: list[Node]) -> list[Node]:
    """``doomed`` and, recursively, the inputs that only doomed nodes read and that can go
    unread: ``get_attr`` reads, metadata helpers (``x.shape``) and pure aten ops."""
    members = set(doomed)
    pending = [n for node in doomed for n in node.all_input_nodes]
    while pending:
        node = pending.pop()
        if node in members or not _removable_when_unread(node):
            continue
        if all(u in members for u in node.users):
            members.add(node)
            doomed.append(node)
            pending.extend(node.all_input_nodes)
    return doomed


def _inner(replaced: Sequence[Node]) -> list[Node]:
    """The nodes between replaced ones that only they read: erased with them, not named."""
    members = set(replaced)
    return [n for node in replaced for n in node.all_input_nodes
            if n not in members and n.op == "call_function" and _removable_when_unread(n)
            and all(u in members for u in n.users)
            and any(a in members for a in n.all_input_nodes)]


def _removable_when_unread(node: Node) -> bool:
    """True for a node whose only effect is its value: a ``get_attr``, a metadata helper, or
    an aten op whose schema mutates nothing (``aten.copy_`` and the like stay)."""
    if node.op == "get_attr" or is_metadata_helper(node):
        return True
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and not target._schema.is_mutable)


def _between(anchor: Node, stop: Node) -> list[Node]:
    """The nodes after ``anchor`` and before ``stop``, in graph order."""
    nodes, node = [], anchor.next
    while node is not stop:
        nodes.append(node)
        node = node.next
    return nodes


def _move_after(node: Node, anchor: Node) -> None:
    """Move ``node`` (and what reads it, transitively) after ``anchor`` when it comes before:
    a metadata read moved to a new node must follow it."""
    position = anchor
    while position.op != "root":  # walk back to find out whether node precedes anchor
        position = position.prev
        if position is node:
            break
    else:
        return  # node already comes after anchor
    moved, order, current = {node}, [node], node.next
    while current is not anchor:
        if any(arg in moved for arg in current.all_input_nodes):
            moved.add(current)
            order.append(current)
        current = current.next
    cursor = anchor
    for item in order:
        cursor.append(item)
        cursor = item


def _same_metadata_root(node: Node, doomed: set[Node], roots: Sequence[Node]) -> Node | None:
    """The root that ``node`` reaches through elementwise, shape-keeping ops only (so the two
    have the same shape, dtype and device on every input), or None."""
    current = node
    while current not in roots:
        readers = [u for u in current.users if u in doomed]
        if len(readers) != 1 or not _keeps_shape(current, readers[0]):
            return None
        current = readers[0]
    return current


def _keeps_shape(source: Node, user: Node) -> bool:
    """True when ``user`` maps ``source`` to a tensor of the same shape whatever the input
    size: an elementwise op whose other tensor operands have ``source``'s recorded shape
    (BN, scale, bias, activations, sums of branches), or a stride-1 conv/pool that pads
    ``d(k − 1)/2`` and keeps the channel count."""
    shape = shape_of(source)
    if shape is None or shape_of(user) != shape:
        return False
    gm = user.graph.owning_module
    step = lift(gm, user)
    if isinstance(step, LinearStep) and step.input is source:
        kernel = step.shape_kernel
        return kernel.in_channels == kernel.out_channels and all(
            s == 1 and 2 * p == d * (k - 1) for s, p, d, k in zip(
                kernel.stride, kernel.padding, kernel.dilation, kernel.kernel_size,
                strict=True))
    operands = [a for a in user.all_input_nodes if a is not source and a.op != "get_attr"]
    return _elementwise(gm, user) and all(shape_of(a) == shape for a in operands)


def _elementwise(gm: GraphModule, node: Node) -> bool:
    """A BN, per-channel scale/bias, arithmetic or activation: each output element is computed
    from the elements at the same position."""
    if affine_op(gm, node) is not None or arith_kind(node) is not None:
        return True
    found = classify(gm, node)
    return found is not None and found[1][0] == "activation"


def _same_shape(old: Node, new: Node) -> bool:
    before = shape_of(old)
    return before is not None and before == shape_of(new)


def _path_exists(gm: GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


def _users_first(nodes: list[Node]) -> list[Node]:
    """Order a rewrite's few nodes so each comes after every node that reads it.

    Quadratic in the pattern size (a handful of nodes), independent of the graph size.
    """
    pending, ordered = list(nodes), []
    while pending:
        ready = next((n for n in pending if all(u in ordered for u in n.users)), None)
        if ready is None:
            raise GraphInvariantError(f"cycle among {[n.format_node() for n in pending]}")
        pending.remove(ready)
        ordered.append(ready)
    return ordered


def _merge_paths(groups: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for group in groups for p in group))


def _neighbourhood(node: Node) -> list[Node]:
    """Nodes whose candidacy may change after ``node`` appears: itself, its inputs and users,
    the other readers of its inputs, and the other inputs of its users."""
    near = [node, *node.all_input_nodes, *node.users]
    for producer in node.all_input_nodes:
        near.extend(producer.users)
    for user in node.users:
        near.extend(user.all_input_nodes)
    return near


@gc_paused()
def run_passes(gm: GraphModule, passes: Sequence[Pass]) -> PassResult:
    """Apply ``passes`` to ``gm`` in place until none applies; return what happened.

    Every node is visited once in graph order; a rewrite puts the new node's neighbourhood back
    on the worklist. At each node the passes are tried in the given order and the first rewrite
    wins. Declines are kept for the nodes that remain in the final graph.
    """
    _drop_unused_attr_nodes(gm)
    rewriter = Rewriter(gm)
    worklist = deque(gm.graph.nodes)
    queued = rewriter.pending
    queued.update(worklist)
    declines: dict[tuple[str, Node], Decline] = {}
    while worklist:
        node = worklist.popleft()
        queued.discard(node)
        if rewriter.is_erased(node):
            continue
        for pass_ in passes:
            declines.pop((pass_.name, node), None)  # a revisit replaces an earlier verdict
            outcome = _visit(pass_, node, rewriter)
            if isinstance(outcome, Decline):
                declines[(pass_.name, node)] = outcome
            elif isinstance(outcome, Rewrite):
                for changed in rewriter.touched:
                    for near in _neighbourhood(changed):
                        if near not in queued:
                            worklist.append(near)
                            queued.add(near)
                rewriter.touched.clear()
                break
    finish_graph(gm)
    kept = list({
        (d.pass_name, d.node, d.reason): d
        for (_, node), d in declines.items() if not rewriter.is_erased(node)
    }.values())  # a pass may decline one root from several anchors
    result = PassResult(tuple(p.name for p in passes), rewriter.rewrites, kept)
    _record_history(gm, result)
    return result


def _visit(pass_: Pass, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
    """``pass_.visit``, with a refused rewrite as a decline, and an exception raised while
    examining the candidate as a decline plus a :class:`PassBugWarning` (unless
    ``REPFUSE_STRICT_PASSES`` is set): one candidate a pass gets wrong must not take the rest
    of the model down. An exception in the middle of changing the graph is re-raised: the
    graph may be half rewritten."""
    try:
        return pass_.visit(node, rewriter)
    except RewriteRefused as refused:
        return pass_.decline(node, str(refused))
    except Exception as exc:
        if rewriter.mutating:
            raise GraphInvariantError(
                f"{pass_.name} failed while rewriting {node.format_node()}: "
                f"{type(exc).__name__}: {exc}") from exc
        if _strict():
            raise
        message = first_line(exc)
        label = describe(node, rewriter.gm)
        warnings.warn(f"repfuse bug: {pass_.name} failed while examining {label} ({message}); "
                      "the candidate is left as it was", PassBugWarning, stacklevel=2)
        return pass_.decline(node, f"internal error of {pass_.name} (a repfuse bug, please "
                                   f"report it): {message}")


def _drop_unused_attr_nodes(gm: GraphModule) -> None:
    """Erase ``get_attr`` nodes nobody reads (exported graphs read e.g. ``num_batches_tracked``).
    """
    for node in list(gm.graph.find_nodes(op="get_attr")):
        if not node.users:
            gm.graph.erase_node(node)


def finish_graph(gm: GraphModule) -> None:
    """Lint, drop modules and tensors nothing reads any more, regenerate code (reaching
    submodules through ``_modules``: see :class:`repfuse.graph.DirectModuleAccess`)."""
    _drop_unused_attr_nodes(gm)
    gm.graph.lint()
    _drop_unused_modules(gm)
    _drop_unread_tensors(gm)
    use_direct_module_access(gm)
    gm.recompile()


def _drop_unused_modules(gm: GraphModule) -> None:
    """Delete the submodules no node calls or reads from, in time linear in the model.

    What ``GraphModule.delete_all_unused_submodules`` does, whose membership test scans a list
    (quadratic: minutes for a network of thousands of blocks).
    """
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        parts = node.target.split(".")
        used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        if node.op == "call_module":
            called = gm.get_submodule(node.target)
            used.update(name for name, _ in called.named_modules(prefix=node.target))
    for name, _ in list(gm.named_modules()):
        parent = name.rpartition(".")[0]
        if name and name not in used and (not parent or parent in used):
            gm.delete_submodule(name)  # its own submodules go with it


def _drop_unread_tensors(gm: GraphModule) -> None:
    """Delete parameters/buffers of modules that are never called and whose tensors are unread.

    Functional layers read weights with ``get_attr``; once folded, those weights would otherwise
    linger in the state dict of the fused model.
    """
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    named = list(gm.named_parameters(remove_duplicate=False))
    named += list(gm.named_buffers(remove_duplicate=False))
    for full_name, _ in named:
        owner, _, attr = full_name.rpartition(".")
        if full_name in read or _inside_any(owner, called):
            continue
        module = gm.get_submodule(owner) if owner else gm
        if attr in module._parameters:
            del module._parameters[attr]
        elif attr in module._buffers:
            del module._buffers[attr]


def _inside_any(path: str, modules: set[str]) -> bool:
    """True when ``path`` is one of ``modules`` or nested inside one of them."""
    parts = path.split(".") if path else []
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts) + 1))


HISTORY_ATTR = "_repfuse_history"


def _record_history(gm: GraphModule, result: PassResult) -> None:
    """Keep the history in ``gm.meta`` (survives deepcopy) and in an attribute of ``gm``
    (survives ``torch.save``, whose loader rebuilds ``meta`` empty but restores attributes);
    registered as a preserved attribute, so a deep copy gets the attribute back too."""
    existing = gm.meta.get(META_KEY) or getattr(gm, HISTORY_ATTR, None)
    if existing is None:
        existing = PassResult(result.passes, list(result.rewrites), list(result.declined))
    else:
        existing.extend(result)
    existing.node_names = tuple(n.name for n in gm.graph.nodes)
    gm.meta[META_KEY] = existing
    gm.meta.setdefault("_user_preserved_attributes", {})[HISTORY_ATTR] = existing
    setattr(gm, HISTORY_ATTR, existing)


def history(gm: nn.Module) -> PassResult:
    """Everything repfuse did to ``gm`` so far (empty if nothing); ``gm`` may also be a
    partially captured model, whose fused parts are GraphModules."""
    meta = getattr(gm, "meta", None) or {}
    return meta.get(META_KEY) or getattr(gm, HISTORY_ATTR, None) or PassResult(())
