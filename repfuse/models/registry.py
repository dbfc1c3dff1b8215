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
fused model of any module layout loads into it with
:func:`repfuse.export.deploy.load_by_structure`, which pairs the conv and linear layers of the
two in execution order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repfuse.errors import ModelStructureError, UnknownModelError

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
            model onto it with :func:`repfuse.export.deploy.load_by_structure`.
        sparsify: For a model trained for sparsity: ``sparsify(model, seed)`` gives it the
            zeros that training leaves (BN γ, filters, heads), after the random BatchNorm
            statistics, which would otherwise overwrite them.
    """

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str
    supports_deploy: bool
    reparameterized: bool = False
    sparsify: Callable[[nn.Module, int], None] | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    description: str,
    supports_deploy: bool = False,
    reparameterized: bool = False,
    sparsify: Callable[[nn.Module, int], None] | None = None,
) -> Callable[[Factory], Factory]:
    """Register the decorated factory under ``name``; the factory itself is returned unchanged.

    Raises:
        ModelStructureError: (a ``ValueError``) if ``name`` is already registered (two models
            would silently shadow each other otherwise).
    """

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ModelStructureError(
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
            sparsify=sparsify,
        )
        return factory

    return decorate


def list_models() -> list[ModelSpec]:
    """All registered models, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``.

    Raises:
        UnknownModelError: (a ``KeyError``) if no model has that name; the message lists the
            known names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None


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
        UnknownModelError: (a ``KeyError``) if ``name`` is not registered.
        ModelStructureError: (a ``ValueError``) if ``deploy`` is asked of a model that has no
            deploy form.
    """
    spec = get_spec(name)
    if deploy and not spec.supports_deploy:
        raise ModelStructureError(
            f"model {name!r} has no hand-written deploy form; build it with deploy=False"
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = spec.factory(deploy=True) if deploy else spec.factory()
    if randomize_bn:
        randomize_bn_stats(model, seed)
    if spec.sparsify is not None:
        spec.sparsify(model, seed)
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
        ModelStructureError: (a ``ValueError``) if the keys differ (the message lists the
            missing and unexpected keys) or a tensor's shape does not match.
    """
    expected = set(deploy_model.state_dict())
    given = set(fused_state_dict)
    missing = sorted(expected - given)
    unexpected = sorted(given - expected)
    if missing or unexpected:
        model_name = type(deploy_model).__name__
        raise ModelStructureError(
            f"fused state dict does not match the deploy form {model_name}: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    try:
        deploy_model.load_state_dict(fused_state_dict, strict=True)
    except RuntimeError as error:  # shapes differ; load_state_dict names the tensors
        raise ModelStructureError(f"fused state dict does not fit the deploy form: {error}"
                                  ) from error
    return deploy_model
