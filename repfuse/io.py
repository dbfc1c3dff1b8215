"""Loading models safely and writing outputs atomically.

What ``MODEL`` may be, on the command line and in :func:`load_model`:

- the name of a model in :mod:`repfuse.models` (``resnet18``): built with a fixed seed;
- a state dict ``.pt``/``.pth`` (also ``{"state_dict": ...}`` or ``{"model": ...}``
  checkpoints) plus ``arch``: ``package.module:factory`` (called with no arguments) or a zoo
  name; loaded with ``torch.load(weights_only=True)``;
- a torch.export ``.pt2`` program;
- a whole pickled module (``torch.save(model)``) only with ``trust=True``: unpickling runs code
  from the file.

Outputs go to a temporary file in the destination folder and are renamed into place, so a
failure never leaves a half-written file and never touches the input.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from repfuse.errors import LoadError, RepfuseError, UnsafeLoadError


@dataclass
class LoadedModel:
    """A model plus where it came from and, when the source says, its example input shape."""

    module: nn.Module
    source: str
    input_shape: tuple[int, ...] | None = None
    path: Path | None = None


def _zoo_names() -> set[str]:
    from repfuse.models import list_models

    return {spec.name for spec in list_models()}


def import_factory(spec: str) -> Callable[[], nn.Module]:
    """``package.module:factory`` -> the callable (the current directory is importable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise LoadError(f"--arch must look like package.module:factory, got '{spec}'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise LoadError(f"cannot import '{module_name}' for --arch: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise LoadError(f"'{module_name}' has no callable '{attr}' for --arch")
    return factory


def build_arch(arch: str) -> nn.Module:
    """Instantiate ``arch``: a zoo model name or ``package.module:factory``."""
    if ":" not in arch and arch in _zoo_names():
        from repfuse.models import create_model

        return create_model(arch, randomize_bn=False)
    factory = import_factory(arch)
    try:
        model = factory()
    except Exception as exc:
        raise LoadError(f"calling {arch}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise LoadError(f"{arch}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _state_dict_in(obj: object) -> Mapping[str, Tensor] | None:
    """The tensor mapping in a loaded object: itself, or its 'state_dict'/'model' entry."""
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj
    for key in ("state_dict", "model", "model_state_dict"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(
            isinstance(v, Tensor) for v in inner.values()
        ):
            return inner
    return None


def _load_state_dict(model: nn.Module, state: Mapping[str, Tensor], arch: str, path: Path):
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {_few(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {_few(result.unexpected_keys)}")
    if problems:
        raise LoadError(f"state dict '{path}' does not fit --arch {arch}: " + "; ".join(problems))


def _few(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _load_pt2(path: Path) -> LoadedModel:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise LoadError(f"cannot load '{path}' as a torch.export program: {exc}") from exc
    shape = None
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_inputs = set(program.graph_signature.user_inputs)
    for node in placeholders:
        value = node.meta.get("val")
        if node.name in user_inputs and isinstance(value, Tensor):
            shape = tuple(int(s) for s in value.shape)
            break
    return LoadedModel(_plain_graph_module(program), f"torch.export program {path.name}", shape,
                       path)


def _plain_graph_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The program as an ordinary GraphModule that can be copied, put in eval mode and saved.

    ``ExportedProgram.module()`` wraps its graph in pytree code and an input-guard module,
    neither of which can be pickled; the plain module takes the user inputs positionally and
    returns a single output as itself (several outputs as a tuple).
    """
    unlifted = program.module()
    graph = copy.deepcopy(unlifted.graph)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    results = output.args[0]
    single = program.call_spec.out_spec is not None and program.call_spec.out_spec.is_leaf()
    if single and isinstance(results, (tuple, list)) and len(results) == 1:
        output.args = (results[0],)
    return torch.fx.GraphModule(unlifted, graph, "ExportedModule")


def load_model(spec: str, *, arch: str | None = None, trust: bool = False) -> LoadedModel:
    """Load ``spec`` (a zoo name or a file; see the module docstring) as an ``nn.Module``."""
    path = Path(spec)
    if not path.exists():
        if spec in _zoo_names():
            from repfuse.models import create_model, get_spec

            return LoadedModel(create_model(spec), f"zoo model {spec}",
                               tuple(get_spec(spec).input_shape))
        known = ", ".join(sorted(_zoo_names()))
        raise LoadError(f"no file or zoo model named '{spec}' (zoo models: {known})")
    if path.is_dir():
        raise LoadError(f"'{spec}' is a directory, not a model file")
    if path.suffix == ".pt2":
        return _load_pt2(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" not in str(exc) and "Weights only" not in str(exc):
            raise LoadError(f"cannot read '{spec}' as a PyTorch file: {exc}") from exc
        return _load_pickle(path, trust)
    state = _state_dict_in(obj)
    if state is None:
        raise LoadError(f"'{spec}' holds a {type(obj).__name__}, not a state dict or a model")
    if arch is None:
        raise LoadError(
            f"'{spec}' is a state dict; say which model it belongs to with "
            "--arch package.module:factory (or a zoo model name)"
        )
    model = build_arch(arch)
    _load_state_dict(model, state, arch, path)
    return LoadedModel(model, f"state dict {path.name} into {arch}", None, path)


def _load_pickle(path: Path, trust: bool) -> LoadedModel:
    if not trust:
        raise UnsafeLoadError(
            f"'{path}' is a pickled object, not a state dict: loading it can run arbitrary "
            "code. Re-run with --trust if you trust its source, or save model.state_dict() "
            "and pass --arch package.module:factory"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise LoadError(f"cannot unpickle '{path}': {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, nn.Module):
        raise LoadError(f"'{path}' holds a {type(obj).__name__}, not a torch.nn.Module")
    return LoadedModel(obj, f"pickled module {path.name}", None, path)


def infer_input_shape(model: nn.Module) -> tuple[tuple[int, ...], str]:
    """A guess at an example input shape from the first conv/linear layer, and what was assumed.

    Conv2d: ``(1, C, 224, 224)``; Conv1d: ``(1, C, 224)``; Conv3d: ``(1, C, 16, 112, 112)``;
    Linear: ``(1, in_features)``.
    """
    spatial_by_kind = ((nn.Conv1d, (224,)), (nn.Conv2d, (224, 224)), (nn.Conv3d, (16, 112, 112)))
    for name, module in model.named_modules():
        spatial = next((s for kind, s in spatial_by_kind if isinstance(module, kind)), None)
        if spatial is not None:
            shape = (1, module.in_channels, *spatial)
            return shape, f"assumed input shape {list(shape)} from the first conv '{name}'"
        if isinstance(module, nn.Linear):
            shape = (1, module.in_features)
            return shape, f"assumed input shape {list(shape)} from the first linear '{name}'"
    raise RepfuseError("cannot infer an input shape (no conv or linear layer): pass --input-shape")


def parse_shape(text: str) -> tuple[int, ...]:
    """``'1,3,224,224'`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise RepfuseError(
            f"bad --input-shape '{text}': expected integers like 1,3,224,224"
        ) from None
    if not shape or any(s <= 0 for s in shape):
        raise RepfuseError(f"bad --input-shape '{text}': expected positive integers")
    return shape


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()


def save_model(model: nn.Module, path: Path) -> None:
    """Write ``model`` by extension: ``.pt`` is ``torch.save`` of the (Graph)Module."""
    path = Path(path)
    if path.suffix != ".pt":
        raise RepfuseError(f"unsupported output type '{path.suffix}' for '{path}' (use .pt)")
    atomic_write(path, lambda tmp: torch.save(model, tmp))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
