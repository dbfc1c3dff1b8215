"""Deploy-form weights: the fused model's weights in the user's own deploy-form class.

A reparameterized model's hand-written deploy form (RepVGG with ``deploy=True``, ...) has one
conv where the train form has several branches, so its module paths are not the fused model's.
:func:`load_by_structure` pairs the conv and linear layers of the two in execution order
(types, shapes and hyperparameters checked) and copies the weights; no key renaming.
:func:`export_deploy_state_dict` does that for ``--deploy-arch``, writes the deploy model's state
dict, and checks it loaded into a fresh deploy model like every export.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from repfuse.capture import ExampleInputs
from repfuse.errors import ExportError, ModelStructureError, RepfuseError, first_line
from repfuse.export.base import ExportResult, FileExport
from repfuse.io import build_arch
from repfuse.verify import DEFAULT_VERIFY, VerifyOptions, eval_copy


def build_deploy_model(spec: str) -> nn.Module:
    """The deploy-form model ``spec`` names: a zoo model with a hand-written deploy form
    (``repvgg_a0``), or ``package.module:factory`` called with no arguments."""
    return build_arch(spec, option="--deploy-arch", deploy=True)


def export_deploy_state_dict(
    fused: nn.Module,
    example_inputs: ExampleInputs | None,
    path: str | Path,
    deploy_arch: str | Callable[[], nn.Module],
    *,
    reference: nn.Module | None = None,
    verify: VerifyOptions = DEFAULT_VERIFY,
    reference_name: str = "reference",
    force: bool = False,
) -> ExportResult:
    """Load ``fused``'s weights into the user's deploy-form model by structure
    (:func:`load_by_structure`: conv/linear layers paired in execution order, shapes and
    hyperparameters checked), and write that model's state dict.

    ``deploy_arch`` is a spec for :func:`build_deploy_model` or a factory. The check loads the
    written state dict with ``torch.load(weights_only=True)`` into a fresh deploy model
    (``strict=True``) and compares it with ``reference`` (default ``fused``).
    """
    job = FileExport.of(fused, example_inputs, path, reference=reference, verify=verify,
                        reference_name=reference_name, force=force)
    name = deploy_arch if isinstance(deploy_arch, str) else getattr(
        deploy_arch, "__qualname__", repr(deploy_arch))

    def new_deploy_model() -> nn.Module:
        if isinstance(deploy_arch, str):
            return build_deploy_model(deploy_arch).eval()
        model = deploy_arch()
        if not isinstance(model, nn.Module):
            raise ExportError(f"{name}() returned {type(model).__name__}, not a torch.nn.Module")
        return model.eval()

    deploy = new_deploy_model()
    try:
        load_by_structure(deploy, job.model, job.example)
    except RepfuseError as exc:
        raise ExportError(f"the fused weights do not fit --deploy-arch {name}: {exc}") from exc
    except Exception as exc:
        raise ExportError(f"the fused weights do not fit --deploy-arch {name}: "
                          f"{first_line(exc)}") from exc
    state = {k: v.detach().cpu() for k, v in deploy.state_dict().items()}

    def save(artifact: Path) -> nn.Module:
        torch.save(state, artifact)
        fresh = new_deploy_model()
        fresh.load_state_dict(torch.load(artifact, weights_only=True), strict=True)
        return fresh

    details = {"deploy_arch": name, "deploy_class": type(deploy).__name__,
               "run_by": f"{type(deploy).__name__}.load_state_dict(strict=True)"}
    return job.write("deploy_state_dict", save, details)


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
    traced with ``torch.fx.symbolic_trace`` as an eval-mode copy (same paths; ``model`` itself
    is left as it is)."""
    if isinstance(model, torch.fx.GraphModule):
        graph_module = model
    else:
        graph_module = torch.fx.symbolic_trace(eval_copy(model))
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
    # an eval-mode copy runs: the graph calls the user's own modules otherwise
    recorder = _OutputShapeRecorder(eval_copy(graph_module), {path for path, _ in layers})
    with torch.no_grad():
        recorder.run(*inputs)
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
        ModelStructureError: (a ``ValueError``) if the layer counts differ, or for the first
            pair that does not match (its index and both layers' paths and shapes), or if a
            same-named tensor outside the layers has another shape.
    """
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    deploy_graph, deploy_layers = _structural_layers(deploy_model)
    fused_graph, fused_layers = _structural_layers(fused)
    if len(deploy_layers) != len(fused_layers):
        raise ModelStructureError(
            f"the deploy model runs {len(deploy_layers)} conv/linear layers but the fused model "
            f"runs {len(fused_layers)}; they do not have the same structure"
        )

    for index, ((deploy_path, deploy_layer), (fused_path, fused_layer)) in enumerate(
        zip(deploy_layers, fused_layers, strict=True)
    ):
        deploy_signature = _layer_signature(deploy_layer)
        fused_signature = _layer_signature(fused_layer)
        if deploy_signature != fused_signature:
            raise ModelStructureError(
                f"layer {index} in execution order differs: deploy "
                f"{_describe_layer(deploy_path, deploy_signature)} but fused "
                f"{_describe_layer(fused_path, fused_signature)}"
            )
        fused_bias = fused_layer.bias
        if deploy_layer.bias is None and fused_bias is not None and fused_bias.count_nonzero():
            raise ModelStructureError(
                f"layer {index} in execution order differs: deploy {deploy_path!r} has no bias "
                f"but fused {fused_path!r} has a nonzero one"
            )

    deploy_shapes = _layer_output_shapes(deploy_model, deploy_graph, deploy_layers, example_inputs)
    fused_shapes = _layer_output_shapes(fused, fused_graph, fused_layers, example_inputs)
    for index, (deploy_shape, fused_shape) in enumerate(
        zip(deploy_shapes, fused_shapes, strict=True)
    ):
        if deploy_shape != fused_shape:
            raise ModelStructureError(
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
            raise ModelStructureError(
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
            raise ModelStructureError(
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
