"""Tests of :mod:`repfuse.verify.inputs`: random batches, files of tensors, batch factories.

Each source is checked for the exact tensors it yields (against the tensors written), and a
verification on user batches is checked against the error computed by hand over those batches.
"""

from __future__ import annotations

import copy
import re
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import random_input, reference64
from torch import Tensor, nn

import repfuse
from repfuse.errors import LoadError, VerificationError
from repfuse.models import randomize_bn_stats
from repfuse.verify import load_batches, random_batches

EXAMPLE = (random_input((2, 3, 8, 8)),)  # one model input of rank 4


def stack(n: int, seed: int = 0, shape=(2, 3, 8, 8)) -> Tensor:
    return torch.stack([random_input(shape, seed=seed + i) for i in range(n)])


def assert_batches(batches: list[tuple[Tensor, ...]], expected: list[tuple[Tensor, ...]]):
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected, strict=True):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


# --- random -------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_random_batches_are_seeded_draws_after_the_example(distribution):
    batches = random_batches(EXAMPLE, 4, seed=3, distribution=distribution)
    assert batches[0] is EXAMPLE
    for index, (x,) in enumerate(batches[1:], start=1):
        generator = torch.Generator().manual_seed(3000 + index)
        draw = torch.randn if distribution == "normal" else torch.rand
        expected = draw((2, 3, 8, 8), generator=generator, dtype=torch.float64).float()
        assert torch.equal(x, expected)
    drawn = torch.cat([b[0].reshape(-1) for b in batches[1:]])
    if distribution == "uniform":
        assert drawn.min() >= 0 and drawn.max() < 1
    else:
        assert drawn.min() < 0 < drawn.max()


def test_unknown_distribution_is_refused():
    with pytest.raises(VerificationError, match="unknown distribution 'cauchy'"):
        random_batches(EXAMPLE, 2, seed=0, distribution="cauchy")


# --- files --------------------------------------------------------------------------------------


def test_pt_tensor_of_input_rank_is_one_batch(tmp_path):
    x = random_input((5, 3, 8, 8), seed=1)
    torch.save(x, tmp_path / "x.pt")
    loaded = load_batches(tmp_path / "x.pt", EXAMPLE)
    assert_batches(loaded.batches, [(x,)])
    assert loaded.source == "batches from x.pt"
    assert loaded.describe()["shapes"] == [[5, 3, 8, 8]]


def test_pt_tensor_of_one_more_rank_is_a_stack_of_batches(tmp_path):
    xs = stack(4)
    torch.save(xs, tmp_path / "xs.pt")
    assert_batches(load_batches(tmp_path / "xs.pt", EXAMPLE).batches, [(t,) for t in xs])
    bounded = load_batches(tmp_path / "xs.pt", EXAMPLE, max_batches=3)
    assert_batches(bounded.batches, [(t,) for t in xs[:3]])


def test_pt_list_of_batches_and_dict_of_batches(tmp_path):
    first, second = random_input((1, 3, 8, 8), seed=2), random_input((3, 3, 8, 8), seed=3)
    torch.save([first, (second,)], tmp_path / "list.pt")
    torch.save({"batches": [first, second]}, tmp_path / "dict.pt")
    for name in ("list.pt", "dict.pt"):
        assert_batches(load_batches(tmp_path / name, EXAMPLE).batches, [(first,), (second,)])


def test_pt_tuple_is_one_batch_of_several_inputs(tmp_path):
    example = (random_input((2, 4)), torch.arange(2))
    x, idx = random_input((6, 4), seed=4), torch.tensor([1, 0, 1, 1, 0, 0])
    torch.save((x, idx), tmp_path / "one.pt")
    assert_batches(load_batches(tmp_path / "one.pt", example).batches, [(x, idx)])
    xs, idxs = stack(3, shape=(6, 4)), torch.randint(0, 2, (3, 6))
    torch.save((xs, idxs), tmp_path / "stacked.pt")
    assert_batches(load_batches(tmp_path / "stacked.pt", example).batches,
                   [(xs[i], idxs[i]) for i in range(3)])


def test_npy_and_npz(tmp_path):
    xs = stack(3, seed=5)
    np.save(tmp_path / "xs.npy", xs.numpy())
    assert_batches(load_batches(tmp_path / "xs.npy", EXAMPLE, max_batches=2).batches,
                   [(t,) for t in xs[:2]])
    example = (random_input((2, 4)), random_input((2, 7)))
    a, b = stack(2, shape=(2, 4)), stack(2, seed=9, shape=(2, 7)).double()
    np.savez(tmp_path / "ab.npz", a.numpy(), b.numpy())
    assert_batches(load_batches(tmp_path / "ab.npz", example).batches,
                   [(a[0], b[0]), (a[1], b[1])])


class NotATensor:
    pass


@pytest.mark.parametrize("content, message", [
    (lambda: stack(2, shape=(3, 8, 8)).reshape(-1), "ranks [1]; expected [4] (one batch) or [5]"),
    (lambda: (random_input((2, 3, 8, 8)), random_input((2, 3, 8, 8))),
     "holds 2 tensors; the model takes 1 inputs"),
    (lambda: [random_input((3, 8, 8))], "batch 0, input 0: shape [3, 8, 8] has rank 3"),
    (lambda: [NotATensor()], "weights_only"),
    (lambda: {"weights": torch.zeros(1)}, "holds dict"),
], ids=["rank", "count", "batch-rank", "pickled-object", "dict"])
def test_files_that_do_not_fit_are_refused_with_a_reason(tmp_path, content, message):
    torch.save(content(), tmp_path / "bad.pt")
    with pytest.raises(LoadError, match=re.escape(message)):
        load_batches(tmp_path / "bad.pt", EXAMPLE)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(LoadError, match="no input file"):
        load_batches(tmp_path / "absent.pt", EXAMPLE)
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(LoadError, match="unsupported input file type '.csv'"):
        load_batches(tmp_path / "x.csv", EXAMPLE)
    torch.save(stack(2), tmp_path / "ok.pt")
    with pytest.raises(LoadError, match="at least 1"):
        load_batches(tmp_path / "ok.pt", EXAMPLE, max_batches=0)


# --- factories ----------------------------------------------------------------------------------

FACTORY = '''
import torch
from torch.utils.data import DataLoader, TensorDataset

CALLS = []


def images():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(10, 3, 8, 8, generator=g)
    y = torch.arange(10)
    return DataLoader(TensorDataset(x, y), batch_size=4)  # (input, label) pairs


def endless():
    def generate():
        g = torch.Generator().manual_seed(12)
        while True:
            CALLS.append(1)
            yield torch.randn(2, 3, 8, 8, generator=g)
    return generate()


not_callable = 3
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "batchfactory.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "batchfactory"
    sys.modules.pop("batchfactory", None)


def test_a_dataloader_factory_yields_its_inputs_without_labels(factory_module):
    loaded = load_batches(f"{factory_module}:images", EXAMPLE, progress=True)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(10, 3, 8, 8, generator=g)
    assert_batches(loaded.batches, [(x[:4],), (x[4:8],), (x[8:],)])
    assert loaded.source == f"batches from {factory_module}:images"


def test_max_batches_stops_an_endless_iterable(factory_module):
    loaded = load_batches(f"{factory_module}:endless", EXAMPLE, max_batches=3)
    assert len(loaded.batches) == 3
    assert len(sys.modules[factory_module].CALLS) == 3  # nothing drawn beyond the bound


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz' for --inputs"),
    ("batchfactory:missing", "has no callable 'missing'"),
    ("batchfactory:not_callable", "has no callable 'not_callable'"),
])
def test_factories_that_cannot_be_called(factory_module, spec, message):
    with pytest.raises(LoadError, match=message):
        load_batches(spec, EXAMPLE)


# --- verifying on user batches ------------------------------------------------------------------


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


def test_verification_runs_on_every_user_batch(tmp_path):
    model = randomize_bn_stats(Small(), seed=0).eval()
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.conv.bias.add_(torch.linspace(0, 0.01, 5))
    xs = stack(3, seed=20)
    xs[2] *= 10  # the last batch has the largest error: it must be included
    torch.save(xs, tmp_path / "xs.pt")
    loaded = load_batches(tmp_path / "xs.pt", EXAMPLE)
    report = repfuse.verify(model, wrong, inputs=loaded)

    assert report.inputs["batches"] == 3 and report.inputs["source"] == "batches from xs.pt"
    diffs = [(reference64(wrong, x) - reference64(model, x)).abs().max().item() for x in xs]
    assert report.float64.outputs[0].metrics.max_abs == pytest.approx(max(diffs), rel=1e-9)
    assert not report.passed
    first = report.first_divergence
    assert first["kind"] == "module" and first["node"] == "conv"  # same structure, differs

    two = repfuse.verify(model, wrong, inputs=load_batches(tmp_path / "xs.pt", EXAMPLE,
                                                          max_batches=2))
    assert two.float64.outputs[0].metrics.max_abs == pytest.approx(max(diffs[:2]), rel=1e-9)
