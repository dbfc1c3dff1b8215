"""Exact pruning: remove channels and attention heads that are constant or that nobody reads.

After sparsity training (network slimming's L1 on BN γ, group lasso, head pruning) many
channels are exactly zero or constant. ``prune_dead`` removes them from the graph with the
function unchanged:

- an output channel of a conv/linear whose filter is all zero (after the BN folds: γ = 0) is
  its bias ``b``, the same everywhere; after the pointwise ops that follow it, ``f(b)``. It is
  removed from the producer and folded into each reader's bias
  (:func:`repfuse.channels.conv_of_constant`): exact for a linear layer, a conv that does not
  pad with zeros, and after a global pool. A zero-padded k×k reader sees 0 at the border where
  the unpruned model sees ``f(b)``: such a channel stays, with that reason (unless ``f(b) = 0``);
- an input channel that a reader ignores (an all-zero weight column) goes if every reader
  ignores it (or can fold it), whatever its value;
- channels are removed as *dependency groups* (:mod:`repfuse.passes.channel_groups`): a channel
  of a residual add goes only if it goes in every addend; concatenation shifts offsets;
  grouped and depthwise convs lose whole groups; ``split``/``chunk`` pieces and ``x[:, a:b]``
  slices shrink; BN, scale and PReLU on the way are sliced;
- attention heads: a head whose value projection (or its slice of the output projection) is
  all zero is removed from the Q/K/V and output projections, in the explicit q/k/v-Linear form
  (through ``softmax(q kᵀ) v`` or ``scaled_dot_product_attention``) and in
  ``nn.MultiheadAttention``, which becomes its explicit form with fewer heads. A value that is
  the same for every token passes the attention unchanged (the softmax rows sum to one), so a
  head with a zero value filter and a non-zero value bias folds into the output bias.

Subnormal weights and biases are flushed to zero first (they are far below the rounding of any
sum they take part in, and slow on CPUs). ``prune_below`` (opt-in, approximate, never in the
default pipeline) sets BN γ (or whole filters) below a threshold to zero, so that
``prune_dead`` then removes those channels; :func:`prune_below` measures the error that costs.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from repfuse.channels import flush_subnormals, slice_layer, subnormal_count
from repfuse.cost import NodeCost, nodes_cost
from repfuse.errors import RepfuseError
from repfuse.graph import (
    LayerView,
    batchnorm_view,
    bind_args,
    describe,
    fetch_attr,
    layer_view,
    meta_with_size,
    shape_of,
)
from repfuse.passes.base import Decline, Pass, Rewrite, Rewriter
from repfuse.passes.channel_groups import (
    GroupedConv,
    Layer,
    Layout,
    Live,
    MatMul,
    Piece,
    Pointwise,
    Region,
    Reshape,
    Slots,
    Values,
    compute_values,
    dense_layer,
    explore,
    flat_size,
    graph_order,
    rule_for,
    split_sizes,
    weight_all_normal,
    weight_fact,
)

# --- seeds: where a visit starts looking ------------------------------------------------------


@dataclass(frozen=True)
class _Seed:
    """Channels that look removable: ``channels`` of tensor ``start`` (laid out as ``layout``),
    named by ``label`` ("channel {c} of 'conv'" or "input channel {c} of 'conv'")."""

    start: Node
    layout: Layout
    channels: tuple[int, ...]
    label: str  # "channel {c} of 'conv'" with {c} to fill


# A rebuilt layer's node keeps, under this meta key, the original number of each of its output
# channels, so that a later decline names channels as the user's model numbers them.
CHANNELS_KEY = "repfuse_channels"


def original_channels(node: Node, count: int) -> list[int]:
    """The original numbers of ``node``'s ``count`` output channels."""
    recorded = node.meta.get(CHANNELS_KEY)
    return list(recorded) if recorded is not None and len(recorded) == count else list(
        range(count))


def _seeds(gm: GraphModule, node: Node) -> list[_Seed]:
    layer = dense_layer(gm, node)
    if layer is not None and weight_all_normal(layer.view.weight):
        return []  # no zero weight: no dead filter, no ignored column (the common case)
    if layer is not None:
        seeds = []
        rows = layer.zero_rows()
        if bool(rows.any()):
            seeds.append(_Seed(node, ((layer.out_axis, layer.view.out_channels),),
                               tuple(rows.nonzero().flatten().tolist()),
                               f"channel {{c}} of {describe(node, gm)}"))
        columns = layer.zero_columns()
        if bool(columns.any()):
            seeds.append(_Seed(layer.view.input, ((layer.in_axis, layer.view.in_channels),),
                               tuple(columns.nonzero().flatten().tolist()),
                               f"input channel {{c}} of {describe(node, gm)}"))
        return seeds
    rule = rule_for(gm, node)
    if isinstance(rule, GroupedConv) and not weight_all_normal(rule.layer.weight):
        rows = Layer(node, rule.layer).zero_rows()
        if bool(rows.any()):
            return [_Seed(node, ((1, rule.layer.out_channels),),
                          tuple(rows.nonzero().flatten().tolist()),
                          f"channel {{c}} of {describe(node, gm)}")]
    if isinstance(rule, Pointwise) and rule.kind == "affine":
        bn = batchnorm_view(gm, node)
        shape = shape_of(node)
        if bn is not None and bn.weight is not None and shape is not None and len(shape) >= 2:
            zero = bn.weight.detach().eq(0).cpu()
            if bool(zero.any()):
                return [_Seed(node, ((1, shape[1]),), tuple(zero.nonzero().flatten().tolist()),
                              f"channel {{c}} of {describe(node, gm)} (γ = 0)")]
    return []


# --- verdicts: which channel classes can go ---------------------------------------------------


class _Block:
    """Why a class of channels stays: a sentence completing "channel c of X ...", written
    only when a decline needs it (most blocked classes never are)."""

    def __init__(self, text: str | Callable[[], str], joined: bool = False,
                 value: float | None = None) -> None:
        self._text = text
        self.joined = joined  # the channel met a live one at a join: the clearest reason
        self.value = value  # the channel's constant, for "{constant}" in the text

    @property
    def text(self) -> str:
        if callable(self._text):
            self._text = self._text()
        return self._text


@dataclass
class _Plan:
    region: Region
    order: dict[Node, int]  # graph order, for the rewrite that follows at once
    values: dict[Node, Values]
    classes: dict[Node, list[int]]  # member -> class of each flat channel
    removable: set[int]
    blocked: dict[int, _Block]


def _analyze(gm: GraphModule, rewriter: Rewriter, seed: _Seed, multiple_of: int = 1
             ) -> _Plan | str:
    region = explore(gm, seed.start, seed.layout)
    if region.failure is not None:
        return region.failure
    slots = Slots(region)
    for rule in region.rules.values():
        for link in rule.links(region.layouts):
            slots.union_many(*link)
    order = graph_order(gm)
    values = compute_values(region, order)
    classes = {n: slots.classes_of(n, flat_size(lay)) for n, lay in region.layouts.items()}
    blocked: dict[int, _Block] = {}

    def block_all(node: Node, text: str) -> None:
        for k in classes[node]:
            blocked.setdefault(k, _Block(text))

    for keep in region.keep:
        block_all(keep.node, f"{{must}} stay: {keep.reason}")
    _block_shared(gm, rewriter, region, block_all)
    interesting: set[int] = set()
    for node, value in values.items():
        for c, const in enumerate(value.const.tolist()):
            if const:
                interesting.add(classes[node][c])
    for reader in region.readers.values():
        _judge_reader(gm, reader, values, classes, blocked, interesting)
    removable = interesting - set(blocked)
    plan = _Plan(region, order, values, classes, removable, blocked)
    if multiple_of > 1:
        _align_widths(gm, plan, multiple_of)
    _keep_shapes_valid(gm, plan)
    return plan


def _block_shared(gm: GraphModule, rewriter: Rewriter, region: Region, block_all) -> None:
    """Layers and modules whose weights we would slice must be used only here."""
    for node, layer in [*region.producers.items(), *region.readers.items()]:
        reason = rewriter.index.shared_reason(gm, layer.view)
        if reason is not None:
            if node in region.layouts:
                block_all(node, f"{{must}} stay: {reason}")
            if layer.view.input in region.layouts and node in region.readers:
                block_all(layer.view.input, f"{{must}} stay: {reason}")
    for node, rule in region.rules.items():
        reason = None
        if isinstance(rule, GroupedConv):
            reason = rewriter.index.shared_reason(gm, rule.layer)
        elif node.op == "call_module" and rewriter.index.module_sites[node.target] > 1 and (
                _sliced_module(gm.get_submodule(node.target), None) is not None):
            # its per-channel parameters would be cut for the other calls too
            reason = f"{describe(node, gm)} is called at several sites"
        if reason is not None:
            block_all(node, f"{{must}} stay: {reason}")


def _judge_reader(gm, reader: Layer, values, classes, blocked, interesting) -> None:
    data = reader.view.input
    seen = values[data]
    ignored = reader.zero_columns()
    pads = reader.view.pads_with_zeros() or reader.transposed
    name = describe(reader.node, gm)
    for c, k in enumerate(classes[data]):
        if ignored[c]:
            interesting.add(k)
            continue
        if not seen.const[c]:
            why = seen.why[c]
            joined = why is not None and why.via is not None
            if k not in blocked or (joined and not blocked[k].joined):
                blocked[k] = _Block(lambda why=why: _live_text(gm, reader.node, why), joined)
            continue
        value = float(seen.value[c])
        if value != 0 and pads:
            kind = "transposed conv" if reader.transposed else (
                "x".join(str(s) for s in reader.view.kernel_size) + " conv")
            blocked.setdefault(k, _Block(
                f"{{is}} {{constant}} where {name} reads {{it}}, but {name} is a zero-padded "
                f"{kind}: at the border it reads the padding's 0, not the constant",
                value=value))


def _live_text(gm: GraphModule, reader: Node, why: Live | None) -> str:
    if why is None:
        return f"{{varies}} where {describe(reader, gm)} reads {{it}}"
    origin = describe(why.origin, gm)
    if why.via is not None:
        via = why.via
        join = "residual add" if _is_add(via) else "op"
        if why.note:
            return f"{{is}} read by the {join} {describe(via, gm)}, where {why.note}"
        return f"{{is}} read by the {join} {describe(via, gm)}, and {{is}} live in {origin}"
    if why.note:
        return f"{{varies}} where {describe(reader, gm)} reads {{it}}: {why.note}"
    return f"{{is}} live in {origin} where {describe(reader, gm)} reads {{it}}"


def _is_add(node: Node) -> bool:
    return (node.op == "call_function" and getattr(node.target, "__name__", "") in (
        "add", "iadd")) or (node.op == "call_method" and node.target == "add")


def _align_widths(gm: GraphModule, plan: _Plan, multiple: int) -> None:
    """Keep some removable channels so that every tensor of the region keeps a multiple of
    ``multiple`` channels (its original width if rounding up would reach it).

    Keeping a channel is always exact. It can pay: onnxruntime's CPU convs work on blocks of
    8 or 16 channels, and a conv of 49 channels runs about as slow as one of 64.
    """
    region = plan.region
    # the tensors conv/linear layers write and read (not, e.g., a tensor of 4 attention heads)
    widths = [*region.producers, *(r.view.input for r in region.readers.values())]
    changed = True
    while changed:
        changed = False
        for node in dict.fromkeys(widths):
            classes = plan.classes[node]
            gone = [k for k in classes if k in plan.removable]
            if not gone:
                continue
            width = len(classes)
            kept = width - len(gone)
            target = min(width, -(-kept // multiple) * multiple)
            for k in dict.fromkeys(gone):
                if kept >= target:
                    break
                plan.removable.discard(k)
                plan.blocked.setdefault(k, _Block(
                    f"{{stays}}: kept so that {describe(node, gm)} keeps a multiple of "
                    f"{multiple} channels (faster kernels)"))
                kept += classes.count(k)
                changed = True


def _keep_shapes_valid(gm: GraphModule, plan: _Plan) -> None:
    """Never empty a tensor; on a tensor with several channel axes (heads × head size), remove
    whole slices of one axis only."""
    changed = True
    while changed:
        changed = False
        for node, layout in plan.region.layouts.items():
            classes = plan.classes[node]
            mask = torch.tensor([k in plan.removable for k in classes], dtype=torch.bool)
            if not bool(mask.any()):
                continue
            if bool(mask.all()):
                kept = classes[0]
                plan.removable.discard(kept)
                plan.blocked.setdefault(kept, _Block(
                    f"{{stays}}: removing it too would leave {describe(node, gm)} without "
                    "channels"))
                changed = True
                continue
            if len(layout) > 1 and _reduced_axis(mask, layout) is None:
                for k in set(classes) & plan.removable:
                    plan.removable.discard(k)
                    plan.blocked.setdefault(k, _Block(
                        f"{{stays}}: it is part of a head of {describe(node, gm)} whose other "
                        "channels are live"))
                changed = True


def _reduced_axis(mask: Tensor, layout: Layout) -> tuple[int, Tensor] | None:
    """``(position in layout, removed indices along it)`` when ``mask`` removes whole slices
    along exactly one layout axis; None otherwise."""
    sizes = [s for _, s in layout]
    grid = mask.reshape(sizes)
    for position in range(len(sizes)):
        others = [d for d in range(len(sizes)) if d != position]
        removed_all = grid.all(dim=others) if others else grid
        removed_any = grid.any(dim=others) if others else grid
        if bool((removed_all == removed_any).all()):
            rebuilt = removed_all.reshape([sizes[position] if d == position else 1
                                           for d in range(len(sizes))]).expand(sizes)
            if bool((rebuilt == grid).all()):
                return position, removed_all
    return None


def _decline_text(gm: GraphModule, seed: _Seed, plan: _Plan) -> str | None:
    """One sentence per reason (the first few), naming the seed's channels."""
    classes = plan.classes.get(seed.start)
    if classes is None:
        return None
    by_reason: dict[str, list[tuple[int, float | None]]] = {}
    for c in seed.channels:
        k = classes[c]
        if k in plan.removable:
            continue
        block = plan.blocked.get(k)
        text = block.text if block is not None else "{stays}: nothing reads {it} as a constant"
        by_reason.setdefault(text, []).append((c, None if block is None else block.value))
    if not by_reason:
        return None
    sentences = []
    for text, found in list(by_reason.items())[:3]:
        channels = [c for c, _ in found]
        label = _seed_label(seed, channels)
        plural = len(channels) > 1
        for token, (one, many) in _VERBS.items():
            text = text.replace(token, many if plural else one)
        values = [f"{v:.6g}" for _, v in found if v is not None]
        if plural:
            shown = ", ".join(values[:8]) + (", ..." if len(values) > 8 else "")
            text = text.replace("{constant}", f"constants ({shown})")
        elif values:
            text = text.replace("{constant}", f"the constant {values[0]}")
        sentences.append(f"{label} {text}")
    more = len(by_reason) - 3
    if more > 0:
        sentences.append(f"and {more} more reason{'s' if more > 1 else ''}")
    return "; ".join(sentences)


def _seed_label(seed: _Seed, channels: Sequence[int]) -> str:
    """"channel 3 of 'conv'" / "channels 3, 7 of 'conv'", numbered as in the user's model."""
    names = original_channels(seed.start, flat_size(seed.layout))
    label = seed.label.format(c=_channel_list([names[c] for c in channels]))
    return label.replace("channel ", "channels ", 1) if len(channels) > 1 else label


def _stays(seed: _Seed, reason: str) -> str:
    verb = "stays" if len(seed.channels) == 1 else "stay"
    return f"{_seed_label(seed, seed.channels)} {verb}: {reason}"


# Verbs of the decline sentences, singular and plural ("channel 3 ... is", "channels ... are").
_VERBS = {"{is}": ("is", "are"), "{varies}": ("varies", "vary"), "{stays}": ("stays", "stay"),
          "{must}": ("must", "must"), "{it}": ("it", "them")}


def _channel_list(channels: list[int]) -> str:
    shown = ", ".join(str(c) for c in channels[:8])
    return shown + (f" (+{len(channels) - 8} more)" if len(channels) > 8 else "")


# --- rebuilding the region without the removed channels ---------------------------------------


def _new_shape_meta(node: Node, layout: Layout, removed: Tensor) -> Any:
    meta = node.meta.get("tensor_meta")
    if len(layout) == 1:
        return meta_with_size(meta, layout[0][0], int((~removed).sum()))
    position, along = _reduced_axis(removed, layout)
    axis, size = layout[position]
    return meta_with_size(meta, axis, size - int(along.sum()))


def _rebuild(pass_name: str, gm: GraphModule, rewriter: Rewriter, plan: _Plan,
             exact: bool = True) -> Rewrite | str:
    """Remove the plan's channels everywhere at once (one recorded rewrite), or say why an op
    on the way cannot be rewritten (then nothing changes)."""
    region = plan.region
    removed = {n: torch.tensor([k in plan.removable for k in plan.classes[n]], dtype=torch.bool)
               for n in region.layouts}
    metas = {n: _new_shape_meta(n, region.layouts[n], mask) for n, mask in removed.items()
             if bool(mask.any())}
    builders: dict[Node, Any] = {}
    notes: list[str] = []
    layers: dict[Node, Layer] = {**region.producers}
    for node, layer in region.readers.items():
        layers.setdefault(node, layer)
    for node, layer in layers.items():
        built = _layer_builder(gm, rewriter, layer, removed, plan.values, metas, notes)
        if built is not None:
            builders[node] = built
    for node, rule in region.rules.items():
        if node not in metas and not isinstance(rule, GroupedConv):
            continue
        built = _rule_builder(gm, rewriter, rule, removed, metas, plan, notes)
        if isinstance(built, str):
            return built
        if built is not None:
            builders[node] = built
    resized = {}
    for split in region.splits:
        built = _split_builder(gm, split, removed, metas)
        if callable(built):
            builders[split] = built
        elif built is not None:
            resized[split] = built  # unbind: the call stays, its pieces shrink
    changes = sorted(builders.items(), key=lambda item: plan.order[item[0]])
    resized.update({n: meta for n, meta in metas.items() if n not in builders})
    count = int(sum(int(mask.sum()) for n, mask in removed.items() if n in region.producers))
    detail = f"removed {'; '.join(notes)}" if notes else f"removed {count} channels"
    return rewriter.replace_many(pass_name, changes=changes, resized=resized, detail=detail,
                                 exact=exact)


def _layer_builder(gm, rewriter, layer: Layer, removed, values, metas, notes):
    view = layer.view
    out_removed = removed.get(layer.node)
    in_removed = removed.get(view.input)
    if out_removed is None:
        out_removed = torch.zeros(view.out_channels, dtype=torch.bool)
    if in_removed is None:
        in_removed = torch.zeros(view.in_channels, dtype=torch.bool)
    if not bool(out_removed.any()) and not bool(in_removed.any()):
        return None
    constants = values[view.input].value if view.input in values else None
    if constants is not None:
        # an ignored column contributes nothing, whatever its channel holds
        folds = in_removed & values[view.input].const & ~layer.zero_columns()
        constants = torch.where(folds, constants, torch.zeros((), dtype=constants.dtype))
    weight, bias, groups = slice_layer(view.weight, view.bias, ~out_removed, ~in_removed,
                                       groups=view.groups, transposed=layer.transposed,
                                       constants=constants)
    name = describe(layer.node, gm)
    names = original_channels(layer.node, view.out_channels)
    if bool(out_removed.any()):
        gone = [names[c] for c in out_removed.nonzero().flatten().tolist()]
        notes.append(f"{_count(len(gone), 'output channel')} of {name} [{_channel_list(gone)}]")
    if bool(in_removed.any()):
        folded = constants is not None and bool(constants.ne(0).any())
        notes.append(f"{_count(int(in_removed.sum()), 'input channel')} of {name}"
                     + (" (constants folded into its bias)" if folded else ""))
    meta = metas.get(layer.node, layer.node.meta.get("tensor_meta"))
    kept = [c for c, gone in zip(names, out_removed.tolist(), strict=True) if not gone]
    return _module_builder(gm, rewriter, layer.node, view, weight, bias, groups, meta, kept)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _module_builder(gm, rewriter, old: Node, view: LayerView, weight, bias, groups, meta,
                    channels: list[int]):
    module = replace(view, weight=weight, groups=groups).build(weight, bias)
    path = view.module_path or view.origin_paths()[0]
    return _call_builder(gm, rewriter, old, path, module, view.input, meta, channels)


def _call_builder(gm, rewriter, old: Node, path: str, module: nn.Module, data: Node, meta,
                  channels: list[int] | None = None):
    """A builder of the call of ``module`` (placed at ``path``) in place of ``old``, on
    ``old``'s data input ``data``."""
    # Where the data input is (addmm(b, x, Wᵀ) has the bias first), found now; read when
    # built, once ``old.args`` name the nodes that replace the earlier ones.
    position = next((i for i, a in enumerate(old.args) if a is data), None)

    def build() -> Node:
        target = rewriter.place_module(path, module, [old])
        current = old.args[position] if position is not None else old.kwargs["input"]
        new = gm.graph.call_module(target, (current,))
        new.meta["tensor_meta"] = meta
        if channels is not None:
            new.meta[CHANNELS_KEY] = channels
        return new

    return build


def _rule_builder(gm, rewriter, rule, removed, metas, plan: _Plan, notes):
    node = rule.node
    meta = metas.get(node, node.meta.get("tensor_meta"))
    if isinstance(rule, GroupedConv):
        out_removed = removed[node]
        in_removed = removed[rule.layer.input]
        if not bool(out_removed.any()):
            return None
        weight, bias, groups = slice_layer(rule.layer.weight, rule.layer.bias, ~out_removed,
                                           ~in_removed, groups=rule.layer.groups)
        notes.append(f"{_count(rule.layer.groups - groups, 'group')} of {describe(node, gm)}")
        names = original_channels(node, rule.layer.out_channels)
        kept = [c for c, gone in zip(names, out_removed.tolist(), strict=True) if not gone]
        return _module_builder(gm, rewriter, node, rule.layer, weight, bias, groups, meta, kept)
    if isinstance(rule, Pointwise) and rule.kind in ("affine", "unary"):
        return _sliced_params_builder(gm, rewriter, rule, removed, meta,
                                      plan.region.layouts[node])
    if isinstance(rule, Reshape):
        return _reshape_builder(gm, rewriter, rule, meta)
    if isinstance(rule, Piece) and rule.split is None and rule.length > 0:
        return _slice_builder(gm, rule, removed, meta, plan)
    if isinstance(rule, MatMul) and node in removed and bool(removed[node].any()):
        layout = plan.region.layouts[node]
        _, heads = _reduced_axis(removed[node], layout) if len(layout) > 1 else (
            0, removed[node])
        notes.append(f"heads [{_channel_list(heads.nonzero().flatten().tolist())}] of "
                     f"{describe(node, gm)}")
    return None


def _sliced_params_builder(gm, rewriter, rule: Pointwise, removed, meta, layout: Layout):
    """BN, PReLU, or arithmetic with a per-channel constant: the same op on kept channels."""
    node = rule.node
    keep = ~removed[node]
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        sliced = _sliced_module(module, keep)
        if sliced is None:
            return None
        return _call_builder(gm, rewriter, node, node.target, sliced, node.args[0], meta)
    attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
    if not attrs:
        return None
    is_bn = node.target in (F.batch_norm, torch.ops.aten.batch_norm.default)
    replacements: dict[Node, Tensor] = {}
    for attr in attrs:
        value = fetch_attr(gm, attr.target)
        if not isinstance(value, Tensor):
            continue
        if is_bn:
            if value.dim() == 1 and value.shape[0] == len(keep):
                replacements[attr] = value.detach()[keep.to(value.device)]
            continue
        sliced = _slice_broadcast(value, keep, layout, len(shape_of(node)))
        if sliced is not None:
            replacements[attr] = sliced
    if not replacements:
        return None

    def build_function() -> Node:
        mapping = {}
        for attr, value in replacements.items():
            is_param = isinstance(fetch_attr(gm, attr.target), nn.Parameter)
            target = rewriter.add_constant(value.clone(), parameter=is_param)
            mapping[attr] = gm.graph.get_attr(target)
        args = torch.fx.node.map_arg(node.args, lambda n: mapping.get(n, n))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: mapping.get(n, n))
        new = gm.graph.create_node(node.op, node.target, args, kwargs)
        new.meta["tensor_meta"] = meta
        return new

    return build_function


def _slice_broadcast(value: Tensor, keep: Tensor, layout: Layout, rank: int) -> Tensor | None:
    """A constant broadcast (right-aligned) against a tensor of ``rank`` axes whose channels
    lie on ``layout``'s one axis, restricted to the kept channels; None if it has one entry
    along that axis."""
    axis = layout[0][0] - (rank - value.dim())
    if axis < 0 or value.shape[axis] == 1:
        return None
    return value.detach().index_select(axis, keep.nonzero().flatten().to(value.device))


def _sliced_module(module: nn.Module, keep: Tensor | None) -> nn.Module | None:
    """A copy of a BN or PReLU module holding only the kept channels (None: nothing to slice;
    with ``keep`` None, ``module`` itself when it has per-channel parameters)."""
    if keep is None:
        per_channel = isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(module, nn.PReLU) and module.num_parameters > 1)
        return module if per_channel else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = copy.deepcopy(module)
        new.num_features = int(keep.sum())
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(module, name)
            if tensor is None:
                continue
            sliced = tensor.detach()[keep.to(tensor.device)].clone()
            if isinstance(tensor, nn.Parameter):
                setattr(new, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
            else:
                setattr(new, name, sliced)
        return new
    if isinstance(module, nn.PReLU) and module.num_parameters == len(keep) > 1:
        new = copy.deepcopy(module)
        new.num_parameters = int(keep.sum())
        new.weight = nn.Parameter(module.weight.detach()[keep.to(module.weight.device)].clone(),
                                  requires_grad=module.weight.requires_grad)
        return new
    return None


def _reshape_builder(gm, rewriter, rule: Reshape, meta):
    """view/reshape/unflatten with explicit sizes: the sizes of shrunk axes change."""
    node = rule.node
    old_shape = shape_of(node)
    new_shape = tuple(meta.shape)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Unflatten):
            dim = module.dim % len(old_shape)
            sizes = tuple(new_shape[dim:dim + len(module.unflattened_size)])
            return _call_builder(gm, rewriter, node, node.target,
                                 nn.Unflatten(module.dim, sizes), node.args[0], meta)
        return None
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if name not in ("view", "reshape", "unflatten"):
        return None

    def resized(sizes: Sequence[Any], first_axis: int) -> list[Any]:
        out = list(sizes)
        for i, size in enumerate(out):
            axis = first_axis + i
            if old_shape[axis] != new_shape[axis] and size != -1:
                out[i] = new_shape[axis]
        return out

    # Where the sizes are, checked now: a builder must not fail halfway through a rewrite.
    args = node.args
    if node.kwargs:
        return f"{describe(node, gm)} takes its sizes as keywords"
    if name == "unflatten":
        source_rank = len(shape_of(rule.source))
        if len(args) != 3 or not isinstance(args[1], int) or not isinstance(
                args[2], (list, tuple)):
            return f"{describe(node, gm)} unflattens along a computed axis"
        first, position = args[1] % source_rank, 2
    elif len(args) == 2 and isinstance(args[1], (list, tuple)):
        first, position = 0, 1
    else:
        first, position = 0, None
    count = len(args[position]) if position is not None else len(args) - 1
    if name != "unflatten" and count != len(new_shape):
        return f"{describe(node, gm)} takes its shape as one computed value"

    def build_reshape() -> Node:
        new_args = list(node.args)
        if position is None:
            new_args[1:] = resized(new_args[1:], first)
        else:
            new_args[position] = type(new_args[position])(resized(new_args[position], first))
        new = gm.graph.create_node(node.op, node.target, tuple(new_args), dict(node.kwargs))
        new.meta["tensor_meta"] = meta
        return new

    return build_reshape


def _slice_builder(gm, rule: Piece, removed, meta, plan: _Plan):
    """``x[:, a:b]`` along the channel axis: the bounds count kept channels only."""
    source_removed = removed.get(rule.source)
    if source_removed is None or not bool(source_removed.any()):
        return None
    node = rule.node
    kept = ~source_removed
    start = int(kept[:rule.start].sum())
    stop = int(kept[:rule.start + rule.length].sum())

    def build() -> Node:
        source, index = node.args
        items = list(index)
        items[rule.dim] = slice(start, stop, None)
        new = gm.graph.call_function(node.target, (source, tuple(items)))
        new.meta["tensor_meta"] = meta
        return new

    return build


def _split_builder(gm, split: Node, removed, metas):
    found = split_sizes(split)
    if found is None:
        return None
    source, dim, sizes = found
    if not sizes:  # unbind: the pieces shrink, the call stays; its metadata is theirs
        pieces = sorted(split.users, key=lambda u: u.args[1])
        if not any(u in metas for u in pieces):
            return None
        return tuple(metas.get(u, u.meta.get("tensor_meta")) for u in pieces)
    source_removed = removed.get(source)
    if source_removed is None or not bool(source_removed.any()) or len(
            source_removed) != sum(sizes):
        return None
    new_sizes, start = [], 0
    for size in sizes:
        new_sizes.append(int((~source_removed[start:start + size]).sum()))
        start += size
    old_metas = split.meta["tensor_meta"]
    new_meta = tuple(meta_with_size(m, dim, s) for m, s in zip(old_metas, new_sizes,
                                                               strict=True))

    def build() -> Node:
        data = split.args[0] if split.args else split.kwargs.get("tensor",
                                                                  split.kwargs.get("input"))
        new = gm.graph.call_function(torch.split, (data, new_sizes, dim))
        new.meta["tensor_meta"] = new_meta
        return new

    return build


# --- nn.MultiheadAttention ----------------------------------------------------------------------


def _mha_pruning(gm: GraphModule, node: Node, rewriter: Rewriter, pass_name: str
                 ) -> Rewrite | Decline | None:
    """Heads of an ``nn.MultiheadAttention`` whose value filter or output columns are zero:
    the module becomes its explicit form (projections, ``scaled_dot_product_attention``)
    with those heads left out."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if not isinstance(module, nn.MultiheadAttention):
        return None
    heads, head_dim, embed = module.num_heads, module.head_dim, module.embed_dim
    q_w, k_w, v_w = _mha_projections(module)
    q_b, k_b, v_b = (None, None, None) if module.in_proj_bias is None else (
        module.in_proj_bias.detach().chunk(3))
    out_w = module.out_proj.weight.detach()
    out_b = None if module.out_proj.bias is None else module.out_proj.bias.detach()
    value_dead = v_w.reshape(heads, head_dim, -1).eq(0).all(dim=2).all(dim=1)
    unread = out_w.reshape(embed, heads, head_dim).eq(0).all(dim=2).all(dim=0)
    candidates = (value_dead | unread).cpu()
    if not bool(candidates.any()):
        return None
    label = describe(node, gm)
    heads_text = _channel_list(candidates.nonzero().flatten().tolist())
    reason = _mha_reason(gm, node, module)
    if reason is not None:
        return Decline(pass_name, node.name, f"heads {heads_text} of {label} stay: {reason}",
                       (node.target,))
    shared = rewriter.index.module_sites[node.target]
    if shared > 1:
        return Decline(pass_name, node.name, f"heads {heads_text} of {label} stay: it is "
                                             f"called at {shared} sites", (node.target,))
    if bool(candidates.all()):
        candidates[0] = False  # one head stays: the output keeps its shape without a special case
    keep_heads = ~candidates
    keep = keep_heads.repeat_interleave(head_dim)
    # A value that is the same for every token is the head's output: fold out_w·b_v.
    constants = torch.zeros(embed, dtype=torch.float64)
    if v_b is not None:
        constants = torch.where(keep, torch.zeros((), dtype=torch.float64),
                                v_b.to(torch.float64).cpu())
    out_weight, out_bias, _ = slice_layer(out_w, out_b, torch.ones(embed, dtype=torch.bool),
                                          keep, constants=constants)
    kept = int(keep_heads.sum())
    batch_first = module.batch_first
    device_keep = keep.to(q_w.device)

    def linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
        view = _linear_view(weight, bias)
        return view.build(weight.contiguous(), None if bias is None else bias.contiguous())

    projections = [linear(w[device_keep], None if b is None else b[device_keep])
                   for w, b in ((q_w, q_b), (k_w, k_b), (v_w, v_b))]
    output = linear(out_weight, out_bias)
    getitem, unused = _mha_outputs(node)
    out_meta = getitem.meta.get("tensor_meta")

    def build() -> Node:
        graph = gm.graph

        def add(op: str, target: Any, args: tuple, shape: Sequence[int]) -> Node:
            created = graph.create_node(op, target, args)
            created.meta["tensor_meta"] = _meta_of_shape(out_meta, shape)
            return created

        q_in, k_in, v_in = (node.args[i] if i < len(node.args) else node.kwargs[name]
                            for i, name in enumerate(("query", "key", "value")))
        # the attention's path now holds its four projections
        container = nn.Module()
        for name, layer in zip(("q_proj", "k_proj", "v_proj", "out_proj"),
                               (*projections, output), strict=True):
            container.add_module(name, layer)
        root = rewriter.place_module(node.target, container, [node])
        parts = []
        for index, data in enumerate((q_in, k_in, v_in)):
            target = f"{root}.{'qkv'[index]}_proj"
            outer = shape_of(data)[:-1]
            projected = add("call_module", target, (data,), (*outer, kept * head_dim))
            if not batch_first:
                outer = (outer[1], outer[0])
                projected = add("call_method", "transpose", (projected, 0, 1),
                                (*outer, kept * head_dim))
            split = add("call_method", "unflatten", (projected, -1, (kept, head_dim)),
                        (*outer, kept, head_dim))
            parts.append(add("call_method", "transpose", (split, 1, 2),
                             (outer[0], kept, outer[1], head_dim)))
        batch, length = shape_of(parts[0])[0], shape_of(parts[0])[2]
        attended = add("call_function", F.scaled_dot_product_attention, tuple(parts),
                       (batch, kept, length, head_dim))
        swapped = add("call_method", "transpose", (attended, 1, 2),
                      (batch, length, kept, head_dim))
        merged = add("call_method", "flatten", (swapped, 2), (batch, length, kept * head_dim))
        if not batch_first:
            merged = add("call_method", "transpose", (merged, 0, 1),
                         (length, batch, kept * head_dim))
        new = graph.call_module(f"{root}.out_proj", (merged,))
        new.meta["tensor_meta"] = out_meta
        return new

    removed = int(candidates.sum())
    # the cost model prices no attention module: count its four projections as linears
    tokens = [math.prod(shape_of(a)[:-1]) for a in (node.args[:3])]
    widths = [shape_of(a)[-1] for a in node.args[:3]]
    projections_macs = sum(t * w * embed for t, w in zip(tokens, widths, strict=True))
    projections_macs += tokens[0] * embed * embed
    before = nodes_cost(gm, [node, getitem]) + NodeCost(macs=projections_macs)
    return rewriter.replace_many(
        pass_name, changes=[(getitem, build)], erased=[*unused, node], cost_before=before,
        detail=f"heads [{heads_text}] of {label} removed ({removed} of {heads}); "
               f"its {kept} other heads run as explicit projections and "
               "scaled_dot_product_attention")


def _meta_of_shape(like: Any, shape: Sequence[int]) -> Any:
    """Shape-propagation metadata like ``like`` (dtype, ...) for a contiguous ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return like._replace(shape=torch.Size(shape), stride=tuple(reversed(strides)))


def _linear_view(weight: Tensor, bias: Tensor | None) -> LayerView:
    return LayerView(node=None, kind="linear", spatial_dims=0, input=None, weight=weight,
                     bias=bias, stride=(), padding=(), dilation=(), groups=1,
                     output_padding=(), padding_mode="zeros", module_path=None, attr_nodes=())


def _mha_projections(module: nn.MultiheadAttention) -> tuple[Tensor, Tensor, Tensor]:
    if module._qkv_same_embed_dim:
        return tuple(module.in_proj_weight.detach().chunk(3))
    return (module.q_proj_weight.detach(), module.k_proj_weight.detach(),
            module.v_proj_weight.detach())


def _mha_outputs(node: Node) -> tuple[Node | None, list[Node]]:
    """The one ``attention(...)[0]`` node and the ``[1]`` nodes nobody reads; ``(None, [])``
    if the call is used any other way."""
    outputs, unused = [], []
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return None, []
        if user.args[1] == 0:
            outputs.append(user)
        elif not user.users:
            unused.append(user)
        else:
            return None, []
    return (outputs[0], unused) if len(outputs) == 1 else (None, [])


def _mha_reason(gm: GraphModule, node: Node, module: nn.MultiheadAttention) -> str | None:
    """Why the attention cannot be rewritten with fewer heads, or None."""
    if module.training and module.dropout > 0:
        return "it is in training mode with dropout"
    if module.bias_k is not None or module.add_zero_attn:
        return "it adds learned or zero key/value rows (add_bias_kv/add_zero_attn)"
    args = bind_args(node, ("query", "key", "value", "key_padding_mask", "need_weights",
                            "attn_mask", "average_attn_weights", "is_causal"),
                     {"key_padding_mask": None, "need_weights": True, "attn_mask": None,
                      "average_attn_weights": True, "is_causal": False})
    if args["key_padding_mask"] is not None or args["attn_mask"] is not None or args[
            "is_causal"]:
        return "it is called with a mask (not rewritten into its explicit form yet)"
    output, unused = _mha_outputs(node)
    if output is None:
        return ("its attention weights are read too (their average over heads would change "
                "without the removed heads)")
    shape = shape_of(output)
    query = args["query"]
    if shape is None or len(shape) != 3 or shape_of(query) is None:
        return "it is called on unbatched or unknown-shape inputs"
    return None


# --- the passes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneDead(Pass):
    """Remove channels and attention heads that are constant or unread, exactly."""

    name: ClassVar[str] = "prune_dead"
    summary: ClassVar[str] = (
        "remove conv/linear channels and attention heads that are constant (zero filters, "
        "BN gamma = 0) or unread, folding their constants into readers' biases; flush "
        "subnormal weights"
    )
    stage: ClassVar[int] = 1
    # Keep the width of every pruned tensor a multiple of this (1: remove all that can go);
    # e.g. 8 for onnxruntime's blocked CPU convs. Channels kept for it are declined, saying so.
    multiple_of: int = 1

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        gm = rewriter.gm
        flushed = self._flush_subnormals(node, rewriter)
        if flushed is not None:
            return flushed
        heads = _mha_pruning(gm, node, rewriter, self.name)
        if heads is not None:
            return heads
        reasons = []
        for seed in _seeds(gm, node):
            plan = _analyze(gm, rewriter, seed, self.multiple_of)
            if isinstance(plan, str):
                reasons.append(_stays(seed, plan))
                continue
            if plan.removable:
                rebuilt = _rebuild(self.name, gm, rewriter, plan)
                if isinstance(rebuilt, Rewrite):
                    return rebuilt
                reasons.append(_stays(seed, rebuilt))
                continue
            text = _decline_text(gm, seed, plan)
            if text is not None:
                reasons.append(text)
        if reasons:
            return self.decline(node, "; ".join(reasons))
        return None

    def _flush_subnormals(self, node: Node, rewriter: Rewriter) -> Rewrite | None:
        gm = rewriter.gm
        view = layer_view(gm, node)
        if view is None or (weight_all_normal(view.weight) and weight_all_normal(view.bias)):
            return None
        count = weight_fact(view.weight, "subnormals", subnormal_count) + (
            0 if view.bias is None else weight_fact(view.bias, "subnormals", subnormal_count))
        if count == 0 or rewriter.index.shared_reason(gm, view) is not None:
            return None
        weight = flush_subnormals(view.weight)
        bias = None if view.bias is None else flush_subnormals(view.bias)
        return rewriter.replace_with_module(
            self.name, root=node, replaced=[node], module=view.build(weight, bias),
            args=(view.input,), module_path=view.module_path or view.origin_paths()[0],
            detail=f"{count} subnormal weights of {describe(node, gm)} flushed to zero",
        )


@dataclass(frozen=True)
class PruneBelow(Pass):
    """Approximate, opt-in: treat channels with ``|γ| < threshold`` (``by="gamma"``, before
    the BN folds) or filter L2 norm ``< threshold`` (``by="norm"``, after them) as constant.

    The BN's γ (or the filter) becomes zero: the channel then outputs ``β`` (or its bias), and
    ``prune_dead`` removes it exactly. Every such rewrite is marked approximate; measure what it
    cost with :func:`prune_below`.
    """

    name: ClassVar[str] = "prune_below"
    summary: ClassVar[str] = (
        "APPROXIMATE, opt-in: zero BN gamma (or conv/linear filters) below a threshold so "
        "prune_dead removes those channels"
    )
    threshold: float = 1e-3
    by: str = "gamma"

    def __post_init__(self) -> None:
        if self.by not in ("gamma", "norm"):
            raise RepfuseError(f"prune_below: 'by' must be 'gamma' or 'norm', not {self.by!r}")
        if not self.threshold >= 0:
            raise RepfuseError(f"prune_below: the threshold must be >= 0, not {self.threshold}")

    @property
    def stage(self) -> int:  # type: ignore[override]
        # γ is read before the BN folds erase it; filter norms after them
        return -1 if self.by == "gamma" else 1

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        if self.by == "gamma":
            return self._gamma(node, rewriter)
        return self._norm(node, rewriter)

    def _gamma(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        gm = rewriter.gm
        bn = batchnorm_view(gm, node)
        if bn is None or bn.weight is None or node.op != "call_module":
            return None
        small = bn.weight.detach().abs().lt(self.threshold) & bn.weight.detach().ne(0)
        if not bool(small.any()):
            return None
        if rewriter.index.module_sites[node.target] > 1:
            return self.decline(node, f"{describe(node, gm)} is called at several sites")
        module = copy.deepcopy(gm.get_submodule(node.target))
        with torch.no_grad():
            module.weight[small.to(module.weight.device)] = 0
        channels = small.nonzero().flatten().tolist()
        return rewriter.replace_with_module(
            self.name, root=node, replaced=[node], module=module, args=(bn.input,),
            module_path=node.target, exact=False,
            detail=f"APPROXIMATE: γ of channels [{_channel_list(channels)}] of "
                   f"{describe(node, gm)} (|γ| < {self.threshold:g}) set to 0",
        )

    def _norm(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        gm = rewriter.gm
        layer = dense_layer(gm, node)
        if layer is None or layer.transposed:
            return None
        rows = layer.view.weight.detach().to(torch.float64)
        norms = rows.reshape(rows.shape[0], -1).norm(dim=1)
        small = (norms < self.threshold) & norms.ne(0)
        if not bool(small.any()):
            return None
        shared = rewriter.index.shared_reason(gm, layer.view)
        if shared is not None:
            return self.decline(node, shared)
        weight = layer.view.weight.detach().clone()
        weight[small.to(weight.device)] = 0
        bias = None if layer.view.bias is None else layer.view.bias.detach().clone()
        channels = small.nonzero().flatten().tolist()
        return rewriter.replace_with_module(
            self.name, root=node, replaced=[node], module=layer.view.build(weight, bias),
            args=(layer.view.input,),
            module_path=layer.view.module_path or layer.view.origin_paths()[0], exact=False,
            detail=f"APPROXIMATE: filters of channels [{_channel_list(channels)}] of "
                   f"{describe(node, gm)} (L2 norm < {self.threshold:g}) set to 0",
        )


__all__ = ["PruneBelow", "PruneDead"]
