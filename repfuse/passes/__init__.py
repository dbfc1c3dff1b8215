"""The passes of repfuse, their registry and the default pipeline.

Each pass is usable alone on a GraphModule (``repfuse.passes.fold_batchnorm(gm)``) and returns
a :class:`PassResult` listing what it rewrote and what it declined, with reasons. Passes that
need shapes read them from ``node.meta['tensor_meta']``: capture the model with
:func:`repfuse.trace` first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch.fx import GraphModule

from repfuse.errors import RepfuseError
from repfuse.passes.base import (
    Decline,
    Pass,
    PassResult,
    Rewrite,
    Rewriter,
    history,
    run_passes,
)
from repfuse.passes.cleanup import RemoveNoops
from repfuse.passes.constants import FoldConstants
from repfuse.passes.equalize import Equalize
from repfuse.passes.fold_affine import FoldBatchNorm, FoldScaleBias
from repfuse.passes.metadata import ResolveMetadata
from repfuse.passes.pooling import HoistGlobalPool
from repfuse.passes.prune import PruneBelow, PruneDead
from repfuse.passes.reparam import ComposeLinear, MergeBranches, MergePadding
from repfuse.passes.siblings import MergeSiblings

REGISTRY: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (ResolveMetadata, RemoveNoops, FoldConstants, FoldBatchNorm, FoldScaleBias,
                MergePadding, ComposeLinear, MergeBranches, HoistGlobalPool, PruneDead,
                MergeSiblings, Equalize, PruneBelow)
}

# The default pipeline, in the order passes are tried at each node. Passes of a later stage
# (``Pass.stage``: prune_dead, then merge_siblings) run once the earlier ones have reached their
# fixed point. prune_below (approximate) is never in it.
DEFAULT_PIPELINE: tuple[str, ...] = (
    "resolve_metadata",
    "remove_noops",
    "fold_constants",
    "fold_batchnorm",
    "fold_scale_bias",
    "merge_padding",
    "compose_linear",
    "merge_branches",
    "hoist_global_pool",
    "prune_dead",
    "merge_siblings",
)


def resolve(
    names: Iterable[str | Pass] | str | None, *, allow_costlier: bool = False
) -> list[Pass]:
    """Pass objects for ``names`` (a list or a comma-separated string); None: the defaults.

    ``allow_costlier`` sets the option of that name on the passes that have it (merges that
    the cost model says do not pay are then applied too). A list may also hold pass objects
    with their options set, e.g. ``PruneBelow(threshold=1e-3)``.
    """
    if names is None:
        names = DEFAULT_PIPELINE
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    passes = []
    for name in names:
        if isinstance(name, Pass):
            passes.append(name)
            continue
        if name not in REGISTRY:
            known = ", ".join(REGISTRY)
            raise RepfuseError(f"unknown pass '{name}'; known passes: {known}")
        cls = REGISTRY[name]
        options = {"allow_costlier": True} if allow_costlier and _has_option(
            cls, "allow_costlier") else {}
        passes.append(cls(**options))
    if not passes:
        raise RepfuseError("no passes given")
    return passes


def _has_option(cls: type[Pass], option: str) -> bool:
    return option in getattr(cls, "__dataclass_fields__", {})


def _single(cls: type[Pass]):
    def run(gm: GraphModule) -> PassResult:
        return run_passes(gm, [cls()])

    run.__name__ = cls.name
    run.__doc__ = f"Run only ``{cls.name}`` on ``gm`` in place: {cls.summary}."
    return run


resolve_metadata = _single(ResolveMetadata)
remove_noops = _single(RemoveNoops)
fold_constants = _single(FoldConstants)
fold_batchnorm = _single(FoldBatchNorm)
fold_scale_bias = _single(FoldScaleBias)
merge_padding = _single(MergePadding)
compose_linear = _single(ComposeLinear)
merge_branches = _single(MergeBranches)
hoist_global_pool = _single(HoistGlobalPool)
prune_dead = _single(PruneDead)
merge_siblings = _single(MergeSiblings)


def run_pipeline(
    gm: GraphModule, names: Sequence[str | Pass] | str | None = None, *,
    allow_costlier: bool = False,
) -> PassResult:
    """Run the named passes (default: :data:`DEFAULT_PIPELINE`) on ``gm`` to a fixed point,
    stage by stage (see :attr:`Pass.stage`)."""
    passes = resolve(names, allow_costlier=allow_costlier)
    result = PassResult(())
    for stage in sorted({p.stage for p in passes}):
        result.extend(run_passes(gm, [p for p in passes if p.stage == stage]))
    return result


__all__ = [
    "DEFAULT_PIPELINE", "REGISTRY", "ComposeLinear", "Decline", "FoldBatchNorm", "FoldConstants",
    "FoldScaleBias", "HoistGlobalPool", "MergeBranches", "MergePadding", "MergeSiblings", "Pass",
    "PassResult", "PruneBelow", "PruneDead", "RemoveNoops", "ResolveMetadata", "Rewrite",
    "Rewriter", "compose_linear", "fold_batchnorm", "fold_constants", "fold_scale_bias",
    "history", "hoist_global_pool", "merge_branches", "merge_padding", "merge_siblings",
    "prune_dead", "remove_noops", "resolve", "resolve_metadata", "run_passes", "run_pipeline",
]
