"""Loading models safely and writing outputs atomically.

What ``MODEL`` may be, on the command line and in :func:`load_model`:

- the name of a model in :mod:`repfuse.models` (``resnet18``): built with a fixed seed;
- a state dict ``.pt``/``.pth`` (also ``{"state_dict": ...}`` or ``{"model": ...}``
  checkpoints) plus ``arch``: ``package.module:factory`` (called with no arguments) or a zoo
  name; loaded with ``torch.load(weights_only=True)``;
- a torch.export ``.pt2`` program; any ``torch.load`` inside its loading is made weights-only
  (torch.export would otherwise unpickle pickled weights and constants) unless ``trust=True``;
- an ``.onnx`` file, run by onnxruntime with graph optimizations disabled (:class:`OnnxModel`:
  a reference for ``repfuse verify``; it computes in its own dtype, and cannot be fused);
- a whole pickled module (``torch.save(model)``) only with ``trust=True``: unpickling runs code
  from the file, and the current directory is importable, as for ``--arch``, so a class
  defined in a file there is found.

Outputs go to a temporary file in the destination folder and are renamed into place, so a
failure never leaves a half-written file and never touches the input. Every destination can be
checked before any work (:func:`check_destination`, :func:`check_folder_destination`): each
is probed by creating and removing a file there.

This module loads and writes; it knows no exporter (:mod:`repfuse.export` builds on it).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import logging
import os
import pickle
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from repfuse.errors import LoadError, RepfuseError, UnsafeLoadError
from repfuse.models import create_model, get_spec, list_models

# ONNX tensor element types onnxruntime reports, as torch dtypes.
_ORT_DTYPES = {
    "tensor(float)": torch.float32, "tensor(double)": torch.float64,
    "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32, "tensor(int16)": torch.int16, "tensor(int8)": torch.int8,
    "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool,
}


@dataclass
class LoadedModel:
    """A model plus where it came from and, when the source says, its example input shapes
    (one per input, in the order of its forward's parameters)."""

    module: nn.Module
    source: str
    input_shapes: list[tuple[int, ...]] | None = None
    path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The first input's shape (the only one, for most models)."""
        return self.input_shapes[0] if self.input_shapes else None


def _zoo_names() -> set[str]:
    return {spec.name for spec in list_models()}


def _importable_working_directory() -> None:
    """Put the current directory on ``sys.path``, as ``python -m`` would: ``--arch``,
    ``--inputs`` factories and the classes of a ``--trust`` pickle are found there."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def import_factory(spec: str, option: str = "--arch") -> Callable[[], nn.Module]:
    """``package.module:factory`` -> the callable (the current directory is importable).

    ``option`` names the command-line option in error messages.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise LoadError(f"{option} must look like package.module:factory, got '{spec}'")
    _importable_working_directory()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise LoadError(f"cannot import '{module_name}' for {option}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise LoadError(f"'{module_name}' has no callable '{attr}' for {option}")
    return factory


def check_arch_spec(arch: str, option: str = "--arch", *, deploy: bool = False) -> None:
    """Raise unless ``arch`` is a zoo model name (with a hand-written deploy form, for
    ``deploy``) or an importable ``package.module:factory``; nothing is called."""
    if ":" in arch:
        import_factory(arch, option)
        return
    if arch not in _zoo_names():
        known = ", ".join(s.name for s in list_models() if s.supports_deploy or not deploy)
        raise LoadError(f"{option} must be package.module:factory or a zoo model name, got "
                        f"'{arch}' (zoo models: {known})")
    if deploy and not get_spec(arch).supports_deploy:
        raise LoadError(f"zoo model '{arch}' has no hand-written deploy form for {option}")


def build_arch(arch: str, option: str = "--arch", *, deploy: bool = False) -> nn.Module:
    """Instantiate ``arch``: a zoo model name (its hand-written deploy form with ``deploy``)
    or ``package.module:factory`` (called with no arguments)."""
    if ":" not in arch:
        check_arch_spec(arch, option, deploy=deploy)
        return create_model(arch, deploy=deploy, randomize_bn=False)
    factory = import_factory(arch, option)  # all check_arch_spec checks of a factory spec
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
    shapes = []
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_inputs = set(program.graph_signature.user_inputs)
    for node in placeholders:
        value = node.meta.get("val")
        if node.name in user_inputs and isinstance(value, Tensor):
            # a dynamic axis is a symbol; its example size is the hint torch.export traced at
            shapes.append(tuple(_size_hint(s) for s in value.shape))
    return LoadedModel(_plain_graph_module(program), f"torch.export program {path.name}",
                       shapes or None, path)


def _size_hint(size: object) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else 1


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


class OnnxModel(nn.Module):
    """An ONNX model run by onnxruntime, callable like a module: tensors in, tensors out.

    Graph optimizations are disabled, so what runs is the exported graph itself. Inputs are
    cast to the element types the model declares; outputs come back as CPU tensors (one
    tensor, or a tuple for several outputs, in the model's output order). Converting the module
    to another dtype changes nothing: the model computes in its own types. Its deployment dtype
    (what :func:`repfuse.verify.verify` reads from the first floating buffer) is that of its
    first floating input. Deep copies share the session.
    """

    def __init__(self, session, name: str = "onnx model") -> None:
        super().__init__()
        self.session = session
        self.name = name
        self.input_dtypes = [self._dtype(meta) for meta in session.get_inputs()]
        floating = [d for d in self.input_dtypes if d.is_floating_point]
        dtype = floating[0] if floating else torch.float32
        self.register_buffer("deploy_dtype_marker", torch.empty(0, dtype=dtype), persistent=False)

    @classmethod
    def from_file(cls, path: str | Path) -> OnnxModel:
        """Load ``path`` into an onnxruntime session with graph optimizations disabled."""
        # onnxruntime is imported where an ONNX file is read: loading it costs every command
        # that never sees one.
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            session = ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise LoadError(f"cannot load '{path}' as an ONNX model: {_first_words(exc)}"
                            ) from exc
        return cls(session, Path(path).name)

    def _dtype(self, meta) -> torch.dtype:
        if meta.type not in _ORT_DTYPES:
            raise LoadError(f"{self.name}: input '{meta.name}' has type {meta.type}, which "
                            "repfuse cannot feed")
        return _ORT_DTYPES[meta.type]

    @property
    def input_names(self) -> list[str]:
        return [meta.name for meta in self.session.get_inputs()]

    @property
    def input_shapes(self) -> list[tuple[int, ...]] | None:
        """Each input's shape, a symbolic first (batch) axis read as 1; ``None`` when another
        axis is symbolic."""
        shapes = []
        for meta in self.session.get_inputs():
            dims = [1 if i == 0 and not isinstance(d, int) else d
                    for i, d in enumerate(meta.shape)]
            if not all(isinstance(d, int) and d > 0 for d in dims):
                return None
            shapes.append(tuple(dims))
        return shapes

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        shapes = self.input_shapes
        return shapes[0] if shapes else None

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        metas = self.session.get_inputs()
        if len(inputs) != len(metas):
            raise RepfuseError(f"{self.name} takes {len(metas)} inputs, got {len(inputs)}")
        feeds = {meta.name: t.detach().to("cpu", dtype).contiguous().numpy()
                 for meta, t, dtype in zip(metas, inputs, self.input_dtypes, strict=True)}
        outputs = tuple(torch.from_numpy(array) for array in self.session.run(None, feeds))
        return outputs[0] if len(outputs) == 1 else outputs

    def __deepcopy__(self, memo: dict) -> OnnxModel:
        clone = type(self)(self.session, self.name)
        clone.train(self.training)
        return clone


def _load_onnx(path: Path) -> LoadedModel:
    """An ONNX file run by onnxruntime (graph optimizations off), as a module; its example
    input shapes are its inputs', a symbolic batch axis read as 1."""
    model = OnnxModel.from_file(path)
    return LoadedModel(model, f"ONNX model {path.name} (onnxruntime)", model.input_shapes, path)


def load_model(spec: str, *, arch: str | None = None, trust: bool = False) -> LoadedModel:
    """Load ``spec`` (a zoo name or a file; see the module docstring) as an ``nn.Module``."""
    path = Path(spec)
    if not path.exists():
        if spec in _zoo_names():
            return LoadedModel(create_model(spec), f"zoo model {spec}",
                               [tuple(get_spec(spec).input_shape)])
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
    _importable_working_directory()  # the pickle names its classes by module, as --arch does
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        raise LoadError(f"cannot unpickle '{path}': it needs module '{exc.name}', which is not "
                        "importable from here (run from the folder that holds it, or add it "
                        "to PYTHONPATH)") from exc
    except Exception as exc:
        raise LoadError(f"cannot unpickle '{path}': {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, nn.Module):
        raise LoadError(f"'{path}' holds a {type(obj).__name__}, not a torch.nn.Module")
    return LoadedModel(obj, f"pickled module {path.name}", None, path)


def forward_parameters(model: nn.Module) -> tuple[list[str], int]:
    """The names of ``model``'s positional forward parameters and how many are required (no
    default). ``*args`` counts as none required; an ONNX model's inputs are all required."""
    if isinstance(model, OnnxModel):
        names = model.input_names
        return names, len(names)
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return [], 1
    names, required = [], 0
    for parameter in signature.parameters.values():
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            continue
        names.append(parameter.name)
        if parameter.default is parameter.empty:
            required += 1
    return names, required


def infer_input_shape(model: nn.Module) -> tuple[tuple[int, ...], str]:
    """A guess at an example input shape from the first conv/linear layer, and what was assumed.

    Conv2d: ``(1, C, 224, 224)``; Conv1d: ``(1, C, 224)``; Conv3d: ``(1, C, 16, 112, 112)``;
    Linear: ``(1, in_features)``. Transposed convs likewise (a decoder's input is small: 8).
    """
    spatial_by_kind = ((nn.Conv1d, (224,)), (nn.Conv2d, (224, 224)), (nn.Conv3d, (16, 112, 112)),
                       (nn.ConvTranspose1d, (8,)), (nn.ConvTranspose2d, (8, 8)),
                       (nn.ConvTranspose3d, (4, 8, 8)))
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


def input_shapes_for(model: nn.Module, given: Sequence[str], known: Sequence[tuple[int, ...]]
                     | None = None) -> tuple[list[tuple[int, ...]], str | None]:
    """The example input shapes of ``model``, one per input of its forward, and a note when one
    was assumed.

    ``given`` are ``--input-shape`` values in forward order (``1,3,32,32``) or by parameter
    name (``image=1,3,32,32``); ``known`` what the model file says. Without either, a model
    with one input gets :func:`infer_input_shape`; a model with more must be told.
    """
    names, required = forward_parameters(model)
    if given:
        named = [text.partition("=") for text in given]
        if any(sep for _, sep, _ in named):
            if not all(sep for _, sep, _ in named):
                raise RepfuseError("give every --input-shape by name (image=1,3,32,32) or none")
            by_name = {name.strip(): parse_shape(shape) for name, _, shape in named}
            unknown = [n for n in by_name if n not in names]
            if unknown:
                raise RepfuseError(f"--input-shape names '{unknown[0]}', which is not a "
                                   f"parameter of forward ({', '.join(names) or 'none'})")
            order = names[:max(required, 1 + max(names.index(n) for n in by_name))]
            missing = [n for n in order if n not in by_name]
            if missing:
                raise RepfuseError(f"no --input-shape for input '{missing[0]}' of forward("
                                   f"{', '.join(names)})")
            shapes = [by_name[n] for n in order]
        else:
            shapes = [parse_shape(text) for text in given]
        _check_count(len(shapes), names, required)
        return shapes, None
    if known:
        return list(known), None
    if required > 1:
        raise RepfuseError(f"the model's forward takes {required} inputs ({', '.join(names)}): "
                           "give one --input-shape per input, in order or as name=shape")
    shape, note = infer_input_shape(model)
    return [shape], note


def _check_count(count: int, names: list[str], required: int) -> None:
    if names and not required <= count <= len(names):
        takes = str(required) if required == len(names) else f"{required} to {len(names)}"
        raise RepfuseError(f"{count} --input-shape given, but forward({', '.join(names)}) "
                           f"takes {takes} inputs")


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file, or of every file under a folder (in sorted order, each preceded
    by its relative path)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_destination(path: Path) -> Path:
    """Refuse, before any work is done, an output that cannot be written: its folder is missing,
    not a folder or not writable, or the path is a folder itself. Writability is probed by
    creating (and removing) a file there: permission bits do not stop root, and a read-only
    mount or sysfs stops everyone."""
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
    _probe(folder, path)
    return path


def check_folder_destination(path: Path, option: str = "--emit-code") -> Path:
    """Like :func:`check_destination`, for an output folder: it is a folder (or can be made
    in an existing folder) and files can be created in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RepfuseError(f"'{path}' is a file; {option} needs a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise RepfuseError(f"cannot write into '{path}' ({option}): it is not writable")
        _probe(path, path)
        return path
    check_destination(path)  # created by the write: its parent must take it
    return path


def _probe(folder: Path, path: Path) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".repfuse-probe.", dir=folder)
    except OSError as exc:
        raise RepfuseError(f"cannot write '{path}': {exc.strerror or exc}") from exc
    os.close(fd)
    os.unlink(name)


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


def save_model(model: nn.Module, path: Path, check_inputs: Sequence[Tensor] | None = None
               ) -> None:
    """Write ``model`` by extension: ``.pt`` is ``torch.save`` of the (Graph)Module.

    With ``check_inputs`` the written file is loaded back (``weights_only=False``: it is our
    own pickle) and run on them before it is renamed into place: its outputs must be the
    model's. A file that would not load (a model torch.fx cannot re-trace) is never written.
    """
    path = Path(path)
    if path.suffix != ".pt":
        raise RepfuseError(f"unsupported output type '{path.suffix}' for '{path}' (use .pt)")

    def write(tmp: Path) -> None:
        torch.save(model, tmp)
        if check_inputs is not None:
            _check_loads_back(model, tmp, tuple(check_inputs))

    try:
        atomic_write(path, write)
    except (OSError, pickle.PicklingError) as exc:
        raise RepfuseError(f"cannot write '{path}': {_first_words(exc)}") from exc
    except (AttributeError, TypeError) as exc:
        if "pickle" not in str(exc):
            raise
        raise RepfuseError(f"cannot save the model to '{path}': it holds something that "
                           f"cannot be pickled ({_first_words(exc)})") from exc


def _check_loads_back(model: nn.Module, file: Path, inputs: tuple[Tensor, ...]) -> None:
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # ours to fix: the file is what repfuse made
        raise RuntimeError(f"the fused model does not load back from a file: "
                           f"{type(exc).__name__}: {_first_words(exc)}") from exc
    with torch.no_grad():
        expected = [t for t in tree_leaves(model(*inputs)) if isinstance(t, Tensor)]
        actual = [t for t in tree_leaves(loaded(*inputs)) if isinstance(t, Tensor)]
    same = len(expected) == len(actual) and all(
        e.shape == a.shape and torch.allclose(e, a, rtol=1e-6, atol=1e-7, equal_nan=True)
        for e, a in zip(expected, actual, strict=False))
    if not same:
        raise RuntimeError("the fused model loaded back from its file computes something "
                           "else than before saving")


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
