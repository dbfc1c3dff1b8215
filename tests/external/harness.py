"""Build a corpus model, fuse it with repfuse, and measure it against independent references.

Everything here is generic: a model is built by its library's factory from its name, and the
measures read only tensors, module buffers and the torch functions a forward calls.

- **BatchNorm and conv counts** are counted while the model runs: a BatchNorm is a call of a
  module that holds ``running_mean`` and ``running_var`` buffers (``nn.BatchNorm*d``, their
  subclasses, frozen BatchNorm) or a call of ``F.batch_norm`` outside such a module; a conv is
  a call of ``torch.conv{1,2,3}d``/``conv_transpose{1,2,3}d``/``convolution`` (what
  ``nn.Conv*`` and every functional conv call).
- **Errors** are ``max|a - b| / max|b|`` against the unfused model run in float64, per output
  tensor, the largest over the outputs.
- **Chaos**: a model whose float64 output moves by more than :data:`CHAOTIC` when its input
  moves by 1e-15 (relative; :func:`sensitivity`) cannot be judged end to end at 1e-9; it is
  judged block by block (:func:`block_errors`): each submodule that is not chaotic on the
  input it receives in the original run is fused alone and compared, descending into the
  chaotic ones.
- **Foldable BatchNorm** (:func:`batchnorm_sites`): a local rule, independent of repfuse, says
  which BatchNorm calls fold exactly (a conv/linear producer or reader, through views, that
  nothing else reads); it explains what is left, the expectation table judges it.
"""

from __future__ import annotations

import copy
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from corpus import Spec
from torch import Tensor, nn
from torch.fx import Proxy
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_leaves

import repfuse

SEED = 0
F64_LIMIT = 1e-9  # float64 max rel error of the fused model against the unfused one
F32_FACTOR = 10.0  # float32 error at most this times the model's own float32 noise floor
PERTURBATION = 1e-15  # relative input perturbation of the chaos probe
# The probes, as relative input perturbations: a fused model's own rounding moves an output
# about as much as an input change between the first and the last does.
PROBES = (1e-15, 1e-13, 1e-11)
CHAOTIC = 1e-11  # output change (relative) above which a model is chaotic in float64

_CONVS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d,
          torch.conv_transpose2d, torch.conv_transpose3d, torch.convolution}
_BATCH_NORMS = {torch.nn.functional.batch_norm, torch.batch_norm}


# --- building --------------------------------------------------------------------------------


def build(spec: Spec) -> nn.Module:
    """The model as its library builds it (random init from :data:`SEED`), eval mode, float32,
    every BatchNorm given random running statistics (:func:`randomize_batchnorm`)."""
    torch.manual_seed(SEED)
    if spec.library == "timm":
        import timm

        model = timm.create_model(spec.name, pretrained=False, **spec.kwargs)
    elif spec.library == "torchvision":
        import torchvision

        model = torchvision.models.get_model(spec.name, weights=None, **spec.kwargs)
    elif spec.library == "ultralytics":
        import ultralytics

        model = getattr(ultralytics, spec.factory or "YOLO")(spec.name).model
    else:
        raise ValueError(f"unknown library {spec.library!r}")
    randomize_batchnorm(model, SEED)
    return model.float().eval()


def is_batchnorm(module: nn.Module) -> bool:
    """A module normalizing with running statistics: it holds both buffers."""
    buffers = dict(module.named_buffers(recurse=False))
    return isinstance(buffers.get("running_mean"), Tensor) and isinstance(
        buffers.get("running_var"), Tensor)


def randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Random running statistics and affine parameters for every BatchNorm of ``model``:
    mean ~ 0.1 N(0,1), var ~ U(0.5, 1.5), weight ~ U(0.5, 1.5), bias ~ 0.1 N(0,1)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(like: Tensor, low: float, high: float, normal: bool) -> Tensor:
        if normal:
            sample = torch.randn(like.shape, generator=generator) * 0.1
        else:
            sample = torch.rand(like.shape, generator=generator) * (high - low) + low
        return sample.to(like)

    with torch.no_grad():
        for module in model.modules():
            if not is_batchnorm(module):
                continue
            module.running_mean.copy_(draw(module.running_mean, 0, 0, True))
            module.running_var.copy_(draw(module.running_var, 0.5, 1.5, False))
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, Tensor):
                weight.copy_(draw(weight, 0.5, 1.5, False))
            if isinstance(bias, Tensor):
                bias.copy_(draw(bias, 0, 0, True))


def example_input(spec: Spec) -> Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(1, 3, spec.size, spec.size, generator=generator)


def deploy_form(spec: Spec, model: nn.Module) -> tuple[nn.Module, str]:
    """The third party's own deploy form of a copy of ``model``, and its name."""
    model = copy.deepcopy(model)
    if spec.library == "timm":
        from timm.utils.model import reparameterize_model

        return reparameterize_model(model), "timm reparameterize_model"
    if spec.library == "ultralytics":
        return model.fuse(verbose=False), "ultralytics fuse()"
    from torch.fx.experimental.optimization import fuse as fx_fuse

    try:
        return fx_fuse(model), "torch.fx fuse"
    except Exception:  # not symbolically traceable: torchvision has no deploy form of its own
        return model, "none (eager model)"


# --- measuring -------------------------------------------------------------------------------


def outputs(model: Callable, inputs: tuple[Tensor, ...], floating: bool = True
            ) -> list[Tensor]:
    """The floating-point (or all) tensor leaves of ``model(*inputs)``, in order."""
    with torch.no_grad():
        result = model(*inputs)
    leaves = tree_leaves(result)
    stale = sum(1 for t in leaves if isinstance(t, Proxy))
    if stale:
        raise TypeError(f"the model returned {stale} fx Proxy object(s), left over from "
                        "tracing, where tensors belong")
    return [t for t in leaves
            if isinstance(t, Tensor) and (t.is_floating_point() or not floating)]


def rel_error(reference: list[Tensor], candidate: list[Tensor]) -> float:
    """``max|c - r| / max|r|`` per output, the largest over the outputs; inf where the outputs
    do not correspond (count or shapes differ)."""
    if len(reference) != len(candidate) or not reference:
        return float("inf")
    worst = 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        if ref.shape != cand.shape:
            return float("inf")
        ref = ref.detach().double()
        scale = ref.abs().max().item() if ref.numel() else 0.0
        diff = (ref - cand.detach().double()).abs().max().item() if ref.numel() else 0.0
        if diff == 0.0:
            continue
        worst = max(worst, diff / scale if scale > 0 else float("inf"))
    return worst


def perturbed(inputs: tuple[Tensor, ...], scale: float, seed: int = 1) -> tuple[Tensor, ...]:
    """``inputs`` times ``1 + scale * N(0, 1)``, elementwise (float tensors only)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        t * (1 + scale * torch.randn(t.shape, generator=generator, dtype=t.dtype))
        if t.is_floating_point() else t
        for t in inputs)


def sensitivity(model64: Callable, inputs64: tuple[Tensor, ...],
                reference: list[Tensor] | None = None) -> float:
    """How far the float64 output moves when the input moves by :data:`PERTURBATION`
    (relative): the largest over :data:`PROBES` of the output change, scaled to that
    perturbation (a smooth model moves in proportion; a ranking or a threshold that one of the
    larger probes flips moves by O(1), which no fold can be held to)."""
    if reference is None:
        reference = outputs(model64, inputs64)
    return max(rel_error(reference, outputs(model64, perturbed(inputs64, scale)))
               * PERTURBATION / scale for scale in PROBES)


class _CallCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.inside: list[str] = []  # paths of the BatchNorm modules running now
        self.functional: set[str] = set()  # BatchNorm modules that call F.batch_norm

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _CONVS:
            self.counts["conv"] += 1
        elif func in _BATCH_NORMS and self.inside:
            self.functional.add(self.inside[-1])
        elif func in _BATCH_NORMS:
            self.counts["batchnorm"] += 1
            self.counts["batchnorm:functional"] += 1
        return func(*args, **(kwargs or {}))


def op_counts(model: nn.Module, inputs: tuple[Tensor, ...]
              ) -> tuple[Counter, list[str], set[str]]:
    """Conv and BatchNorm calls of one run of ``model``, the paths of the BatchNorm modules
    called (in call order, a path once per call), and those of the ones that call
    ``F.batch_norm`` (what :func:`batchnorm_sites` needs to know)."""
    counter = _CallCounter()
    called: list[str] = []
    handles = []
    for path, module in model.named_modules():
        if not is_batchnorm(module):
            continue

        def enter(mod, args, path=path):
            counter.inside.append(path)
            counter.counts["batchnorm"] += 1
            called.append(path)

        def leave(mod, args, out):
            counter.inside.pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        with counter, torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counter.counts, called, counter.functional


# Reads of a tensor's metadata, not of its values; views that keep every element.
_METADATA = {"ndim", "shape", "size", "dim", "device", "dtype", "numel", "nelement", "stride",
             "is_floating_point", "is_contiguous", "__len__", "layout", "requires_grad",
             "is_cuda", "element_size", "storage_offset", "data_ptr", "get_device"}
_VIEWS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
          "unsqueeze", "view_as", "reshape_as", "unflatten", "t", "dropout", "identity"}
# Functions that read only the metadata of their tensor arguments after the first (or of all).
_SHAPE_OF_REST = {"view_as", "reshape_as", "expand_as", "type_as"}
_SHAPE_OF_ALL = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                 "new_zeros", "new_ones", "new_empty", "new_full"}


@dataclass
class _Call:
    kind: str  # "conv", "linear", "batchnorm", a view's name, or the function's name
    inputs: list[int]  # ids of the tensors it reads
    padded: bool = False  # a conv with non-zero padding
    path: str = ""  # a BatchNorm module's path


class _Dataflow(TorchFunctionMode):
    """Which call produced each tensor and which calls read its values, over one run."""

    def __init__(self) -> None:
        super().__init__()
        self.producer: dict[int, _Call] = {}
        self.readers: dict[int, list[_Call]] = {}
        self.batchnorms: list[tuple[_Call, int]] = []  # (call, id of its output)
        self.keep: list[Tensor] = []  # keeps every tensor alive, so ids stay unique
        self.inside = 0  # > 0 inside a BatchNorm module recorded as one call
        self.paths: list[str] = []  # BatchNorm modules running now whose F.batch_norm counts

    def add(self, call: _Call, result: object, in_place: bool = False) -> None:
        outs = [t for t in tree_leaves(result) if isinstance(t, Tensor)]
        if not in_place and any(id(t) in call.inputs for t in outs):
            return  # returns its input unchanged (eval dropout, identity): not a read
        for tensor_id in call.inputs:
            self.readers.setdefault(tensor_id, []).append(call)
        for out in outs:
            self.keep.append(out)
            if in_place:  # a new value in the same tensor: later reads read this call's
                self.producer[id(out)] = call
            else:
                self.producer.setdefault(id(out), call)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = resolve_name(func) or getattr(func, "__name__", str(func))
        short = name.removesuffix(".__get__").rsplit(".", 1)[-1]
        if self.inside or short in _METADATA:
            return result
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        self.keep.extend(inputs)
        if func in _CONVS or short == "linear" or short in _SHAPE_OF_REST:
            inputs = inputs[:1]  # the weights, or a tensor whose shape is all that is read
        elif short in _SHAPE_OF_ALL:
            inputs = []
        call = _Call(short, [id(t) for t in inputs])
        if func in _CONVS:
            call.kind = "conv"
            padding = args[4] if len(args) > 4 else kwargs.get("padding", 0)
            call.padded = padding != "valid" and any(
                p != 0 for p in (padding if isinstance(padding, (tuple, list)) else [padding]))
        elif func in _BATCH_NORMS:
            call.kind = "batchnorm"
            call.path = self.paths[-1] if self.paths else "F.batch_norm"
            call.inputs = call.inputs[:1]
        in_place = kwargs.get("inplace") is True or short.startswith("__i") or (
            short.endswith("_") and not short.endswith("__"))
        self.add(call, result, in_place)
        if call.kind == "batchnorm":
            self.batchnorms.append((call, id(result)))
        return result

    def sole_reader(self, tensor_id: int) -> _Call | None:
        readers = self.readers.get(tensor_id, [])
        return readers[0] if len(readers) == 1 else None

    def source(self, tensor_id: int) -> tuple[_Call | None, int]:
        """The call producing ``tensor_id``, through views read only by the next one."""
        call = self.producer.get(tensor_id)
        while call is not None and call.kind in _VIEWS and call.inputs and (
                self.sole_reader(call.inputs[0]) is call):
            tensor_id = call.inputs[0]
            call = self.producer.get(tensor_id)
        return call, tensor_id

    def foldable(self, batchnorm: _Call, output_id: int) -> str:
        """Why ``batchnorm`` folds exactly into a neighbour ("" if no rule here says so)."""
        call, tensor_id = self.source(batchnorm.inputs[0])
        sole = self.sole_reader(tensor_id) is not None
        if call is not None and call.kind in ("conv", "linear") and sole:
            return f"its input comes from a {call.kind} read by nothing else"
        if call is not None and call.kind == "cat" and sole and all(
                (part := self.source(t))[0] is not None and part[0].kind in ("conv", "linear")
                and self.sole_reader(part[1]) is not None for t in call.inputs):
            return "its input concatenates convs read by nothing else"
        reader = self.sole_reader(output_id)
        while reader is not None and reader.kind in _VIEWS:
            outs = [i for i, c in self.producer.items() if c is reader]
            reader = self.sole_reader(outs[0]) if len(outs) == 1 else None
        if reader is not None and reader.kind == "linear":
            return "its output goes only to a linear"
        if reader is not None and reader.kind == "conv" and not reader.padded:
            return "its output goes only to an unpadded conv"
        return ""


def batchnorm_sites(model: nn.Module, inputs: tuple[Tensor, ...], functional: set[str]
                    ) -> list[tuple[str, str]]:
    """``(path, why it folds)`` for every BatchNorm call of one run of ``model``; ``why`` is
    empty where neither its producer nor its reader offers an exact fold (an independent,
    local rule: a conv/linear producer or reader, through views, read by nothing else).

    A BatchNorm module that calls ``F.batch_norm`` (possibly with more around it, like an
    activation) is that call; one that does not (a frozen BatchNorm's scale and shift) is
    one opaque call; ``functional``: the paths of the former (from :func:`op_counts`)."""
    flow = _Dataflow()
    handles = []
    for path, module in model.named_modules():
        if not is_batchnorm(module):
            continue
        if path in functional:
            def push(mod, args, path=path):
                flow.paths.append(path)

            def pop(mod, args, out):
                flow.paths.pop()

            handles.append(module.register_forward_pre_hook(push))
            handles.append(module.register_forward_hook(pop))
            continue

        def enter(mod, args):
            flow.keep.extend(a for a in args if isinstance(a, Tensor))
            flow.inside += 1

        def leave(mod, args, out, path=path):
            flow.inside -= 1
            call = _Call("batchnorm", [id(args[0])], path=path)
            flow.add(call, out)
            flow.batchnorms.append((call, id(out)))

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        with flow, torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [(call.path, flow.foldable(call, out)) for call, out in flow.batchnorms]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def where(exc: BaseException) -> str:
    """The innermost frame of ``exc`` inside repfuse (or the innermost at all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/repfuse/" in f.filename]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return ""
    return f"{frame.filename.split('/repfuse/')[-1]}:{frame.lineno} in {frame.name}"


@contextmanager
def collected_warnings() -> Iterator[list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages: list[str] = []
        yield messages
    messages.extend(str(w.message).splitlines()[0] for w in caught
                    if issubclass(w.category, repfuse.RepfuseWarning))


class OutputSubset(nn.Module):
    """``model`` returning only the tensor leaves of its output at ``indices`` (one input: a
    ``*inputs`` forward would itself be untraceable)."""

    def __init__(self, model: nn.Module, indices: list[int]) -> None:
        super().__init__()
        self.model, self.indices = model, list(indices)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        # an fx Proxy stands for a tensor while the model is traced
        leaves = [t for t in tree_leaves(self.model(x)) if isinstance(t, (Tensor, Proxy))]
        return tuple(leaves[i] for i in self.indices)


def matching_outputs(original: list[Tensor], deployed: list[Tensor]) -> list[int]:
    """``[]`` where the deploy form returns what the model returns; else, for each deployed
    output, the index of the model's output it equals (float32 closeness), in order. Both are
    lists of all tensor leaves (:func:`outputs` with ``floating=False``)."""
    if len(original) == len(deployed) and all(
            a.shape == b.shape for a, b in zip(original, deployed, strict=True)):
        return []
    found, start = [], 0
    for out in deployed:
        match = next((i for i in range(start, len(original))
                      if original[i].shape == out.shape
                      and rel_error([original[i]], [out]) <= 1e-4), None)
        if match is None:
            raise ValueError("the deploy form returns an output the model does not")
        found.append(match)
        start = match + 1
    return found


# --- one model -------------------------------------------------------------------------------


@dataclass
class Block:
    """One block of a chaotic model, fused alone on the input it gets in the original run."""

    path: str
    sensitivity: float
    error: float  # float64, fused block against the block; inf if fusing it failed
    failure: str = ""


@dataclass
class Evaluation:
    """Everything measured on one corpus model (plain data: numbers and strings)."""

    id: str
    input_shape: list[int]
    seconds_fuse: float = 0.0
    failure: str = ""  # what broke: "<stage>: <first line>" (empty if nothing did)
    failure_at: str = ""  # innermost repfuse frame of that failure
    partial: bool = False
    skipped: list[str] = field(default_factory=list)  # "path (Class): reason"
    specialized: int = 0
    warnings: list[str] = field(default_factory=list)
    rewrites: dict[str, int] = field(default_factory=dict)
    declined: list[dict] = field(default_factory=list)  # pass, node, reason, module_paths
    bn_before: int = -1
    bn_after: int = -1
    bn_deploy: int = -1
    bn_left: list[str] = field(default_factory=list)  # paths of BatchNorm modules still called
    bn_foldable: list[str] = field(default_factory=list)  # "path: why" of those that fold
    bn_unfoldable_before: int = -1  # BatchNorm calls of the original no local rule folds
    conv_before: int = -1
    conv_after: int = -1
    conv_deploy: int = -1
    deploy: str = ""
    # Where the deploy form drops outputs of the model (ultralytics' fuse() removes the
    # one-to-many head of end-to-end detectors): the model's outputs it still computes, and
    # the conv calls of repfuse's fusion of the model asked for those outputs only.
    deploy_outputs: list[int] = field(default_factory=list)
    conv_after_same_outputs: int = -1
    error64: float = float("nan")
    error32: float = float("nan")
    floor32: float = float("nan")  # the original in float32 against itself in float64
    sensitivity: float = float("nan")
    blocks: list[Block] = field(default_factory=list)  # only for chaotic models
    deploy_error64: float = float("nan")
    deploy_error32: float = float("nan")

    @property
    def chaotic(self) -> bool:
        return self.sensitivity > CHAOTIC

    def to_dict(self) -> dict:
        return asdict(self) | {"chaotic": self.chaotic}


def fuse_quietly(model: nn.Module, inputs: tuple[Tensor, ...],
                 messages: list[str] | None = None) -> nn.Module:
    with collected_warnings() as caught:
        fused = repfuse.fuse(model, inputs)
    if messages is not None:
        messages.extend(caught)
    return fused


def evaluate(spec: Spec, *, blocks: bool = True, keep: dict | None = None) -> Evaluation:
    """Build, fuse (float64 and float32), count and compare one corpus model.

    ``blocks``: judge a chaotic model block by block. ``keep``: a dict that receives the
    float32 models (``original``, ``fused``, ``deploy``; None where one failed) and the
    ``inputs``, for timing them.
    """
    model32 = build(spec)
    x32 = (example_input(spec),)
    x64 = tuple(t.double() for t in x32)
    model64 = copy.deepcopy(model32).double()
    result = Evaluation(spec.id, list(x32[0].shape))

    ref64 = outputs(model64, x64)
    result.floor32 = rel_error(ref64, outputs(model32, x32))
    result.sensitivity = sensitivity(model64, x64, ref64)
    counts, _, functional = op_counts(model32, x32)
    result.bn_before, result.conv_before = counts["batchnorm"], counts["conv"]
    result.bn_unfoldable_before = sum(
        1 for _, why in batchnorm_sites(model32, x32, functional) if not why)

    deploy32 = fused32 = None
    try:
        deploy32, result.deploy = deploy_form(spec, model32)
        counts, _, _ = op_counts(deploy32, x32)
        result.bn_deploy, result.conv_deploy = counts["batchnorm"], counts["conv"]
        result.deploy_outputs = matching_outputs(outputs(model32, x32, floating=False),
                                                 outputs(deploy32, x32, floating=False))
        reference = outputs(model64, x64, floating=False)
        kept = [reference[i] for i in result.deploy_outputs or range(len(reference))]
        result.deploy_error32 = rel_error(
            [t for t in kept if t.is_floating_point()], outputs(deploy32, x32))
        deploy64, _ = deploy_form(spec, model64)
        result.deploy_error64 = rel_error(
            [t for t in kept if t.is_floating_point()], outputs(deploy64, x64))
    except Exception as exc:
        result.deploy += f" (failed: {first_line(exc)})"

    stage = "fuse float64"
    try:
        start = time.perf_counter()
        fused64 = fuse_quietly(model64, x64)
        result.seconds_fuse = time.perf_counter() - start
        stage = "run fused float64"
        result.error64 = rel_error(ref64, outputs(fused64, x64))
        del fused64
        stage = "fuse float32"
        fused32 = fuse_quietly(model32, x32, result.warnings)
        stage = "run fused float32"
        result.error32 = rel_error(ref64, outputs(fused32, x32))
        stage = "count ops of fused float32"
        counts, result.bn_left, functional = op_counts(fused32, x32)
        result.bn_after, result.conv_after = counts["batchnorm"], counts["conv"]
        if counts["batchnorm:functional"]:
            result.bn_left.append(f"F.batch_norm x{counts['batchnorm:functional']}")
        result.bn_foldable = [f"{path}: {why}" for path, why
                              in batchnorm_sites(fused32, x32, functional) if why]
    except Exception as exc:
        result.failure = f"{stage}: {first_line(exc)}"
        result.failure_at = where(exc)
    if fused32 is not None:
        _record_history(result, fused32)
    if fused32 is not None and result.deploy_outputs:
        try:  # repfuse asked for only the outputs the deploy form still computes
            subset = OutputSubset(model32, result.deploy_outputs)
            fused_subset = fuse_quietly(subset, x32)
            counts, _, _ = op_counts(fused_subset, x32)
            result.conv_after_same_outputs = counts["conv"]
            if keep is not None:
                keep["fused_same_outputs"] = fused_subset
        except Exception as exc:
            result.failure = f"fuse the deploy form's outputs only: {first_line(exc)}"
            result.failure_at = where(exc)
    if keep is not None:
        keep.update(original=model32, fused=None if result.failure else fused32,
                    deploy=deploy32, inputs=x32)
    if blocks and result.chaotic:
        result.blocks = block_errors(model64, x64)
    return result


def _record_history(result: Evaluation, fused: nn.Module) -> None:
    info = repfuse.capture_info(fused)
    if info is not None:
        result.partial = info.partial
        result.skipped = [f"{s.path or '(the model)'} ({s.kind}): {s.reason}"
                          for s in info.skipped]
        result.specialized = len(info.specialized)
    record = repfuse.history(fused)
    result.rewrites = {k: v for k, v in record.counts().items() if v}
    result.declined = [d.to_dict() for d in record.declined]


# --- block by block --------------------------------------------------------------------------


def _first_calls(model: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, tuple]:
    """``path -> (args, kwargs)`` of each submodule's first call in one run of ``model``."""
    calls: dict[str, tuple] = {}
    handles = []
    for path, module in model.named_modules():
        def record(mod, args, kwargs, path=path):
            calls.setdefault(path, (args, kwargs))

        handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        outputs(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def block_errors(model64: nn.Module, inputs64: tuple[Tensor, ...]) -> list[Block]:
    """Fuse each maximal non-chaotic block of ``model64`` alone and compare it in float64.

    A block is a submodule called with tensors only; one whose own output is chaotic (see
    :func:`sensitivity`) is split into its children.
    """
    calls = _first_calls(model64, inputs64)
    found: list[Block] = []

    def visit(path: str, module: nn.Module) -> None:
        args, kwargs = calls.get(path, (None, None))
        if args is None:
            return  # not run on this input
        children = list(module.named_children())
        tensors = bool(args) and not kwargs and all(isinstance(a, Tensor) for a in args)
        if tensors:
            reference = outputs(module, args)
            moved = sensitivity(module, args, reference)
            if moved <= CHAOTIC or not children:
                found.append(_fuse_block(path, module, args, reference, moved))
                return
        for name, child in children:
            visit(f"{path}.{name}" if path else name, child)

    visit("", model64)
    return found


def _fuse_block(path: str, module: nn.Module, args: tuple[Tensor, ...],
                reference: list[Tensor], moved: float) -> Block:
    try:
        fused = fuse_quietly(module, args)
        return Block(path, moved, rel_error(reference, outputs(fused, args)))
    except Exception as exc:
        return Block(path, moved, float("inf"), first_line(exc))
