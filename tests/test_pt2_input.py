"""A torch.export ``.pt2`` of a model fuses as much as the model itself.

Every small zoo model (random BatchNorm statistics) is exported with ``torch.export``, saved to a
``.pt2``, loaded the way the CLI loads it (:func:`repfuse.load_model`, weights-only) and fused
with the default pipeline; the same model is fused as a module. The two results must have the
same op counts (convs, linear layers, batch norms, sums and concats left), counted here from the
node targets of every spelling, independently of repfuse's own views; and the fused program
must match the unfused model in float64. A few models are also checked in the inference IR that
``ExportedProgram.run_decompositions()`` writes (``aten.convolution``, batch norm read through
``getitem``, ``addmm``, ``slice_scatter``, ``clone``), and one end to end through
``repfuse convert model.pt2 -o out.pt2``.
"""

from __future__ import annotations

import copy
import functools
import operator
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import F32_RTOL, F64_RTOL, random_input, reference64, rel_err
from torch import nn
from torch.fx import GraphModule, Node

import repfuse
from repfuse.cli import main
from repfuse.io import load_model
from repfuse.models import create_model, get_spec, list_models

aten = torch.ops.aten

# Small enough to export and fuse twice in a few seconds each (the large zoo models have tiny
# variants built from the same blocks).
SMALL_MODELS = [s.name for s in list_models() if torch.Size(s.input_shape).numel() <= 40_000]
# Models torch.export cannot capture, and why (the test checks that it still cannot).
NOT_EXPORTABLE = {"branchynet_tiny": "its early exit is a Python branch on tensor values"}
# Models whose inference IR is checked too (each spelling of the table in the module docstring).
INFERENCE_IR_MODELS = ["repvgg_tiny", "acnet_resnet_tiny", "vgg_tiny", "vit_convstem_tiny"]

_CONVS = {F.conv1d, F.conv2d, F.conv3d, torch.conv2d, aten.conv1d.default,
          aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
# every matrix product: a Linear decomposed by export is addmm/mm, attention is matmul/bmm
_LINEARS = {F.linear, aten.linear.default, aten.addmm.default, aten.mm.default,
            aten.bmm.default, aten.matmul.default, operator.matmul, torch.matmul, torch.bmm,
            torch.mm}
_NORMS = {F.batch_norm, aten.batch_norm.default,
          aten._native_batch_norm_legit_no_training.default, aten.native_batch_norm.default}
_SUMS = {operator.add, operator.sub, torch.add, torch.sub, aten.add.Tensor, aten.sub.Tensor}
_CATS = {torch.cat, torch.concat, torch.stack, aten.cat.default, aten.stack.default}


def _kind(gm: GraphModule, node: Node) -> str | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for kind, types in (("conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d)), ("linear", nn.Linear),
                            ("batchnorm", nn.modules.batchnorm._BatchNorm)):
            if isinstance(module, types):
                return kind
        return None
    activations = len(node.args) == 2 and all(
        isinstance(a, Node) and a.op != "get_attr" for a in node.args)
    if node.op == "call_method":
        if node.target in ("add", "sub") and activations:
            return "sum"
        return "linear" if node.target in ("matmul", "mm", "bmm") else None
    if node.op != "call_function":
        return None
    for kind, targets in (("conv", _CONVS), ("linear", _LINEARS), ("batchnorm", _NORMS),
                          ("concat", _CATS)):
        if node.target in targets:
            return kind
    return "sum" if node.target in _SUMS and activations else None


def op_counts(model: nn.Module) -> dict[str, int]:
    """Convs, linear layers (matrix products), batch norms, sums and concats in every traced
    part of ``model``."""
    counts: Counter[str] = Counter()
    for gm in model.modules():
        if isinstance(gm, GraphModule):
            counts.update(k for k in (_kind(gm, n) for n in gm.graph.nodes) if k is not None)
    return dict(sorted(counts.items()))


@functools.cache
def exported(name: str) -> tuple[nn.Module, torch.Tensor, torch.export.ExportedProgram]:
    """The zoo model in float64, its example input and its training-IR export (each model is
    exported once for the training and the inference IR)."""
    spec = get_spec(name)
    model = create_model(name).double().eval()
    x = random_input(spec.input_shape, dtype=torch.float64)
    return model, x, torch.export.export(copy.deepcopy(model), (x,))


def check_as_the_module(name: str, tmp_path: Path, decompose: bool) -> None:
    model, x, program = exported(name)
    if decompose:
        program = program.run_decompositions()
    path = tmp_path / f"{name}.pt2"
    torch.export.save(program, path)
    loaded = load_model(str(path))
    assert loaded.input_shape == tuple(x.shape)
    before = op_counts(loaded.module)

    from_program = repfuse.fuse(loaded.module, x)

    after = op_counts(from_program)
    assert after == op_counts(repfuse.fuse(model, x))
    assert after != before  # something was fused
    with torch.no_grad():
        assert rel_err(reference64(model, x), from_program(x)) <= F64_RTOL


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export.load's own
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_exported_model_fuses_as_the_module(tmp_path, name):
    if name in NOT_EXPORTABLE:
        model = create_model(name).eval()
        with pytest.raises(Exception):  # noqa: B017  (whatever torch.export raises)
            torch.export.export(model, (random_input(get_spec(name).input_shape),))
        return
    check_as_the_module(name, tmp_path, decompose=False)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", INFERENCE_IR_MODELS)
def test_inference_ir_fuses_as_the_module(tmp_path, name):
    check_as_the_module(name, tmp_path, decompose=True)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_convert_pt2_to_pt2_from_the_command_line(tmp_path):
    name = "repvgg_tiny"
    model = create_model(name).eval()
    x = random_input(get_spec(name).input_shape)
    program = tmp_path / "repvgg.pt2"
    torch.export.save(torch.export.export(copy.deepcopy(model), (x,)).run_decompositions(),
                      program)
    out = tmp_path / "repvgg.fused.pt2"

    result = CliRunner().invoke(main, ["convert", str(program), "-o", str(out)])

    assert result.exit_code == 0, result.output
    fused = load_model(str(out)).module
    assert op_counts(fused) == op_counts(repfuse.fuse(model, x)) == {"conv": 7, "linear": 1}
    with torch.no_grad():
        assert rel_err(reference64(model, x), fused(x)) <= F32_RTOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repvgg.fused.pt2", "repvgg.pt2"]
