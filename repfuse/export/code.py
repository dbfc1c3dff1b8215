"""The fused model as readable Python source (``model.py``) and its weights (``weights.pt``).

:func:`python_source` writes a plain ``nn.Module`` class: every module and tensor the graph uses
becomes an attribute with a flat name, each layer is rebuilt from its constructor arguments,
``forward`` is fx's code for the graph, and ``load()`` builds the class and loads the weights
with ``torch.load(weights_only=True)``. It needs torch, not repfuse. :func:`emit_code` imports the
emitted file, compares each rebuilt layer's configuration with the original's, and checks the
loaded model like every export before writing.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import inspect
import keyword
import re
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.fx.graph import _custom_builtins

from repfuse._version import __version__
from repfuse.capture import ExampleInputs
from repfuse.errors import ExportError, first_line
from repfuse.export.base import (
    ExportResult,
    checked_export,
    example_inputs_of,
    prepared,
)
from repfuse.graph import fetch_attr
from repfuse.verify import DEFAULT_VERIFY, VerifyOptions

CODE_FILE, WEIGHTS_FILE = "model.py", "weights.pt"


class _FlatNames:
    """Attribute names for module paths: ``layer1.0.conv1`` -> ``layer1_0_conv1``, unique,
    never a keyword or an ``nn.Module`` attribute."""

    def __init__(self) -> None:
        self.by_path: dict[str, str] = {}
        self.taken: set[str] = set()

    def __call__(self, path: str) -> str:
        if path in self.by_path:
            return self.by_path[path]
        base = re.sub(r"\W", "_", path) or "attr"
        if base[0].isdigit():
            base = f"m_{base}"
        if keyword.iskeyword(base) or hasattr(nn.Module, base) or base == "training":
            base = f"{base}_"
        name, index = base, 1
        while name in self.taken:
            index += 1
            name = f"{base}_{index}"
        self.taken.add(name)
        self.by_path[path] = name
        return name


def _literal(value: Any, what: str) -> str:
    """``repr(value)`` when it reads back as ``value``, else an error naming ``what``."""
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
        same = False
    if not same:
        raise ExportError(f"cannot write {what} = {text} as Python source")
    return text


def _constructor(path: str, module: nn.Module) -> str:
    """``nn.Conv2d(in_channels=3, ...)``: the call that rebuilds ``module``'s configuration.

    Arguments are read from the attributes of the same name (``bias`` from whether there is
    one); those equal to the default are left out. :func:`_check_configuration` later compares
    the rebuilt module's attributes with the original's.
    """
    cls = type(module)
    if getattr(nn, cls.__name__, None) is not cls or list(module.children()):
        raise ExportError(
            f"cannot write code for module '{path}' ({cls.__module__}.{cls.__qualname__}): "
            "only torch.nn layers without submodules are written as source"
        )
    args = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "device", "dtype") or parameter.kind in (
            parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD
        ):
            continue
        if not hasattr(module, name):
            if parameter.default is parameter.empty:
                raise ExportError(f"cannot write code for module '{path}' ({cls.__name__}): "
                                  f"its constructor argument '{name}' is not an attribute")
            continue
        value = getattr(module, name)
        if isinstance(parameter.default, bool) and (value is None or isinstance(value, Tensor)):
            value = value is not None  # bias=True/False: the tensor itself is in the weights
        if _is_default(value, parameter.default):
            continue
        args.append(f"{name}={_literal(value, f'{path}.{name}')}")
    return f"nn.{cls.__name__}({', '.join(args)})"


def _is_default(value: Any, default: Any) -> bool:
    """``value`` is what ``default`` becomes in the module: itself, or a tuple of it
    (``dilation=1`` is stored as ``(1, 1)``)."""
    if default is inspect.Parameter.empty:
        return False
    if isinstance(value, tuple) and not isinstance(default, tuple):
        return all(type(v) is type(default) and v == default for v in value)
    return type(value) is type(default) and value == default


def _assignment(target: str, call: str, indent: str = " " * 8) -> list[str]:
    """``self.x = nn.Conv2d(...)`` on one line, or wrapped within 100 columns."""
    line = f"{indent}{target} = {call}"
    if len(line) <= 100:
        return [line]
    head, _, args = call.partition("(")
    lines, current = [f"{indent}{target} = {head}("], indent + " " * 4
    for arg in _split_args(args[:-1]):
        piece = f"{arg}, "
        if len(current) + len(piece) > 100 and current.strip():
            lines.append(current.rstrip())
            current = indent + " " * 4
        current += piece
    lines.append(current.rstrip().rstrip(","))
    lines.append(f"{indent})")
    return lines


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated pieces of ``text`` (commas inside brackets do not split)."""
    pieces, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append(text[start:index].strip())
            start = index + 1
    pieces.append(text[start:].strip())
    return [p for p in pieces if p]


def _import_lines(global_objects: Mapping[str, Any], source: str) -> list[str]:
    """Imports for the names the generated forward uses; nothing from repfuse."""
    lines = []
    for name, obj in sorted(global_objects.items()):
        if name == "torch" or not re.search(rf"\b{re.escape(name)}\b", source):
            continue
        if name in _custom_builtins:
            lines.append(_custom_builtins[name].import_str)
            continue
        if getattr(builtins, name, None) is obj:
            continue
        module = getattr(obj, "__module__", None) or ""
        qualname = getattr(obj, "__qualname__", "")
        module = "operator" if module == "_operator" else module
        importable = (
            module and qualname.isidentifier() and not module.startswith("repfuse")
            and getattr(importlib.import_module(module), qualname, None) is obj
        )
        if not importable:
            raise ExportError(f"the fused graph calls {module}.{qualname}, which generated code "
                              "cannot import")
        alias = "" if qualname == name else f" as {name}"
        lines.append(f"from {module} import {qualname}{alias}")
    return lines


@dataclass
class PythonSource:
    """A fused GraphModule as Python source plus the state dict its class loads."""

    source: str
    state_dict: dict[str, Tensor]
    modules: dict[str, tuple[str, nn.Module]]  # attribute -> (original path, module)


def python_source(
    gm: GraphModule,
    class_name: str = "FusedModel",
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    description: str = "a fused model",
) -> PythonSource:
    """``gm`` as the source of a plain ``nn.Module`` class that needs only torch.

    Every module and tensor the graph uses becomes an attribute with a flat name
    (``layer1.0.conv1`` -> ``layer1_0_conv1``); ``forward`` is fx's code for the graph; a
    ``load()`` function builds the class and loads ``weights.pt`` from beside the file with
    ``torch.load(weights_only=True)`` and ``load_state_dict(assign=True)``, which keeps the
    weights' dtype.
    """
    if not isinstance(gm, GraphModule):
        raise ExportError(f"cannot write code for a {type(gm).__name__}: only a model captured as "
                          "one graph can be written as source (this one keeps eager Python parts)")
    if not class_name.isidentifier() or keyword.iskeyword(class_name):
        raise ExportError(f"class name '{class_name}' is not a Python identifier")
    flat = _FlatNames()
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    modules: dict[str, tuple[str, nn.Module]] = {}
    tensors: dict[str, tuple[str, Tensor]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            name = flat(node.target)
            modules[name] = (node.target, gm.get_submodule(node.target))
            node.target = name
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if not isinstance(value, Tensor):
                raise ExportError(f"cannot write attribute '{node.target}' "
                                  f"({type(value).__name__}) as Python source")
            name = flat(node.target)
            tensors[name] = (node.target, value)
            node.target = name
    code = graph.python_code(root_module="self")
    # fx frees each value after its last use (`;  x = None`); a reader does not need that.
    forward = re.sub(r";  (?:\w+ = )+None$", "", code.src.strip("\n"), flags=re.MULTILINE)
    forward = "\n".join(f"    {line}".rstrip() for line in forward.rstrip().splitlines())

    init = []
    state: dict[str, Tensor] = {}
    for name, (path, module) in modules.items():
        init += _assignment(f"self.{name}", _constructor(path, module))
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    for name, (_, tensor) in tensors.items():
        empty = f"torch.empty({tuple(tensor.shape)}, dtype={tensor.dtype})"
        if isinstance(tensor, nn.Parameter):
            frozen = "" if tensor.requires_grad else ", requires_grad=False"
            init += _assignment(f"self.{name}", f"nn.Parameter({empty}{frozen})")
        else:
            init.append(f"        self.register_buffer({name!r}, {empty})")
        state[name] = tensor
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}

    shapes = input_shapes or []
    example = ", ".join(f"torch.randn({', '.join(map(str, s))})" for s in shapes) or "x"
    imports = ["import torch", "from torch import nn", *_import_lines(code.globals, forward)]
    source = _CODE_TEMPLATE.format(
        description=description, version=__version__, class_name=class_name, example=example,
        weights=WEIGHTS_FILE, imports="\n".join(dict.fromkeys(imports)),
        init="\n".join(init) or "        pass", forward=forward,
    )
    return PythonSource(source, state, modules)


_CODE_TEMPLATE = '''"""{class_name}: {description}, written by repfuse {version}.

Plain PyTorch: this file needs torch, not repfuse. The weights are in {weights} beside it.

    from model import load
    model = load()  # eval mode
    y = model({example})
"""

from pathlib import Path

{imports}

WEIGHTS = Path(__file__).with_name("{weights}")


class {class_name}(nn.Module):
    def __init__(self) -> None:
        super().__init__()
{init}

{forward}


def load(weights: str | Path = WEIGHTS, map_location: str = "cpu") -> {class_name}:
    """{class_name} with the weights in ``weights``, in eval mode."""
    model = {class_name}()
    state = torch.load(weights, map_location=map_location, weights_only=True)
    model.load_state_dict(state, assign=True)
    return model.eval()
'''


def _import_file(path: Path) -> Any:
    """Import the Python file ``path`` as a fresh module (not left in ``sys.modules``)."""
    name = f"repfuse_emitted_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look their module up while executing
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def _configuration(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and not isinstance(v, Tensor)}


def _check_configuration(emitted: nn.Module, modules: Mapping[str, tuple[str, nn.Module]]):
    """Each rebuilt layer has the type and public attributes of the layer it stands for."""
    for name, (path, original) in modules.items():
        rebuilt = getattr(emitted, name)
        if type(rebuilt) is not type(original):
            raise ExportError(f"emitted layer '{name}' is a {type(rebuilt).__name__}, but "
                              f"'{path}' is a {type(original).__name__}")
        expected, actual = _configuration(original), _configuration(rebuilt)
        for key in sorted(set(expected) | set(actual)):
            if expected.get(key) != actual.get(key):
                raise ExportError(
                    f"cannot write code for module '{path}' ({type(original).__name__}): its "
                    f"constructor does not reproduce {key}={expected.get(key)!r}"
                )


def emit_code(
    gm: GraphModule,
    directory: str | Path,
    example_inputs: ExampleInputs | None = None,
    *,
    reference: nn.Module | None = None,
    class_name: str = "FusedModel",
    description: str = "a fused model",
    verify: VerifyOptions = DEFAULT_VERIFY,
    reference_name: str = "reference",
    force: bool = False,
) -> ExportResult:
    """Write ``gm`` as readable Python source ``model.py`` plus ``weights.pt`` into
    ``directory``: a plain ``nn.Module`` class that loads and runs with only torch installed.

    Before writing, the emitted file is imported, its ``load()`` called, each rebuilt layer's
    configuration compared with the original's, and the result checked against ``reference``
    (default ``gm``) like every export. Existing ``model.py``/``weights.pt`` are replaced;
    other files in ``directory`` are left alone.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"'{directory}' is a file; --emit-code needs a folder")
    example = example_inputs_of(gm, example_inputs)
    gm, reference = prepared(gm, reference)
    emitted = python_source(gm, class_name, input_shapes=[tuple(t.shape) for t in example],
                            description=description)

    def build(scratch: Path) -> nn.Module:
        torch.save(emitted.state_dict, scratch / WEIGHTS_FILE)
        (scratch / CODE_FILE).write_text(emitted.source, encoding="utf-8")
        try:
            model = _import_file(scratch / CODE_FILE).load()
        except Exception as exc:
            raise ExportError(f"the emitted code does not load: {first_line(exc)} "
                              "(a bug in repfuse's code writer)") from exc
        _check_configuration(model, emitted.modules)
        return model

    # weights first: a model.py never refers to weights that are not there yet
    destinations = {WEIGHTS_FILE: directory / WEIGHTS_FILE, CODE_FILE: directory / CODE_FILE}
    details = {"files": [CODE_FILE, WEIGHTS_FILE], "class": class_name,
               "run_by": f"importing {CODE_FILE}"}
    return checked_export("code", destinations, build, reference=reference,
                          check_inputs=example, verify=verify, reference_name=reference_name,
                          force=force, path=directory, details=details)
