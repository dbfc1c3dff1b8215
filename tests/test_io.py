"""Tests of :mod:`repfuse.io`: loading every kind of MODEL, shapes, and atomic writes.

Every loaded model is checked by running it: its float64 output must equal the float64 output of
the model that was saved, so a loader that builds the right architecture with the wrong weights
fails.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_input, reference64, rel_err
from torch import nn

from repfuse.errors import LoadError, RepfuseError, UnsafeLoadError
from repfuse.io import (
    atomic_write,
    infer_input_shape,
    load_model,
    parse_shape,
    save_model,
)
from repfuse.models import create_model

TINY_SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    """resnet_tiny with random BatchNorm statistics (what ``load_model('resnet_tiny')`` builds)."""
    return create_model("resnet_tiny")


def assert_same_function(loaded: nn.Module, original: nn.Module, shape=TINY_SHAPE) -> None:
    """``loaded`` computes what ``original`` computes, both run in float64."""
    x = random_input(shape, seed=1, dtype=torch.float64)
    assert rel_err(reference64(original, x), reference64(loaded, x)) <= 1e-12


# --- load_model: each kind of input -------------------------------------------------------------


def test_zoo_name_loads_the_seeded_model_with_its_input_shape(tiny):
    loaded = load_model("resnet_tiny")
    assert loaded.input_shape == TINY_SHAPE
    assert loaded.path is None
    assert_same_function(loaded.module, tiny)


def test_state_dict_with_zoo_arch(tmp_path, tiny):
    path = tmp_path / "weights.pt"
    torch.save(tiny.state_dict(), path)
    loaded = load_model(str(path), arch="resnet_tiny")
    assert loaded.path == path
    assert loaded.input_shape is None  # a state dict says nothing about the input
    assert_same_function(loaded.module, tiny)


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_checkpoint_dict_holding_a_state_dict(tmp_path, tiny, key):
    path = tmp_path / "checkpoint.pth"
    torch.save({key: tiny.state_dict(), "epoch": 7}, path)
    loaded = load_model(str(path), arch="resnet_tiny")
    assert_same_function(loaded.module, tiny)


def test_state_dict_without_arch_names_arch(tmp_path, tiny):
    path = tmp_path / "weights.pt"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(LoadError, match="--arch"):
        load_model(str(path))


def test_state_dict_of_another_architecture_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "vgg.pt"
    torch.save(create_model("vgg_tiny").state_dict(), path)
    with pytest.raises(LoadError) as info:
        load_model(str(path), arch="resnet_tiny")
    message = str(info.value)
    assert "missing conv1.weight" in message
    assert "unexpected features.0." in message


def test_arch_factory_from_a_module_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "ionets.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    original = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    with torch.no_grad():
        original[1].running_mean.uniform_(-1, 1)
        original[1].running_var.uniform_(0.5, 2)
    torch.save(original.state_dict(), tmp_path / "w.pt")
    try:
        loaded = load_model("w.pt", arch="ionets:build")
    finally:
        sys.modules.pop("ionets", None)
    assert_same_function(loaded.module, original, shape=(5, 4))


@pytest.mark.parametrize("arch", ["no_colon", "ionets_missing_module:build", ":build"])
def test_bad_arch_is_a_load_error(tmp_path, tiny, arch):
    path = tmp_path / "weights.pt"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(LoadError, match="--arch|cannot import"):
        load_model(str(path), arch=arch)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch.export.load's own
def test_torch_export_program_loads_with_its_input_shape(tmp_path, tiny):
    x = random_input(TINY_SHAPE)
    path = tmp_path / "program.pt2"
    torch.export.save(torch.export.export(copy.deepcopy(tiny), (x,)), path)
    loaded = load_model(str(path))
    assert loaded.input_shape == TINY_SHAPE
    with torch.no_grad():
        out = loaded.module(x)
    assert rel_err(reference64(tiny, x), out) <= 1e-5


def test_pickled_module_needs_trust(tmp_path, tiny):
    path = tmp_path / "whole.pt"
    torch.save(tiny, path)
    with pytest.raises(UnsafeLoadError) as info:
        load_model(str(path))
    message = str(info.value)
    assert "--trust" in message
    assert re.search(r"loading it can run arbitrary\s+code", message)
    assert info.value.exit_code == 2


def test_pickled_module_with_trust(tmp_path, tiny):
    path = tmp_path / "whole.pt"
    torch.save(tiny, path)
    loaded = load_model(str(path), trust=True)
    assert loaded.path == path
    assert_same_function(loaded.module, tiny)


def test_trusted_pickle_that_is_not_a_module_is_refused(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"weights": [torch.ones(2)], "note": "not a module"}, path)
    with pytest.raises(LoadError, match="not a state dict|not a torch.nn.Module"):
        load_model(str(path), trust=True)


def test_dict_without_tensors_is_not_a_state_dict(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(LoadError, match="not a state dict"):
        load_model(str(path), arch="resnet_tiny")


def test_missing_file_lists_zoo_models(tmp_path):
    with pytest.raises(LoadError, match="no file or zoo model.*resnet_tiny"):
        load_model(str(tmp_path / "absent.pt"))


def test_directory_and_garbage_file_are_load_errors(tmp_path):
    with pytest.raises(LoadError, match="directory"):
        load_model(str(tmp_path))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(LoadError, match="cannot read"):
        load_model(str(garbage))


# --- shapes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, shape",
    [
        ("1,3,32,32", (1, 3, 32, 32)),
        ("1x3x32x32", (1, 3, 32, 32)),
        (" 2, 3 ,8 ", (2, 3, 8)),
        ("5", (5,)),
    ],
)
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1,a,3", "1.5,3", "0,3,32,32", "1,-3,32", "1;3;32", "x"])
def test_parse_shape_rejects(text):
    with pytest.raises(RepfuseError, match="bad --input-shape"):
        parse_shape(text)


@pytest.mark.parametrize(
    "first, shape",
    [
        (nn.Conv1d(5, 4, 3), (1, 5, 224)),
        (nn.Conv2d(6, 4, 3), (1, 6, 224, 224)),
        (nn.Conv3d(2, 4, 3), (1, 2, 16, 112, 112)),
        (nn.Linear(7, 4), (1, 7)),
    ],
    ids=["conv1d", "conv2d", "conv3d", "linear"],
)
def test_infer_input_shape_from_the_first_layer(first, shape):
    model = nn.Sequential(nn.Identity(), first, nn.ReLU(), nn.Linear(4, 2))
    inferred, note = infer_input_shape(model)
    assert inferred == shape
    assert f"assumed input shape {list(shape)}" in note
    assert "'1'" in note  # the path of the layer it was read from


def test_infer_input_shape_without_conv_or_linear():
    with pytest.raises(RepfuseError, match="--input-shape"):
        infer_input_shape(nn.Sequential(nn.ReLU(), nn.Flatten()))


class StandardizedConv2d(nn.Conv2d):
    """A Conv2d subclass, as many model libraries define (weight standardization, same padding)."""


def test_infer_input_shape_for_a_conv2d_subclass():
    inferred, _ = infer_input_shape(nn.Sequential(StandardizedConv2d(3, 4, 3)))
    assert inferred == (1, 3, 224, 224)


# --- writing ------------------------------------------------------------------------------------


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "model.pt"

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old contents")

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new contents"))
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_save_model_round_trips_and_refuses_other_suffixes(tmp_path, tiny):
    path = tmp_path / "copy.pt"
    save_model(tiny, path)
    assert_same_function(torch.load(path, weights_only=False), tiny)
    with pytest.raises(RepfuseError, match="use .pt"):
        save_model(tiny, tmp_path / "copy.onnx")
    assert not (tmp_path / "copy.onnx").exists()
