"""Small views over torch.fx nodes, so passes read like their descriptions.

A *layer view* normalizes the different spellings of one operation into one record: a conv may
be an ``nn.Conv2d`` call, ``F.conv2d(x, self.w, ...)``, or in an exported program
``aten.conv2d`` (training IR) or ``aten.convolution`` (inference IR, after
``run_decompositions``); a linear layer may also be ``addmm(b, x, Wᵀ)``; a batch norm may be
``nn.BatchNorm2d``, ``F.batch_norm``, ``aten.batch_norm`` or the first result of
``aten._native_batch_norm_legit_no_training``. Views are read-only; rewrites build new modules
from them (:meth:`LayerView.build`).

:class:`UseIndex` answers "is this module or parameter used anywhere else?" in O(1), kept up to
date by the rewriter, so the pipeline stays linear in the graph size.
"""

from __future__ import annotations

import copy
import gc
import math
import operator
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.graph import CodeGen, PythonCode, _format_target

from repfuse.algebra import ntuple

aten = torch.ops.aten

CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
CONV_TRANSPOSE_MODULES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
               "dilation")
_LINEAR_ARGS = ("input", "weight", "bias")

# target -> (kind, spatial dims, argument names in order)
_FUNCTIONAL_LAYERS: dict[Any, tuple[str, int, tuple[str, ...]]] = {
    F.conv1d: ("conv", 1, _CONV_ARGS),
    F.conv2d: ("conv", 2, _CONV_ARGS),
    F.conv3d: ("conv", 3, _CONV_ARGS),
    F.conv_transpose1d: ("conv_transpose", 1, _CONVT_ARGS),
    F.conv_transpose2d: ("conv_transpose", 2, _CONVT_ARGS),
    F.conv_transpose3d: ("conv_transpose", 3, _CONVT_ARGS),
    F.linear: ("linear", 0, _LINEAR_ARGS),
    aten.conv1d.default: ("conv", 1, _CONV_ARGS),
    aten.conv2d.default: ("conv", 2, _CONV_ARGS),
    aten.conv3d.default: ("conv", 3, _CONV_ARGS),
    aten.conv_transpose1d.default: ("conv_transpose", 1, _CONVT_ARGS),
    aten.conv_transpose2d.input: ("conv_transpose", 2, _CONVT_ARGS),
    aten.conv_transpose3d.input: ("conv_transpose", 3, _CONVT_ARGS),
    aten.linear.default: ("linear", 0, _LINEAR_ARGS),
}
_LAYER_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                   "output_padding": 0}
# The inference IR's one convolution op; ``transposed`` says which kind it is.
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups")
# A linear layer as the inference IR decomposes it: ``addmm(b, x, Wᵀ)`` or ``mm(x, Wᵀ)``.
_MATMUL_ARGS = {aten.addmm.default: ("bias", "input", "weight_t"),
                aten.mm.default: ("input", "weight_t")}
_TRANSPOSES_2D = {aten.t.default, aten.permute.default, aten.transpose.int}

_BN_FUNCTIONAL_ARGS = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training",
                   "momentum", "eps"),
    aten.batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var",
                              "training", "momentum", "eps", "cudnn_enabled"),
}
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
# Batch norms of the inference IR: a tuple (output, mean, rstd) whose output is read through
# ``operator.getitem(bn, 0)``; the view's node is that getitem.
_BN_TUPLE_ARGS = {
    aten._native_batch_norm_legit_no_training.default: ("input", "weight", "bias",
                                                         "running_mean", "running_var",
                                                         "momentum", "eps"),
    aten.native_batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var",
                                     "training", "momentum", "eps"),
    # a program exported in training mode (also returns the updated statistics)
    aten._native_batch_norm_legit_functional.default: ("input", "weight", "bias",
                                                       "running_mean", "running_var",
                                                       "training", "momentum", "eps"),
}
# BatchNorm modules (and subclasses) whose forward is BatchNorm's own: SyncBatchNorm in eval
# mode is a BatchNorm too.
_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


# Key of the provenance record (a repfuse.passes.base.Rewrite) on a rewritten node's meta.
META_KEY = "repfuse"


def fetch_attr(gm: nn.Module, target: str) -> Any:
    """The object a ``get_attr`` target names, e.g. ``'layer1.0.conv1.weight'``."""
    return reduce(getattr, target.split("."), gm)


def owner_path(target: str) -> str:
    """``'layer1.0.conv1.weight'`` -> ``'layer1.0.conv1'`` (``''`` for a top-level attribute)."""
    return target.rpartition(".")[0]


def bind_args(node: Node, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """Map a call node's positional and keyword arguments onto ``names``."""
    bound = dict(defaults)
    bound.update(zip(names, node.args, strict=False))  # trailing defaults may be omitted
    bound.update(node.kwargs)
    return bound


def describe(node: Node, gm: GraphModule | None = None) -> str:
    """A short human name for a node: ``'layer1.0.bn1' (BatchNorm2d)`` or ``'add_3' (add)``."""
    if node.op == "call_module" and gm is not None:
        kind = type(gm.get_submodule(node.target)).__name__
        return f"'{node.target}' ({kind})"
    if node.op in ("call_function", "call_method"):
        target = node.target if isinstance(node.target, str) else node.target.__name__
        source = node.args[0] if node.target is operator.getitem and node.args else None
        if isinstance(source, Node) and isinstance(source.target, torch._ops.OpOverload):
            target = f"{source.target.__name__}[{node.args[1]}]"  # e.g. an exported BN's output
        return f"'{node.name}' ({target})"
    return f"'{node.name}'"


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The output shape recorded by shape propagation, or None when unknown."""
    if not isinstance(node, Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def meta_with_size(meta: Any, dim: int, size: int) -> Any:
    """Shape-propagation metadata like ``meta`` but with ``size`` entries along ``dim``."""
    shape = list(meta.shape)
    shape[dim] = size
    return meta._replace(shape=torch.Size(shape))


def dtype_of(node: Any) -> torch.dtype | None:
    if not isinstance(node, Node):
        return None
    return getattr(node.meta.get("tensor_meta"), "dtype", None)


def constant_value(gm: GraphModule, arg: Any) -> Tensor | float | int | None:
    """A constant operand: a Python number or a tensor read by ``get_attr``; None otherwise."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return arg
    if isinstance(arg, Node) and arg.op == "get_attr":
        value = fetch_attr(gm, arg.target)
        return value if isinstance(value, Tensor) else None
    return None


@dataclass(frozen=True)
class LayerView:
    """A conv, transposed conv or linear layer with constant weights, in whatever form."""

    node: Node
    kind: str  # "conv" | "conv_transpose" | "linear"
    spatial_dims: int
    input: Node
    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    output_padding: tuple[int, ...]
    padding_mode: str
    module_path: str | None  # the nn.Module called, for the module form
    attr_nodes: tuple[Node, ...]  # get_attr nodes of weight/bias, for the functional form

    @property
    def out_channels(self) -> int:
        if self.kind == "conv_transpose":
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        if self.kind == "conv_transpose":
            return self.weight.shape[0]
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def channel_axis(self) -> int:
        """Axis of the output (and input) that holds channels: 1 for convs, last for linear."""
        return -1 if self.kind == "linear" else 1

    def pads_with_zeros(self) -> bool:
        """True when the layer reads zeros beyond its input's border."""
        if self.kind != "conv" or self.padding_mode != "zeros":
            return False
        if isinstance(self.padding, str):
            return self.padding == "same" and any(k > 1 for k in self.kernel_size)
        return any(p != 0 for p in self.padding)

    def origin_paths(self) -> tuple[str, ...]:
        if self.module_path is not None:
            return (self.module_path,)
        return _paths_of_attrs(self.attr_nodes)

    def build(self, weight: Tensor, bias: Tensor | None) -> nn.Module:
        """A fresh ``nn.Conv*d``/``nn.ConvTranspose*d``/``nn.Linear`` holding these weights.

        The module takes the tensors as they are, without a copy: pass tensors nothing else
        holds (fresh results of a fold), or clones.
        """
        factory = {"dtype": weight.dtype}
        has_bias = bias is not None
        if self.kind == "linear":
            module = new_layer(nn.Linear, self.in_channels, self.out_channels, bias=has_bias,
                               **factory)
        elif self.kind == "conv":
            cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[self.spatial_dims]
            module = new_layer(cls, self.in_channels, self.out_channels, self.kernel_size,
                               self.stride, self.padding, self.dilation, self.groups, has_bias,
                               self.padding_mode, **factory)
        else:
            cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d,
                   3: nn.ConvTranspose3d}[self.spatial_dims]
            module = new_layer(cls, self.in_channels, self.out_channels, self.kernel_size,
                               self.stride, self.padding, self.output_padding, self.groups,
                               has_bias, self.dilation, **factory)
        module.weight = frozen_parameter(weight)
        if has_bias:
            module.bias = frozen_parameter(bias)
        return module


def new_layer(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` for a conv or linear layer class, without its initializer.

    Its parameters are empty placeholders on the meta device: the caller replaces them.
    Initializing weights that are thrown away at once would cost more than the whole fold
    (``reset_parameters`` draws random numbers for every weight; on the meta device it still
    runs a decomposition per call).
    """
    module = cls.__new__(cls)
    # the instance attribute shadows the method for the one call __init__ makes
    object.__setattr__(module, "reset_parameters", _no_initializer)
    cls.__init__(module, *args, **{**kwargs, "device": "meta"})
    object.__delattr__(module, "reset_parameters")
    return module


def _no_initializer() -> None:
    pass


def frozen_parameter(tensor: Tensor) -> nn.Parameter:
    """``tensor`` as a parameter without gradient, contiguous (a strided view would make every
    call of the layer copy it first)."""
    return nn.Parameter(tensor.detach().contiguous(), requires_grad=False)


def layer_view(gm: GraphModule, node: Node) -> LayerView | None:
    """View ``node`` as a conv/transposed conv/linear layer with constant weights, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear):
            kind, dims = "linear", 0
        elif type(module) in CONV_MODULES:
            kind, dims = "conv", CONV_MODULES[type(module)]
        elif type(module) in CONV_TRANSPOSE_MODULES:
            kind, dims = "conv_transpose", CONV_TRANSPOSE_MODULES[type(module)]
        else:
            return None
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], Node):
            return None  # e.g. ConvTranspose called with output_size
        conv_like = kind != "linear"
        return LayerView(
            node=node, kind=kind, spatial_dims=dims, input=node.args[0],
            weight=module.weight, bias=module.bias,
            stride=tuple(module.stride) if conv_like else (),
            padding=(module.padding if isinstance(module.padding, str)
                     else tuple(module.padding)) if conv_like else (),
            dilation=tuple(module.dilation) if conv_like else (),
            groups=module.groups if conv_like else 1,
            output_padding=tuple(getattr(module, "output_padding", ()) or ()),
            padding_mode=getattr(module, "padding_mode", "zeros"),
            module_path=node.target, attr_nodes=(),
        )
    if node.op != "call_function":
        return None
    if node.target in _MATMUL_ARGS:
        return _matmul_view(gm, node)
    if node.target is aten.convolution.default:
        args = bind_args(node, _CONVOLUTION_ARGS, _LAYER_DEFAULTS)
        if not isinstance(args["transposed"], bool) or not _is_attr(args["weight"]):
            return None
        kind = "conv_transpose" if args["transposed"] else "conv"
        dims = fetch_attr(gm, args["weight"].target).dim() - 2
    elif node.target in _FUNCTIONAL_LAYERS:
        kind, dims, names = _FUNCTIONAL_LAYERS[node.target]
        args = bind_args(node, names, _LAYER_DEFAULTS)
    else:
        return None
    weight_node, bias_node, data = args["weight"], args["bias"], args["input"]
    if not isinstance(data, Node) or not _is_attr(weight_node):
        return None  # weights computed at run time (dynamic conv): not a constant layer
    if bias_node is not None and not _is_attr(bias_node):
        return None
    if any(has_node(args[name]) for name in ("stride", "padding", "dilation", "groups",
                                               "output_padding")):
        return None  # settings computed at run time: no fixed layer
    padding = args["padding"] if isinstance(args["padding"], str) else ntuple(args["padding"],
                                                                                dims)
    attr_nodes = tuple(n for n in (weight_node, bias_node) if n is not None)
    return LayerView(
        node=node, kind=kind, spatial_dims=dims, input=data,
        weight=fetch_attr(gm, weight_node.target),
        bias=None if bias_node is None else fetch_attr(gm, bias_node.target),
        stride=ntuple(args["stride"], dims) if dims else (),
        padding=padding if dims else (),
        dilation=ntuple(args["dilation"], dims) if dims else (),
        groups=int(args["groups"]),
        output_padding=ntuple(args["output_padding"], dims) if kind == "conv_transpose" else (),
        padding_mode="zeros", module_path=None, attr_nodes=attr_nodes,
    )


def _matmul_view(gm: GraphModule, node: Node) -> LayerView | None:
    """``addmm(b, x, Wᵀ)`` or ``mm(x, Wᵀ)`` as the linear layer ``x·Wᵀ + b``.

    ``Wᵀ`` is a constant, or a transpose of one (what ``run_decompositions`` writes for
    ``nn.Linear``); ``b`` must be one bias per output (``addmm`` would also broadcast a matrix).
    """
    args = bind_args(node, _MATMUL_ARGS[node.target], {"bias": None, "beta": 1, "alpha": 1})
    data, bias_node, weight_t = args["input"], args["bias"], args["weight_t"]
    if args["beta"] != 1 or args["alpha"] != 1 or not isinstance(data, Node):
        return None
    if bias_node is not None and not _is_attr(bias_node):
        return None
    if _is_attr(weight_t):
        weight_node, weight = weight_t, fetch_attr(gm, weight_t.target)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            return None
        weight = weight.t()
    elif (isinstance(weight_t, Node) and weight_t.op == "call_function"
          and weight_t.target in _TRANSPOSES_2D and _is_attr(weight_t.args[0])
          and list(weight_t.args[1:]) in ([], [[1, 0]], [0, 1], [1, 0])):
        weight_node = weight_t.args[0]
        weight = fetch_attr(gm, weight_node.target)
    else:
        return None
    bias = None if bias_node is None else fetch_attr(gm, bias_node.target)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:1]):
        return None
    attr_nodes = tuple(n for n in (weight_node, bias_node) if n is not None)
    return LayerView(
        node=node, kind="linear", spatial_dims=0, input=data, weight=weight, bias=bias,
        stride=(), padding=(), dilation=(), groups=1, output_padding=(), padding_mode="zeros",
        module_path=None, attr_nodes=attr_nodes,
    )


def origin_paths_of(node: Node) -> tuple[str, ...]:
    """The original module paths a node stands for (through earlier rewrites)."""
    record = node.meta.get(META_KEY)
    if record is not None:
        return record.module_paths
    if node.op == "call_module":
        return (node.target,)
    if node.op == "get_attr":
        return (owner_path(node.target) or node.target,)
    if node.op == "call_function" and node.target is operator.getitem and isinstance(
            node.args[0], Node):
        return origin_paths_of(node.args[0])  # an item of a result: what computed it
    # A functional op stands for the modules whose weights it reads.
    return _paths_of_attrs(n for n in node.all_input_nodes if n.op == "get_attr")


def _paths_of_attrs(attrs: Iterable[Node]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for n in attrs for p in origin_paths_of(n)))


def has_node(value: Any) -> bool:
    """True when ``value`` is a node or a list/tuple holding one: an argument computed at run
    time (a padding or size read off a tensor), not a constant."""
    if isinstance(value, Node):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, Node) for v in value)


def _is_attr(arg: Any) -> bool:
    return isinstance(arg, Node) and arg.op == "get_attr"


@dataclass(frozen=True)
class BatchNormView:
    """A batch norm call: module ``nn.BatchNorm*d`` or ``F.batch_norm``/``aten.batch_norm``,
    or ``getitem(bn, 0)`` of an inference-IR batch norm ``bn`` (then ``node`` is the getitem
    and ``input`` the input of ``bn``; see :func:`data_users`)."""

    node: Node
    input: Node
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    training: bool
    module_path: str | None
    attr_nodes: tuple[Node, ...]

    def origin_paths(self) -> tuple[str, ...]:
        if self.module_path is not None:
            return (self.module_path,)
        return _paths_of_attrs(self.attr_nodes)


def batchnorm_view(gm: GraphModule, node: Node) -> BatchNormView | None:
    """View ``node`` as a batch norm, or None. Does not judge foldability (see the pass)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            return None
        if type(module).forward not in _BN_FORWARDS:
            return None  # a subclass with its own forward may compute something else
        if len(node.args) != 1 or not isinstance(node.args[0], Node):
            return None
        return BatchNormView(
            node=node, input=node.args[0], running_mean=module.running_mean,
            running_var=module.running_var, weight=module.weight, bias=module.bias,
            eps=module.eps, training=module.training, module_path=node.target, attr_nodes=(),
        )
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        source, index = node.args
        if (index != 0 or not isinstance(source, Node) or source.op != "call_function"
                or source.target not in _BN_TUPLE_ARGS):
            return None
        args = bind_args(source, _BN_TUPLE_ARGS[source.target], _BN_DEFAULTS)
        if len(source.users) != 1 and args["training"] is False:
            return None  # its mean and rstd are read too: the batch norm cannot go
    elif node.target in _BN_FUNCTIONAL_ARGS:
        args = bind_args(node, _BN_FUNCTIONAL_ARGS[node.target], _BN_DEFAULTS)
    else:
        return None
    if not isinstance(args["input"], Node):
        return None
    tensors: dict[str, Tensor | None] = {}
    attr_nodes = []
    for key in ("running_mean", "running_var", "weight", "bias"):
        arg = args[key]
        if arg is None:
            tensors[key] = None
        elif _is_attr(arg):
            tensors[key] = fetch_attr(gm, arg.target)
            attr_nodes.append(arg)
        else:
            return None  # statistics computed at run time: not a constant batch norm
    training = args["training"]
    return BatchNormView(
        node=node, input=args["input"], eps=float(args["eps"]),
        training=training is not False, module_path=None, attr_nodes=tuple(attr_nodes),
        **tensors,
    )


class UseIndex:
    """How often each module is called and each attribute read, kept current by the rewriter.

    Folding writes new weights; doing that for a module called at two sites, or a parameter
    tied to another module, would silently change the other use. This index makes that check
    O(1) per candidate.
    """

    def __init__(self, gm: GraphModule) -> None:
        self.module_sites: Counter[str] = Counter()
        self.attr_reads: Counter[str] = Counter()
        for node in gm.graph.nodes:
            self.on_create(node)
        self.tensor_names: Counter[int] = Counter()
        named = list(gm.named_parameters(remove_duplicate=False))
        named += list(gm.named_buffers(remove_duplicate=False))
        for _, tensor in named:
            self.tensor_names[id(tensor)] += 1

    def on_create(self, node: Node) -> None:
        if node.op == "call_module":
            self.module_sites[node.target] += 1
        elif node.op == "get_attr":
            self.attr_reads[node.target] += 1

    def on_erase(self, node: Node) -> None:
        if node.op == "call_module":
            self.module_sites[node.target] -= 1
        elif node.op == "get_attr":
            self.attr_reads[node.target] -= 1

    def shared_reason(self, gm: GraphModule, layer: LayerView) -> str | None:
        """Why new weights for ``layer`` would leak into another use, or None if they would not."""
        name = describe(layer.node, gm)
        if layer.module_path is not None:
            sites = self.module_sites[layer.module_path]
            if sites > 1:
                return f"{name} is called at {sites} sites; folding would change the other calls"
            module = gm.get_submodule(layer.module_path)
            for pname, tensor in module.named_parameters(recurse=False):
                full = f"{layer.module_path}.{pname}"
                if self.attr_reads[full] > 0:
                    return f"{name}: its parameter '{full}' is also read elsewhere in the graph"
                if self.tensor_names[id(tensor)] > 1:
                    return f"{name}: its parameter '{full}' is tied to another module"
            return None
        for attr in layer.attr_nodes:
            if self.attr_reads[attr.target] > 1:
                return f"{name}: its weight '{attr.target}' is read at more than one site"
            if self.tensor_names[id(fetch_attr(gm, attr.target))] > 1:
                return f"{name}: its weight '{attr.target}' is tied to another parameter"
        return None


# What a tensor's metadata is read through: these do not read its values, so they do not
# keep a fold or merge from replacing the tensor (see :func:`reads_metadata_only`).
METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout",
                                 "is_sparse", "is_quantized", "is_meta", "requires_grad"})
METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device",
                              "is_floating_point", "is_complex", "element_size",
                              "is_contiguous"})
# The same reads in an exported program with dynamic sizes (``aten.sym_size.int(x, 0)``).
METADATA_FUNCTIONS = frozenset({aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
                                aten.sym_storage_offset.default})
# Of those, the ones that give the rank, which no input size changes.
RANK_ATTRIBUTES = frozenset({"ndim"})
RANK_METHODS = frozenset({"dim", "ndimension"})


# Methods that take the shape (or dtype) of a second tensor: ``y.reshape_as(x)`` reads only
# the metadata of ``x``.
_SHAPE_SOURCE_METHODS = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})


def reads_metadata_only(user: Node, node: Node) -> bool:
    """True when ``user`` reads only the metadata of ``node`` (``node.shape``, ``node.ndim``,
    ``node.size(1)``, ``node.device``, ``y.reshape_as(node)``, ...), not its values."""
    if (user.op == "call_method" and user.target in _SHAPE_SOURCE_METHODS
            and len(user.args) == 2 and user.args[1] is node and user.args[0] is not node):
        return True
    if not user.args or user.args[0] is not node:
        return False
    if any(a is node for a in _flat_args(user)[1:]):
        return False
    return _reads_metadata(user)


def _reads_metadata(node: Node) -> bool:
    """True when ``node`` reads the metadata of its first argument (``x.shape``, ``x.size(1)``,
    ``aten.sym_size.int(x, 0)``)."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in METADATA_ATTRIBUTES
    if node.op == "call_function":
        return node.target in METADATA_FUNCTIONS
    return node.op == "call_method" and node.target in METADATA_METHODS


def reads_rank_only(user: Node, node: Node) -> bool:
    """True when ``user`` is ``node.ndim``, ``node.dim()`` or ``node.ndimension()``."""
    if not reads_metadata_only(user, node):
        return False
    if user.op == "call_function":
        return user.args[1] in RANK_ATTRIBUTES
    return user.target in RANK_METHODS and len(user.args) == 1 and not user.kwargs


# Python functions on plain values (shapes, sizes, flags) that a traced graph records when code
# computes with metadata: ``x.size(2) // 2``, ``math.sqrt(c)``, ``x.ndim == 4``.
# In-place operators (``iadd``, ``iconcat``, ...) may mutate a list argument.
_NOT_PURE = {operator.setitem, operator.delitem, operator.concat} | {
    f for name, f in vars(operator).items()
    if name.startswith("i") and {name[1:], f"{name[1:]}_"} & vars(operator).keys()}
SCALAR_FUNCTIONS = frozenset(
    f for f in (*vars(operator).values(), *vars(math).values())
    if callable(f) and f not in _NOT_PURE
) | {int, float, bool, len, min, max, abs, round}


def is_metadata_helper(node: Node) -> bool:
    """True for a node that computes a plain value from metadata or other plain values
    (``x.shape``, ``x.size(1) * 2``, ``x.ndim == 4``): pure, no tensor values read."""
    if _reads_metadata(node):
        return True
    return node.op == "call_function" and node.target in SCALAR_FUNCTIONS and not any(
        _produces_tensor(a) for a in node.all_input_nodes)


def _produces_tensor(node: Node) -> bool:
    kind = node.meta.get("type")
    if kind is not None:
        return isinstance(kind, type) and issubclass(kind, Tensor)
    return "tensor_meta" in node.meta or node.op in ("call_module", "placeholder")


# Ops that mutate, draw random numbers or touch global state: never evaluated ahead of time,
# never removed when nothing reads their result.
_IMPURE_FUNCTIONS = {
    operator.setitem, torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like,
    torch.randn_like, torch.randint_like, torch.bernoulli, torch.normal, torch.poisson,
    torch.multinomial, torch.empty, torch.empty_like, torch.dropout, F.dropout,
    F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d, print,
}
_IMPURE_METHODS = {"bernoulli", "multinomial", "normal", "uniform", "random", "exponential",
                   "geometric", "cauchy", "log_normal"}


def is_impure(node: Node) -> bool:
    """True when calling ``node`` does more than compute its result: writes in place, draws
    random numbers, asserts, prints (torch.fx's side-effect list included)."""
    if node.op in ("placeholder", "output") or node.is_impure():
        return True
    if node.op == "call_module":
        return False  # whether the module is pure is the caller's question
    if node.kwargs.get("inplace") or "out" in node.kwargs:
        return True
    if isinstance(node.target, str):
        return node.target.endswith("_") or node.target in _IMPURE_METHODS
    if "assert" in getattr(node.target, "__name__", ""):
        return True  # a check, e.g. torch.fx's _assert_is_none for a bound None argument
    try:
        return node.target in _IMPURE_FUNCTIONS
    except TypeError:  # an unhashable target
        return True


def mutates(user: Node, node: Node) -> bool:
    """True when ``user`` writes into ``node``'s tensor (``x.add_(...)``, ``x[i] = v``)."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        return user.target.endswith("_")
    return user.target is operator.setitem or bool(user.kwargs.get("inplace"))


def data_users(node: Node) -> list[Node]:
    """The nodes that read ``node``'s values (metadata reads such as ``x.shape`` excluded).

    An op with several results that are read only through one ``getitem`` counts as that
    getitem: the inference IR's batch norm returns ``(output, mean, rstd)`` and the graph reads
    ``getitem(bn, 0)``, so the getitem stands for the batch norm (:func:`batchnorm_view`), and
    a rewrite that removes it leaves the tuple op unread (the rewriter erases it with it).
    """
    return [_result_reader(u) for u in node.users if not reads_metadata_only(u, node)]


def _result_reader(user: Node) -> Node:
    """``user``, or the single ``getitem`` through which its several results are read."""
    if user.op != "call_function" or len(user.users) != 1 or not isinstance(
            user.target, torch._ops.OpOverload) or len(user.target._schema.returns) < 2:
        return user
    item = next(iter(user.users))
    if item.op == "call_function" and item.target is operator.getitem and item.args[0] is user:
        return item
    return user


def metadata_readers(node: Node) -> list[Node]:
    """The nodes that read only ``node``'s metadata (``x.shape``, ``x.ndim``, ...)."""
    return [u for u in node.users if reads_metadata_only(u, node)]


def sole_user(node: Node) -> Node | None:
    """The only node that reads ``node``'s values (read once), or None.

    Reads of its metadata (``x.ndim`` in an assert, ``x.shape`` for a reshape) do not count:
    a rewrite that removes ``node`` moves them to the node standing for it, or declines.
    """
    users = [u for u in node.users if not reads_metadata_only(u, node)]
    if len(users) != 1:
        return None
    return _result_reader(users[0]) if read_count(users[0], node) == 1 else None


def other_users(gm: GraphModule, node: Node, expected: Node | None = None) -> str:
    """Why ``node`` is not read by ``expected`` alone, naming the other readers."""
    others = [u for u in data_users(node) if u is not expected]
    if not others:
        return f"{describe(node, gm)} is read twice by {describe(expected, gm)}"
    shown = ", ".join(describe(u, gm) for u in others[:3])
    more = f" and {len(others) - 3} more" if len(others) > 3 else ""
    return f"the output of {describe(node, gm)} is also used elsewhere, by {shown}{more}"


def written_in_place(node: Node) -> bool:
    """True when ``node``'s tensor, or a view of it, may be written in place: by an aten op
    whose schema mutates an argument (an exported ``copy_`` into a slice), or as
    :func:`mutates` says (``x[i] = v``, ``x.add_(y)``)."""
    for user in node.users:
        target = user.target
        if isinstance(target, torch._ops.OpOverload):
            schema = target._schema
            if schema.is_mutable:
                return True
            if aten_view(user) and written_in_place(user):
                return True
        elif mutates(user, node):
            return True
    return False


def aten_view(node: Node) -> bool:
    """An aten op whose result aliases its input (``slice``, ``view``, ``select``, ...)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and any(
        r.alias_info is not None for r in target._schema.returns)


def pure_aten(node: Node) -> bool:
    """An aten op that only computes its result, the same on every call: its schema mutates
    nothing, it draws no random numbers, and its result is not uninitialized memory
    (``empty``, ``empty_like``, ``new_empty``)."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and not target._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in target.tags
            and "empty" not in target._schema.name)


def _flat_args(node: Node) -> list[Any]:
    flat: list[Any] = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return flat


def read_count(user: Node, node: Node) -> int:
    """How many of ``user``'s arguments (nested in lists, tuples and dicts included) are
    ``node``."""
    return sum(1 for a in _flat_args(user) if a is node)


_ARITH_FUNCTIONS = {
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    # exported programs: a Tensor or Scalar second operand (``alpha`` as a keyword of add/sub)
    aten.add.Tensor: "add", aten.add.Scalar: "add", aten.sub.Tensor: "sub",
    aten.sub.Scalar: "sub", aten.mul.Tensor: "mul", aten.mul.Scalar: "mul",
    aten.div.Tensor: "div", aten.div.Scalar: "div",
}
_ARITH_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "true_divide": "div"}


def arith_kind(node: Node) -> str | None:
    """``'add' | 'sub' | 'mul' | 'div'`` for an out-of-place elementwise arithmetic call."""
    if node.op == "call_function":
        return _ARITH_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _ARITH_METHODS.get(node.target)
    return None


# --- generated code ---------------------------------------------------------------------------


class DirectModuleAccess(CodeGen):
    """fx's code generator, but submodules are reached through the ``_modules`` dicts.

    fx writes a call of the module at ``stage1.0.conv`` as
    ``getattr(self.stage1, "0").conv(x)``: every step runs ``nn.Module.__getattr__``, a Python
    function, because submodules are not instance attributes. After fusion a block is often a
    single conv and an activation, so these lookups are a few percent of an eager forward at
    batch 1. ``self._modules["stage1"]._modules["0"]._modules["conv"](x)`` reads the same
    objects (a submodule lives only in its parent's ``_modules``) with plain dict lookups, and
    it always sees the module tree as it is now: nothing is cached.

    Lines it does not recognize keep fx's spelling, which computes the same. The generated code
    is regenerated with fx's own generator where plain attribute access is needed (TorchScript);
    a fused model saved and loaded again gets fx's generator back (fx re-traces on load).
    """

    def _gen_python_code(self, nodes, root_module: str, namespace, **kwargs) -> PythonCode:
        code = super()._gen_python_code(nodes, root_module, namespace, **kwargs)
        calls = {node.name: node.target for node in nodes if node.op == "call_module"}
        lines = code.src.split("\n")
        for index, line in enumerate(lines):  # one statement per line, as fx writes them
            found = _ASSIGNMENT.match(line)
            target = calls.get(found.group(2)) if found else None
            if target is None:
                continue
            slow = f"{_format_target(root_module, target)}("
            value = line[found.end():]
            if value.startswith(slow):
                fast = f"{module_access(root_module, target)}("
                lines[index] = line[:found.end()] + fast + value[len(slow):]
        code.src = "\n".join(lines)
        return code


_ASSIGNMENT = re.compile(r"^(\s+)(\w+) = ")


def module_access(root: str, target: str) -> str:
    """``root._modules["a"]._modules["b"]`` for the submodule at path ``a.b``."""
    return root + "".join(f"._modules[{part!r}]" for part in target.split("."))


def use_direct_module_access(gm: GraphModule) -> None:
    """Make ``gm`` generate :class:`DirectModuleAccess` code (call ``gm.recompile()`` after)."""
    if type(gm.graph._codegen) is CodeGen:  # a custom one (e.g. pytree inputs) stays
        gm.graph.set_codegen(DirectModuleAccess())


def with_fx_codegen(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` whose code is written by fx's own generator (for TorchScript, which
    does not read ``_modules``)."""
    copied = copy.deepcopy(gm)
    if isinstance(copied.graph._codegen, DirectModuleAccess):
        copied.graph.set_codegen(CodeGen())
        copied.recompile()
    return copied


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the duration (a ``with`` block, or a
    function decorated with ``@gc_paused()``).

    Tracing and rewriting allocate many small objects (nodes, module copies) that stay alive,
    and every collection of the oldest generation walks all of them: a quarter of the
    conversion time of a graph of 25,000 nodes went to the collector. Garbage with cycles made
    meanwhile is collected after, as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
