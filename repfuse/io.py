"""Loading models safely and writing outputs atomically.

What ``MODEL`` may be, on the command line and in :func:`load_model`:

- the name of a model in :mod:`repfuse.models` (``resnet18``): built with a fixed seed;
- a state dict ``.pt``/``.pth`` (also ``{"state_dict": ...}`` or ``{"model": ...}``
  checkpoints) plus ``arch``: ``package.module:factory`` (called with no arguments) or a zoo
  name; loaded with ``torch.load(weights_only=True)``;
- a torch.export ``.pt2`` program; any ``torch.load`` inside its loading is made weights-only
  (torch.export would otherwise unpickle pickled weights and constants) unless ``trust=True``;
- an ``.onnx`` file, run by onnxruntime with graph optimizations disabled (a reference for
  ``repfuse verify``; it computes in its own dtype, and cannot be fused);
- a whole pickled module (``torch.save(model)``) only with ``trust=True``: unpickling runs code
  from the file.

Outputs go to a temporary file in the destination folder and are renamed into place, so a
failure never leaves a half-written file and never touches the input.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import pickle
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
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


def import_factory(spec: str, option: str = "--arch") -> Callable[[], nn.Module]:
    """``package.module:factory`` -> the callable (the current directory is importable).

    ``option`` names the command-line option in error messages.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise LoadError(f"{option} must look like package.module:factory, got '{spec}'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise LoadError(f"cannot import '{module_name}' for {option}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise LoadError(f"'{module_name}' has no callable '{attr}' for {option}")
    return factory


def build_arch(arch: str, option: str = "--arch") -> nn.Module:
    """Instantiate ``arch``: a zoo model name or ``package.module:factory``."""
    if ":" not in arch and arch in _zoo_names():
        from repfuse.models import create_model

        return create_model(arch, randomize_bn=False)
    factory = import_factory(arch, option)
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


@contextmanager
def _weights_only_loads(refused: list[str]) -> Iterator[None]:
    """Make every ``torch.load`` inside the block weights-only, even one that asks otherwise
    (torch.export.load unpickles pickled weights and constants with ``weights_only=False``);
    record in ``refused`` the loads that then fail."""
    original = torch.load

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except pickle.UnpicklingError as exc:
            refused.append(str(exc))
            raise

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original


def _load_pt2(path: Path, trust: bool = False) -> LoadedModel:
    # torch.export logs a traceback before raising on a bad file; the error says it in a line.
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.CRITICAL)
    refused: list[str] = []
    try:
        with nullcontext() if trust else _weights_only_loads(refused):
            program = torch.export.load(str(path))
    except Exception as exc:
        if refused:
            raise UnsafeLoadError(
                f"'{path}' holds pickled objects beyond tensors: loading it can run arbitrary "
                "code. Re-run with --trust if you trust its source"
            ) from exc
        raise LoadError(f"cannot load '{path}' as a torch.export program: {exc}") from exc
    finally:
        export_log.setLevel(level)
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


def _load_onnx(path: Path) -> LoadedModel:
    """An ONNX file run by onnxruntime (graph optimizations off), as a module; its example
    input shape is its first input's, a symbolic batch axis read as 1."""
    from repfuse.export import OnnxModel

    model = OnnxModel.from_file(path)
    return LoadedModel(model, f"ONNX model {path.name} (onnxruntime)", model.input_shape, path)


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
        return _load_pt2(path, trust)
    if path.suffix == ".onnx":
        return _load_onnx(path)
    if path.stat().st_size == 0:
        raise LoadError(f"'{spec}' is empty (0 bytes), not a model file")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if _needs_code(exc):
            return _load_pickle(path, trust)
        raise LoadError(f"cannot read '{spec}' as a PyTorch file: {_not_loadable(path, exc)}"
                        ) from exc
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


def _needs_code(exc: Exception) -> bool:
    """True when the weights-only unpickler stopped at a class or function it would have to
    import or call: a pickled object (a whole module), which only ``--trust`` may load. (An
    opcode it does not know means the bytes are no torch.save pickle at all.)"""
    text = str(exc)
    return "Weights only load failed" in text and "Unsupported operand" not in text


def _not_loadable(path: Path, exc: Exception) -> str:
    """Why ``path`` is not a file torch.load reads, in a few words, from its first bytes."""
    with open(path, "rb") as file:
        head = file.read(512)
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()),
                 type(exc).__name__).split(". ")[0]
    expected = ("expected a torch.save file (state dict or checkpoint; a whole module with "
                "--trust), a torch.export .pt2 or an .onnx file")
    if head.startswith(b"PK\x03\x04"):
        return f"a damaged or truncated torch.save archive ({first})"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle's PROTO opcode
        return f"a plain pickle, not a torch.save file; {expected}"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        return f"it is a text file; {expected}"
    return f"neither a zip archive nor a pickle; {expected}"


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


def check_destination(path: Path) -> Path:
    """Refuse, before any work is done, an output that cannot be written: its folder is missing,
    not a folder or not writable, or the path is a folder itself."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise RepfuseError(f"output '{path}' is a directory; give a file name")
    if not folder.exists():
        raise RepfuseError(f"the folder of output '{path}' does not exist; create '{folder}' "
                           "first")
    if not folder.is_dir():
        raise RepfuseError(f"output '{path}': '{folder}' is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RepfuseError(f"cannot write output '{path}': folder '{folder}' is not writable")
    return path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    A folder that cannot be written (or created) is a :class:`RepfuseError`; an error of
    ``write`` itself propagates. Either way ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                        dir=path.parent)
    except OSError as exc:
        raise RepfuseError(f"cannot write '{path}': {exc.strerror or exc}") from exc
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
    try:
        atomic_write(path, lambda tmp: torch.save(model, tmp))
    except (OSError, pickle.PicklingError) as exc:
        raise RepfuseError(f"cannot write '{path}': {_first_words(exc)}") from exc
    except (AttributeError, TypeError) as exc:
        if "pickle" not in str(exc):
            raise
        raise RepfuseError(f"cannot save the model to '{path}': it holds something that "
                           f"cannot be pickled ({_first_words(exc)})") from exc


def _first_words(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def write_text(path: Path, text: str) -> None:
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise RepfuseError(f"cannot write '{path}': {_first_words(exc)}") from exc
