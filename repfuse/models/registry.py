"""A registry of example models, and the plumbing to build them reproducibly.

Every model in :mod:`repfuse.models` is registered under a name with :func:`register_model`.
:func:`create_model` builds one deterministically from ``(name, seed)`` and, by default, gives
its BatchNorm layers random running statistics with :func:`randomize_bn_stats`: a freshly built
BatchNorm has ``running_mean = 0``, ``running_var = 1``, ``weight = 1`` and ``bias = 0``, so
folding it (Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift") would be the identity up to ``eps`` and would test nothing.

A model that ``supports_deploy`` can also be built in its hand-written *deploy form*: the same
module paths as the train form minus the BatchNorm modules, with a bias on every conv or linear
layer that a BatchNorm followed. A fused state dict loads into it with
:func:`load_fused_state_dict`. A *reparameterized* model's deploy form (RepVGG, ACNet, ...) has
one conv where the train form has several branches, so its paths are not the train form's; a
fused model of any module layout loads into it with :func:`load_by_structure`, which pairs the
conv and linear layers of the two in execution order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])

# Ranges of the random BatchNorm statistics. They put every per-channel scale
# weight / sqrt(running_var) in about [0.4, 2.1], far from identity. They need no shrinking:
# ResNet-50's logits on an N(0, 1) input reach max |y| ~ 1e2 with untouched BatchNorms (the
# fan_out He initialization is not variance-preserving once eval-mode BatchNorms stop
# renormalizing) and ~ 1e3 with these ranges (seeds 0-2): finite, and below the 1e4 that
# tests/test_models.py allows.
_MEAN_STD = 0.1
_VAR_RANGE = (0.5, 1.5)
_WEIGHT_RANGE = (0.5, 1.5)
_BIAS_STD = 0.1


@dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    Attributes:
        name: The registry name, e.g. ``"resnet18"``.
        factory: Builds the train form. If ``supports_deploy``, ``factory(deploy=True)`` builds
            the hand-written deploy form instead.
        input_shape: The default example input shape, batch 1, e.g. ``(1, 3, 224, 224)``.
        description: One line, citing the paper the architecture comes from.
        supports_deploy: Whether ``factory(deploy=True)`` is accepted.
        reparameterized: Whether the deploy form merges parallel branches (structural
            reparameterization: RepVGG, ACNet, DBB, ...) rather than only dropping BatchNorms.
            Its state dict then does not map key by key onto the train form's; map a fused
            model onto it with :func:`load_by_structure`.
    """

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str
    supports_deploy: bool
    reparameterized: bool = False


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    description: str,
    supports_deploy: bool = False,
    reparameterized: bool = False,
) -> Callable[[Factory], Factory]:
    """Register the decorated factory under ``name``; the factory itself is returned unchanged.

    Raises:
        ValueError: if ``name`` is already registered (two models would silently shadow each
            other otherwise).
    """

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(
                f"model name {name!r} is already registered by "
                f"{_REGISTRY[name].factory.__module__}.{_REGISTRY[name].factory.__qualname__}"
            )
        _REGISTRY[name] = ModelSpec(
            name=name,
            factory=factory,
            input_shape=tuple(input_shape),
            description=description,
            supports_deploy=supports_deploy,
            reparameterized=reparameterized,
        )
        return factory

    return decorate


def list_models() -> list[ModelSpec]:
    """All registered models, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``.

    Raises:
        KeyError: if no model has that name; the message lists the known names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown model {name!r}; known models: {known}") from None


def create_model(
    name: str,
    *,
    seed: int = 0,
    deploy: bool = False,
    randomize_bn: bool = True,
) -> nn.Module:
    """Build the registered model ``name`` deterministically, in eval mode.

    Parameters are initialized from ``torch.manual_seed(seed)`` inside
    :func:`torch.random.fork_rng`, so the caller's global RNG state is left as it was, and two
    calls with the same ``name`` and ``seed`` return bitwise identical state dicts.

    Args:
        name: A registered model name (see :func:`list_models`).
        seed: Seeds the parameter initialization and the BatchNorm statistics.
        deploy: Build the hand-written deploy form (no BatchNorm) instead of the train form.
        randomize_bn: Give every BatchNorm random statistics with :func:`randomize_bn_stats`.

    Raises:
        KeyError: if ``name`` is not registered.
        ValueError: if ``deploy`` is asked of a model that has no deploy form.
    """
    spec = get_spec(name)
    if deploy and not spec.supports_deploy:
        raise ValueError(
            f"model {name!r} has no hand-written deploy form; build it with deploy=False"
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = spec.factory(deploy=True) if deploy else spec.factory()
    if randomize_bn:
        randomize_bn_stats(model, seed)
    return model.eval()


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm in ``model`` random running statistics and affine parameters.

    For each ``_BatchNorm`` that tracks running statistics, in ``model.modules()`` order::

        running_mean ~ 0.1 * N(0, 1)        running_var ~ U(0.5, 1.5)
        weight       ~ U(0.5, 1.5)          bias        ~ 0.1 * N(0, 1)     (if affine)

    The draws come from a local :class:`torch.Generator` seeded with ``seed``, never the global
    RNG, and are cast to each tensor's dtype and device. Modifies ``model`` in place.

    Returns:
        ``model``.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(like: Tensor, std: float) -> Tensor:
        sample = torch.randn(like.shape, generator=generator) * std
        return sample.to(dtype=like.dtype, device=like.device)

    def uniform(like: Tensor, bounds: tuple[float, float]) -> Tensor:
        low, high = bounds
        sample = torch.rand(like.shape, generator=generator) * (high - low) + low
        return sample.to(dtype=like.dtype, device=like.device)

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _BatchNorm) or module.running_mean is None:
                continue  # no running statistics: it normalizes with batch statistics only
            module.running_mean.copy_(normal(module.running_mean, _MEAN_STD))
            module.running_var.copy_(uniform(module.running_var, _VAR_RANGE))
            if module.affine:
                module.weight.copy_(uniform(module.weight, _WEIGHT_RANGE))
                module.bias.copy_(normal(module.bias, _BIAS_STD))
    return model


def load_fused_state_dict(
    deploy_model: nn.Module, fused_state_dict: Mapping[str, Tensor]
) -> nn.Module:
    """Load a fused state dict into a deploy-form model (``strict=True``) and return the model.

    A fused model keeps the module paths of its train form minus the BatchNorm modules, e.g.
    ``layer1.0.conv1.weight``, ``layer1.0.conv1.bias``, ``layer1.0.downsample.0.weight``, which
    are exactly the keys of the hand-written deploy form.

    Raises:
        ValueError: if the keys differ (the message lists the missing and unexpected keys) or a
            tensor's shape does not match.
    """
    expected = set(deploy_model.state_dict())
    given = set(fused_state_dict)
    missing = sorted(expected - given)
    unexpected = sorted(given - expected)
    if missing or unexpected:
        model_name = type(deploy_model).__name__
        raise ValueError(
            f"fused state dict does not match the deploy form {model_name}: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    try:
        deploy_model.load_state_dict(fused_state_dict, strict=True)
    except RuntimeError as error:  # shapes differ; load_state_dict names the tensors
        raise ValueError(f"fused state dict does not fit the deploy form: {error}") from error
    return deploy_model


# The layers load_by_structure pairs up: those whose weights a fusion rewrites.
_STRUCTURAL_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
_CONV_HYPERPARAMETERS = ("stride", "padding", "dilation", "groups", "output_padding")


def _structural_layers(
    model: nn.Module,
) -> tuple[torch.fx.GraphModule, list[tuple[str, nn.Module]]]:
    """``model``'s fx graph and its ``(path, layer)`` calls of :data:`_STRUCTURAL_LAYERS`, in
    graph order, which is execution order. A GraphModule is read as it is; any other module is
    traced with ``torch.fx.symbolic_trace`` in eval mode (its mode is restored afterwards)."""
    if isinstance(model, torch.fx.GraphModule):
        graph_module = model
    else:
        was_training = model.training
        model.eval()
        try:
            graph_module = torch.fx.symbolic_trace(model)
        finally:
            model.train(was_training)
    layers = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        # A call_module target is a path in the traced root, so it names the layer in ``model``.
        layer = model.get_submodule(node.target)
        if isinstance(layer, _STRUCTURAL_LAYERS):
            layers.append((node.target, layer))
    return graph_module, layers


def _layer_signature(layer: nn.Module) -> dict[str, Any]:
    """What two layers must share for one's weights to replace the other's."""
    signature: dict[str, Any] = {"type": type(layer).__name__}
    signature["weight"] = tuple(layer.weight.shape)
    if isinstance(layer, nn.modules.conv._ConvNd):
        for name in _CONV_HYPERPARAMETERS:
            signature[name] = getattr(layer, name)
        signature["padding_mode"] = layer.padding_mode
    return signature


def _describe_layer(path: str, signature: Mapping[str, Any]) -> str:
    details = ", ".join(f"{key} {value}" for key, value in signature.items() if key != "type")
    return f"{path!r} {signature['type']}({details})"


class _OutputShapeRecorder(torch.fx.Interpreter):
    """Runs a GraphModule and records the output shape of each call of the given layer paths."""

    def __init__(self, graph_module: torch.fx.GraphModule, paths: set[str]) -> None:
        super().__init__(graph_module)
        self.paths = paths
        self.shapes: list[tuple[int, ...]] = []

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        output = super().call_module(target, args, kwargs)
        if target in self.paths:
            self.shapes.append(tuple(output.shape))
        return output


def _layer_output_shapes(
    model: nn.Module,
    graph_module: torch.fx.GraphModule,
    layers: list[tuple[str, nn.Module]],
    example_inputs: Sequence[Tensor],
) -> list[tuple[int, ...]]:
    """The output shape of every layer call, in execution order, on ``example_inputs`` cast to
    the dtype and device of ``model``'s first floating-point tensor."""
    reference = next(
        (t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None
    )
    inputs = [
        t.to(reference) if reference is not None and t.is_floating_point() else t
        for t in example_inputs
    ]
    recorder = _OutputShapeRecorder(graph_module, {path for path, _ in layers})
    was_training = graph_module.training
    graph_module.eval()
    try:
        with torch.no_grad():
            recorder.run(*inputs)
    finally:
        graph_module.train(was_training)
    return recorder.shapes


def load_by_structure(
    deploy_model: nn.Module,
    fused: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
) -> nn.Module:
    """Copy the conv and linear weights of ``fused`` into ``deploy_model``, pairing the layers
    by execution order rather than by name, and return ``deploy_model``.

    ``fused`` is typically the ``torch.fx.GraphModule`` that repfuse makes of a train-form
    model: its layers sit at paths of its own choosing. Both models' fx graphs are read (a
    GraphModule's own graph; anything else traced with ``torch.fx.symbolic_trace`` in eval
    mode), and the ``call_module`` nodes of ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``
    and ``nn.Linear`` are listed in graph order and zipped. Each pair must have the same type,
    weight shape and conv hyperparameters (stride, padding, dilation, groups, output padding,
    padding mode), and the same output shape when both models run on ``example_inputs`` (cast
    to each model's dtype and device). Then each pair's weight is copied, and its bias: a
    missing bias counts as zero, so a deploy layer without bias accepts only a zero bias.

    Parameters and buffers of ``deploy_model`` outside those layers (there are typically none)
    are copied from the tensor of the same name in ``fused`` if it has one, and left as they
    are otherwise.

    Nothing is copied unless every check passes.

    Raises:
        ValueError: if the layer counts differ, or for the first pair that does not match
            (its index and both layers' paths and shapes), or if a same-named tensor outside
            the layers has another shape.
    """
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    deploy_graph, deploy_layers = _structural_layers(deploy_model)
    fused_graph, fused_layers = _structural_layers(fused)
    if len(deploy_layers) != len(fused_layers):
        raise ValueError(
            f"the deploy model runs {len(deploy_layers)} conv/linear layers but the fused model "
            f"runs {len(fused_layers)}; they do not have the same structure"
        )

    for index, ((deploy_path, deploy_layer), (fused_path, fused_layer)) in enumerate(
        zip(deploy_layers, fused_layers, strict=True)
    ):
        deploy_signature = _layer_signature(deploy_layer)
        fused_signature = _layer_signature(fused_layer)
        if deploy_signature != fused_signature:
            raise ValueError(
                f"layer {index} in execution order differs: deploy "
                f"{_describe_layer(deploy_path, deploy_signature)} but fused "
                f"{_describe_layer(fused_path, fused_signature)}"
            )
        fused_bias = fused_layer.bias
        if deploy_layer.bias is None and fused_bias is not None and fused_bias.count_nonzero():
            raise ValueError(
                f"layer {index} in execution order differs: deploy {deploy_path!r} has no bias "
                f"but fused {fused_path!r} has a nonzero one"
            )

    deploy_shapes = _layer_output_shapes(deploy_model, deploy_graph, deploy_layers, example_inputs)
    fused_shapes = _layer_output_shapes(fused, fused_graph, fused_layers, example_inputs)
    for index, (deploy_shape, fused_shape) in enumerate(
        zip(deploy_shapes, fused_shapes, strict=True)
    ):
        if deploy_shape != fused_shape:
            raise ValueError(
                f"layer {index} in execution order differs: deploy {deploy_layers[index][0]!r} "
                f"outputs shape {deploy_shape} but fused {fused_layers[index][0]!r} outputs "
                f"{fused_shape} on the example inputs"
            )

    # A layer called twice (shared weights) must be paired with the same weights both times.
    paired: dict[int, tuple[str, nn.Module]] = {}
    for index, ((deploy_path, deploy_layer), (fused_path, fused_layer)) in enumerate(
        zip(deploy_layers, fused_layers, strict=True)
    ):
        earlier_path, earlier = paired.setdefault(id(deploy_layer), (fused_path, fused_layer))
        if earlier is not fused_layer and not torch.equal(earlier.weight, fused_layer.weight):
            raise ValueError(
                f"layer {index} in execution order differs: deploy {deploy_path!r} is called "
                f"again but is paired with fused {fused_path!r} this time and with "
                f"{earlier_path!r} before, whose weights differ"
            )

    deploy_paths = {path for path, _ in deploy_layers}
    fused_tensors = dict(fused.named_parameters()) | dict(fused.named_buffers())
    other_tensors = {}
    for name, tensor in (*deploy_model.named_parameters(), *deploy_model.named_buffers()):
        if name.rpartition(".")[0] in deploy_paths or name not in fused_tensors:
            continue  # a paired layer's own tensor, or nothing of that name to copy
        if fused_tensors[name].shape != tensor.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} in the deploy model but "
                f"{tuple(fused_tensors[name].shape)} in the fused model"
            )
        other_tensors[name] = (tensor, fused_tensors[name])

    with torch.no_grad():
        for (_, deploy_layer), (_, fused_layer) in zip(deploy_layers, fused_layers, strict=True):
            deploy_layer.weight.copy_(fused_layer.weight)
            if deploy_layer.bias is None:
                continue
            if fused_layer.bias is None:
                deploy_layer.bias.zero_()
            else:
                deploy_layer.bias.copy_(fused_layer.bias)
        for tensor, source in other_tensors.values():
            tensor.copy_(source)
    return deploy_model
