"""Inputs to verify on: seeded random batches, tensors from a file, or the user's own batches.

A *batch* is a tuple of tensors, the model's positional inputs. Floating inputs are cast to the
deployment dtype by :func:`repfuse.verify.verify`; integer inputs are used as they are.

**Random** (:func:`random_batches`): the example input, then ``batches - 1`` draws of its shapes,
batch ``i`` from a generator seeded with ``1000·seed + i``; ``normal`` is N(0, 1), ``uniform``
is U[0, 1) (like images scaled to [0, 1]).

**A file** (:func:`load_batches` with a path). ``r`` is the rank of a model input, known from
the example input (``--input-shape`` or the inferred shape); a tensor of rank ``r`` is one
batch, of rank ``r + 1`` a stack of batches along dimension 0:

- ``.pt`` (read with ``torch.load(weights_only=True)``): a tensor (single-input model); a
  *tuple* of tensors, one per model input (each of rank ``r`` or all stacked); a *list* of
  batches, each a tensor or a tuple/list of tensors; or a dict ``{"batches": [...]}``;
- ``.npy``: one array, read like a ``.pt`` tensor;
- ``.npz``: one array per model input, in the file's order (``np.savez(f, x)`` stores ``arr_0``),
  each of rank ``r`` (one batch) or all of rank ``r + 1`` (stacked, same count).

**A factory** ``package.module:fn`` (the current directory is importable): called with no
arguments, it returns an iterable of batches, e.g. a ``DataLoader``. A batch is a tensor or a
tuple/list whose first tensors are the model inputs, so ``(input, label)`` pairs work.

``max_batches`` bounds how many batches are read; a rich progress bar (stderr) shows the
reading when asked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from torch import Tensor

from repfuse.errors import LoadError, VerificationError
from repfuse.io import import_factory

Batch = tuple[Tensor, ...]
DISTRIBUTIONS = ("normal", "uniform")
FILE_SUFFIXES = (".pt", ".pth", ".npy", ".npz")


@dataclass
class InputSet:
    """Batches to verify on and a one-line description of where they came from."""

    batches: list[Batch]
    source: str
    seed: int | None = None
    distribution: str | None = None

    def describe(self) -> dict:
        """The ``inputs`` section of a report."""
        return {
            "batches": len(self.batches), "seed": self.seed, "source": self.source,
            "distribution": self.distribution,
            "shapes": [list(t.shape) for t in self.batches[0]] if self.batches else [],
        }


def draw(shape: Sequence[int], generator: torch.Generator, distribution: str) -> Tensor:
    """One float64 tensor from ``distribution`` (see :data:`DISTRIBUTIONS`)."""
    if distribution == "normal":
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
    if distribution == "uniform":
        return torch.rand(tuple(shape), generator=generator, dtype=torch.float64)
    raise VerificationError(
        f"unknown distribution '{distribution}' (use {' or '.join(DISTRIBUTIONS)})"
    )


def random_batches(
    example: Batch, batches: int, seed: int, distribution: str = "normal"
) -> list[Batch]:
    """``example`` itself, then ``batches - 1`` seeded draws of the same shapes.

    Batch ``i >= 1`` is drawn from a generator seeded with ``1000·seed + i``, a stream of its
    own, so it differs from an example input drawn with ``seed`` itself.
    """
    if distribution not in DISTRIBUTIONS:
        draw((), torch.Generator(), distribution)  # raises the error naming the choices
    out = [example]
    for index in range(1, batches):
        generator = torch.Generator().manual_seed(1000 * seed + index)
        out.append(tuple(
            draw(t.shape, generator, distribution).to(t.dtype).to(t.device)
            if t.is_floating_point() else t
            for t in example
        ))
    return out


def is_factory_spec(source: str) -> bool:
    """``package.module:fn`` rather than a file path."""
    return ":" in source and not Path(source).exists()


def load_batches(
    source: str | os.PathLike,
    example: Batch,
    *,
    max_batches: int | None = None,
    progress: bool = False,
) -> InputSet:
    """The batches in a ``.pt``/``.npy``/``.npz`` file or from a ``package.module:fn`` factory.

    ``example`` gives the number of model inputs and their ranks (see the module docstring for
    the conventions); an entry ``None`` is an input of unknown rank, and a tuple of tensors is
    then read as one batch. Raises :class:`LoadError` for a source that cannot be read or does
    not fit.
    """
    if max_batches is not None and max_batches < 1:
        raise LoadError("--max-batches must be at least 1")
    text = str(source)
    if is_factory_spec(text):
        items = _call_factory(text)
        description = f"batches from {text}"
    else:
        path = Path(text)
        if not path.is_file():
            raise LoadError(f"no input file '{path}'")
        items = _read_file(path, example)
        description = f"batches from {path.name}"
    batches = _collect(items, example, max_batches, progress, text)
    if not batches:
        raise LoadError(f"'{text}' holds no batches")
    return InputSet(batches, description)


def _collect(items: Iterable[Any], example: Batch, max_batches: int | None, progress: bool,
             name: str) -> list[Batch]:
    total = _length(items)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    batches: list[Batch] = []
    with _progress_bar(progress, total, name) as advance:
        for item in islice(items, max_batches):  # draws nothing beyond the bound
            batches.append(_as_batch(item, example, len(batches)))
            advance()
    return batches


def _length(items: Any) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None


@contextmanager
def _progress_bar(show: bool, total: int | None, name: str) -> Iterator[Callable[[], None]]:
    """Yield a function advancing a rich progress bar on stderr (or doing nothing)."""
    if not show:
        yield lambda: None
        return
    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task(f"reading {name}", total=total)
        yield lambda: bar.advance(task)


def _call_factory(spec: str) -> Iterable[Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise LoadError(f"--inputs must be a file or package.module:fn, got '{spec}'")
    factory = import_factory(spec, "--inputs")
    try:
        items = factory()
    except Exception as exc:
        raise LoadError(f"calling {spec}() failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(items, Tensor) or not isinstance(items, Iterable):
        raise LoadError(f"{spec}() returned {type(items).__name__}, not an iterable of batches")
    return items


def _read_file(path: Path, example: Batch) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        try:
            data = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise LoadError(f"cannot read '{path}' as tensors (weights_only): {exc}") from exc
        return _batches_in(data, example, path)
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise LoadError(f"cannot read '{path}' as a numpy array: {exc}") from exc
        return _batches_in(torch.from_numpy(array), example, path)
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = tuple(torch.from_numpy(archive[key]) for key in archive.files)
        except Exception as exc:
            raise LoadError(f"cannot read '{path}' as a numpy archive: {exc}") from exc
        return _batches_in(arrays, example, path)
    raise LoadError(
        f"unsupported input file type '{path.suffix}' for '{path}' "
        f"(use {', '.join(FILE_SUFFIXES)} or package.module:fn)"
    )


def _batches_in(data: Any, example: Batch, path: Path) -> list[Any]:
    """Split what a file holds into batches (see the module docstring)."""
    if isinstance(data, Mapping) and "batches" in data:
        data = data["batches"]
    if isinstance(data, list):
        return data
    if isinstance(data, Tensor):
        data = (data,)
    if isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data):
        if len(data) != len(example):
            raise LoadError(f"'{path}' holds {len(data)} tensors; the model takes "
                            f"{len(example)} inputs")
        if any(e is None for e in example):
            return [data]
        stacked = [t.dim() == e.dim() + 1 for t, e in zip(data, example, strict=True)]
        single = [t.dim() == e.dim() for t, e in zip(data, example, strict=True)]
        if all(single):
            return [data]
        if all(stacked):
            counts = {t.shape[0] for t in data}
            if len(counts) != 1:
                raise LoadError(f"the stacked inputs in '{path}' hold different numbers of "
                                f"batches: {sorted(counts)}")
            return [tuple(t[i] for t in data) for i in range(counts.pop())]
        ranks = [t.dim() for t in data]
        expected = [e.dim() for e in example]
        raise LoadError(f"tensors in '{path}' have ranks {ranks}; expected {expected} (one "
                        f"batch) or {[r + 1 for r in expected]} (a stack of batches)")
    raise LoadError(f"'{path}' holds {type(data).__name__}; expected a tensor, a tuple of "
                    "tensors or a list of batches")


def _as_batch(item: Any, example: Batch, index: int) -> Batch:
    """A batch from a tensor or a tuple/list whose first tensors are the model inputs."""
    count = len(example)
    if isinstance(item, Tensor):
        tensors: tuple = (item,)
    elif isinstance(item, (tuple, list)):
        tensors = tuple(item[:count])
    else:
        raise LoadError(f"batch {index} is {type(item).__name__}; expected a tensor or a "
                        "tuple/list of tensors")
    if len(tensors) != count or not all(isinstance(t, Tensor) for t in tensors):
        raise LoadError(f"batch {index} does not start with {count} tensor(s) "
                        f"(the model's inputs)")
    for position, (tensor, like) in enumerate(zip(tensors, example, strict=True)):
        if like is not None and tensor.dim() != like.dim():
            raise LoadError(f"batch {index}, input {position}: shape {list(tensor.shape)} has "
                            f"rank {tensor.dim()}; the model's input has rank {like.dim()}")
    return tuple(t.detach().cpu() for t in tensors)
