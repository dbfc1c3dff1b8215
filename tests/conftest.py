"""Shared helpers of the test suite: the independent reference and the error measure.

The reference for every numerical check is the *unfused* model run in float64
(:func:`reference64`); :func:`rel_err` is ``max|a - b| / max|a|`` against it.
Test modules import the helpers with ``from conftest import ...``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import settings
from torch import Tensor, nn
from torch.fx import GraphModule

import repfuse
from repfuse.passes import PassResult
from repfuse.passes.base import STRICT_ENV

# A pass that raises while examining a candidate declines it (with a PassBugWarning) so a user's
# conversion goes on; in the test suite it fails the test instead.
os.environ[STRICT_ENV] = "1"

# Property tests (tests/property): "ci" by default; `pytest --hypothesis-profile=long` for the
# long run. max_examples counts per test.
settings.register_profile("ci", max_examples=120, deadline=None, print_blob=True)
settings.register_profile("long", max_examples=2100, deadline=None, print_blob=True)
settings.load_profile("ci")

F64_RTOL = 1e-10  # a fold computed in float64 on a float64 model
F32_RTOL = 1e-5  # a float32 fused model against the float64 unfused reference
TOLERANCE = {torch.float64: F64_RTOL, torch.float32: F32_RTOL}

# Positive cases run twice: the float64 fold must be exact, the float32 one close.
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32],
                                 ids=["float64", "float32"])


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors (property tests): faster, and much faster
    on a loaded machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test builds its layers from the same global seed, so failures reproduce."""
    torch.manual_seed(0)


def rel_err(reference: Tensor, candidate: Tensor) -> float:
    """``max|reference - candidate| / max|reference|``, computed in float64."""
    ref = reference.detach().to(torch.float64)
    diff = (ref - candidate.detach().to(torch.float64)).abs().max()
    return (diff / ref.abs().max()).item()


def random_input(shape: tuple[int, ...], seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """N(0, 1) values from a local generator (the global RNG is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def reference64(model: nn.Module, *inputs: Tensor) -> Tensor:
    """The unfused model, deep-copied to float64 in eval mode, on float64 inputs."""
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return ref(*(t.double() for t in inputs))


def randomize_bn(model: nn.Module, seed: int, dtype: torch.dtype = torch.float32,
                 mean_std: float = 1.0) -> nn.Module:
    """Random running statistics and affine parameters (signed weights) for every batch norm,
    drawn in ``dtype`` from a local generator, so folding is not the identity; ``model`` in
    eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator, dtype=dtype)
                                      * mean_std)
            module.running_var.copy_(torch.rand(c, generator=generator, dtype=dtype) + 0.5)
            module.weight.data.copy_(torch.randn(c, generator=generator, dtype=dtype))
            module.bias.data.copy_(torch.randn(c, generator=generator, dtype=dtype))
    return model.eval()


def signature(gm: GraphModule) -> list[tuple[str, str]]:
    """The graph as ``(op, target)`` pairs: equal before/after means the graph is unchanged."""
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


def modules_of(gm: nn.Module, *types: type) -> list[str]:
    """Paths of the submodules of ``gm`` that are instances of ``types``."""
    return [name for name, m in gm.named_modules() if isinstance(m, types)]


def calls_to(gm: GraphModule, *targets: object) -> int:
    """How many ``call_function``/``call_method`` nodes call one of ``targets``."""
    return sum(1 for n in gm.graph.nodes
               if n.op in ("call_function", "call_method") and n.target in targets)


def check_unchanged(
    model: nn.Module, shape: tuple[int, ...], run: Callable[[GraphModule], PassResult]
) -> tuple[PassResult, GraphModule]:
    """Trace a float64 copy of ``model`` on a random input of ``shape`` and run ``run``: no
    rewrite, the same graph (:func:`signature`), the same outputs as the model in float64."""
    model = model.double().eval()
    x = random_input(shape, dtype=torch.float64)
    gm = repfuse.trace(model, x)
    before = signature(gm)

    result = run(gm)

    assert result.rewrites == []
    assert signature(gm) == before
    with torch.no_grad():
        expected, actual = reference64(model, x), gm(x)
    if isinstance(expected, tuple):
        assert all(rel_err(e, a) <= F64_RTOL
                   for e, a in zip(expected, actual, strict=True))
    else:
        assert rel_err(expected, actual) <= F64_RTOL
    return result, gm


def fuse_checked(
    model: nn.Module,
    x: Tensor,
    run: Callable[[GraphModule], PassResult] = repfuse.passes.run_pipeline,
    dtype: torch.dtype = torch.float64,
) -> tuple[GraphModule, PassResult]:
    """Capture a ``dtype`` copy of ``model``, run ``run`` on it, check it numerically.

    The fused output must keep ``dtype`` and match the unfused model in float64 to
    :data:`TOLERANCE` ``[dtype]``. Returns the GraphModule and the :class:`PassResult` for the
    structural checks of the caller.
    """
    expected = reference64(model, x)
    gm = repfuse.trace(copy.deepcopy(model).to(dtype), x.to(dtype))
    result = run(gm)
    with torch.no_grad():
        actual = gm(x.to(dtype))
    assert actual.dtype == dtype
    assert rel_err(expected, actual) <= TOLERANCE[dtype]
    return gm, result
