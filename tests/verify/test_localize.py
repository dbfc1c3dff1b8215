"""Tests of localization: the verifier names the first rewrite (or module) whose output diverges.

Every error in a localization table is recomputed here by hand, independently of the fx
machinery under test: a forward hook on the *unfused* model's module (run in float64) gives the
reference activation, a forward hook on the fused model's module gives the candidate's, and
``max|a - b|`` / ``max|a|`` between them must equal the table's numbers.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import random_input
from torch import Tensor, nn

import repfuse
from repfuse.export.deploy import load_by_structure
from repfuse.models import create_model, randomize_bn_stats
from repfuse.passes import history
from repfuse.verify.compare import DEFAULT_TOLERANCES

TINY_SHAPE = (1, 3, 32, 32)


def localized(*args, **kwargs):
    """:func:`repfuse.verify` localizing also when the outputs match (what these tests
    examine; by default it localizes only on failure)."""
    return repfuse.verify(*args, localize_divergence=True, **kwargs)


def activation64(model: nn.Module, path: str, x: Tensor, call: int = 0) -> Tensor:
    """The output of ``model``'s submodule ``path`` (its ``call``-th call) when a float64 copy
    of ``model`` runs on ``x``."""
    copy64 = copy.deepcopy(model).double().eval()
    seen: list[Tensor] = []
    handle = copy64.get_submodule(path).register_forward_hook(
        lambda _m, _args, out: seen.append(out))
    with torch.no_grad():
        copy64(x.double())
    handle.remove()
    return seen[call]


def hand_error(reference: Tensor, candidate: Tensor) -> tuple[float, float]:
    """``max|a - b|`` and ``max|a - b| / max|a|``."""
    diff = (reference - candidate).abs().max().item()
    return diff, diff / reference.abs().max().item()


def saved_and_loaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, Tensor, torch.fx.GraphModule]:
    model = create_model("resnet_tiny")
    x = random_input(TINY_SHAPE, seed=3)
    return model, x, repfuse.fuse(model, x)


def perturbed_copy(fused: nn.Module, path: str, relative: float = 0.01) -> nn.Module:
    """A copy of ``fused`` whose layer at ``path`` has its weight scaled by ``1 + relative``."""
    wrong = copy.deepcopy(fused)
    with torch.no_grad():
        wrong.get_submodule(path).weight.mul_(1 + relative)
    return wrong


# --- provenance ---------------------------------------------------------------------------------


def test_every_fold_is_checked_at_its_boundary_against_the_batchnorm(tiny):
    model, x, fused = tiny
    report = localized(model, fused, x, batches=1)
    data = report.to_dict()

    assert report.passed
    assert report.first_divergence is None and data["first_divergence"] is None
    assert data["localization"]["method"] == "provenance"
    bns = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    rows = data["rewrites"]
    assert len(rows) == len(bns) == 12
    assert {tuple(r["module_paths"])[1] for r in rows} == set(bns)
    for row, rewrite in zip(rows, history(fused).rewrites, strict=True):
        conv, bn = row["module_paths"]
        assert row["pass"] == "fold_batchnorm" and row["node"] == rewrite.node
        assert row["reference_node"] == bn.replace(".", "_")
        max_abs, max_rel = hand_error(activation64(model, bn, x), activation64(fused, conv, x))
        assert row["max_abs"] == pytest.approx(max_abs, rel=1e-9)
        assert row["max_rel"] == pytest.approx(max_rel, rel=1e-9)
        assert row["passed"] and 0 < row["max_rel"] < 1e-6  # float32 weights, exact fold


@pytest.mark.parametrize("conv, bn", [
    ("conv1", "bn1"),
    ("layer2.0.conv1", "layer2.0.bn1"),
    ("layer3.0.downsample.0", "layer3.0.downsample.1"),
    ("layer4.0.conv2", "layer4.0.bn2"),
])
def test_a_perturbed_fused_conv_is_named_with_its_original_modules(tiny, conv, bn):
    model, x, fused = tiny
    wrong = perturbed_copy(fused, conv)
    report = localized(model, wrong, x, batches=1)

    assert not report.passed
    first = report.first_divergence
    assert first["kind"] == "rewrite" and first["pass"] == "fold_batchnorm"
    assert first["module_paths"] == [conv, bn]
    rewrite = next(r for r in history(fused).rewrites if r.module == conv)
    assert first["node"] == rewrite.node
    max_abs, max_rel = hand_error(activation64(model, bn, x), activation64(wrong, conv, x))
    assert first["max_abs"] == pytest.approx(max_abs, rel=1e-9)
    assert max_rel > 1e-3  # far outside float32's 1e-5
    rows = report.to_dict()["rewrites"]
    index = next(i for i, r in enumerate(rows) if r["node"] == rewrite.node)
    assert all(r["passed"] for r in rows[:index])  # nothing before it diverges
    assert report.to_dict()["first_divergence"] == first


def test_a_model_loaded_back_from_a_file_is_localized_from_its_saved_history(tiny):
    model, x, _ = tiny
    wrong = repfuse.fuse(model, x)  # not a deep copy: see the xfail test below
    with torch.no_grad():
        wrong.get_submodule("layer2.0.conv2").weight.mul_(1.01)
    loaded = saved_and_loaded(wrong)
    # torch.save's loader renames the graph's nodes: the recorded names are not its names.
    names = {n.name for n in loaded.graph.nodes}
    assert history(loaded).rewrites[0].node not in names

    live = localized(model, wrong, x, batches=2).to_dict()
    again = localized(model, loaded, x, batches=2).to_dict()

    assert again["first_divergence"]["module_paths"] == ["layer2.0.conv2", "layer2.0.bn2"]
    assert again["first_divergence"] == live["first_divergence"]
    assert [r["node"] for r in again["rewrites"]] == [r["node"] for r in live["rewrites"]]
    for a, b in zip(again["rewrites"], live["rewrites"], strict=True):
        assert a["max_abs"] == pytest.approx(b["max_abs"], rel=1e-12, abs=1e-300)


def test_a_deep_copy_of_a_fused_model_keeps_its_history_through_a_file(tiny):
    _, _, fused = tiny
    loaded = saved_and_loaded(copy.deepcopy(fused))
    assert len(history(loaded).rewrites) == len(history(fused).rewrites) == 12


def test_a_divergence_outside_any_rewrite_is_named_as_a_shared_node(tiny):
    model, x, fused = tiny
    wrong = copy.deepcopy(fused)
    with torch.no_grad():
        wrong.fc.bias.add_(0.1)  # fc has no BatchNorm: no rewrite touched it
    shift = (wrong.fc.bias.double() - fused.fc.bias.double()).abs().max().item()
    report = localized(model, wrong, x, batches=1)
    first = report.first_divergence
    assert first["kind"] == "node" and first["pass"] is None
    assert first["node"] == "fc" and first["module_paths"] == ["fc"]
    # the bias shift, up to the float32 rounding of fc's inputs (~1e-7)
    assert first["max_abs"] == pytest.approx(shift, abs=1e-6)
    assert all(r["passed"] for r in report.to_dict()["rewrites"])


def test_a_branch_merge_names_every_branch_and_the_folds_inside_it():
    model = create_model("repvgg_tiny")
    x = random_input(TINY_SHAPE, seed=5)
    fused = repfuse.fuse(model, x)
    merges = [r for r in history(fused).rewrites if r.pass_name == "merge_branches"]
    target = merges[2]
    wrong = perturbed_copy(fused, target.module)

    report = localized(model, wrong, x, batches=1)
    data = report.to_dict()
    assert [r["node"] for r in data["rewrites"]] == [m.node for m in merges]
    first = data["first_divergence"]
    assert first["pass"] == "merge_branches" and first["node"] == target.node
    assert first["module_paths"] == list(target.module_paths)
    block = target.module.rsplit(".", 2)[0]  # e.g. stage2.0
    branches = {p for p in target.module_paths}
    assert {f"{block}.dense.conv", f"{block}.dense.bn", f"{block}.pointwise.conv",
            f"{block}.pointwise.bn"} <= branches
    row = data["rewrites"][2]
    assert sum(item.startswith("fold_batchnorm:") for item in row["includes"]) >= 2
    assert all(r["passed"] for r in data["rewrites"][:2])
    # The merged conv stands for the sum of the branches: the block's add in the reference.
    reference_sum = activation64_of_node(model, x, first["reference_node"])
    max_abs, _ = hand_error(reference_sum, activation64(wrong, target.module, x))
    assert first["max_abs"] == pytest.approx(max_abs, rel=1e-9)


def activation64_of_node(model: nn.Module, x: Tensor, name: str) -> Tensor:
    """The value of node ``name`` in a plain ``torch.fx.symbolic_trace`` of ``model``, or in
    ``model``'s own graph if it is a GraphModule, run in float64."""
    gm = copy.deepcopy(model).double().eval()
    if not isinstance(gm, torch.fx.GraphModule):
        gm = torch.fx.symbolic_trace(gm)
    node = next(n for n in gm.graph.nodes if n.name == name)
    gm.graph.erase_node(next(n for n in gm.graph.nodes if n.op == "output"))
    gm.graph.output(node)
    gm.graph.eliminate_dead_code()  # nothing after it runs (an in-place ReLU would change it)
    gm.recompile()
    with torch.no_grad():
        return gm(x.double())


def half_precision() -> torch.dtype:
    try:
        nn.Conv2d(3, 4, 3).half()(torch.zeros(1, 3, 5, 5, dtype=torch.float16))
    except RuntimeError:
        pytest.skip("no float16 conv on this CPU build")
    return torch.float16


def test_a_float16_model_is_checked_with_float16_tolerances_in_both_runs(tiny):
    dtype = half_precision()
    model, x, _ = tiny
    model16 = copy.deepcopy(model).to(dtype)
    x16 = x.to(dtype)
    fused = repfuse.fuse(model16, x16)
    report = localized(model16, fused, x16, batches=1)

    tolerance = DEFAULT_TOLERANCES[torch.float16]
    assert report.passed, report.summary_lines()
    assert [r.dtype for r in report.runs] == ["float64", "float16"]
    assert all(r.tolerance == tolerance for r in report.runs)
    truth = activation64(model16, "fc", x16)
    _, rel64 = hand_error(truth, activation64(fused, "fc", x16))
    with torch.no_grad():
        _, rel16 = hand_error(truth, fused(x16).double())
    assert report.float64.outputs[0].metrics.max_rel == pytest.approx(rel64, rel=1e-9)
    assert report.deploy.outputs[0].metrics.max_rel == pytest.approx(rel16, rel=1e-9)
    # float16 rounding of the folded weights shows in float64 too, within float16's tolerance
    assert 1e-5 < rel64 < tolerance.rtol and 1e-5 < rel16 < tolerance.rtol
    data = report.to_dict()
    assert data["localization"]["tolerance"] == tolerance.to_dict()
    assert len(data["rewrites"]) == 12 and all(r["passed"] for r in data["rewrites"])

    wrong = perturbed_copy(fused, "layer3.0.conv1", relative=0.1)
    bad = localized(model16, wrong, x16, batches=1)
    assert not bad.passed
    assert bad.first_divergence["module_paths"] == ["layer3.0.conv1", "layer3.0.bn1"]


# --- module paths -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_and_deploy() -> tuple[nn.Module, nn.Module, Tensor]:
    """resnet_tiny in train form and its hand-written deploy form with the fused weights."""
    model = create_model("resnet_tiny")
    x = random_input(TINY_SHAPE, seed=7)
    deploy = load_by_structure(create_model("resnet_tiny", deploy=True),
                               repfuse.fuse(model, x), x)
    return model, deploy, x


def test_an_equivalent_deploy_model_passes_although_some_modules_differ(train_and_deploy):
    model, deploy, x = train_and_deploy
    report = localized(model, deploy, x, batches=1)
    data = report.to_dict()
    assert report.passed and report.first_divergence is None
    assert data["localization"]["method"] == "module_paths"
    rows = {(m["module"], m["call"]): m for m in data["modules"]}
    # A train-form conv's output is before its BatchNorm, the deploy conv's after: they differ
    # by design, and are marked as of different structure (the deploy conv has a bias).
    assert not rows[("layer1.0.conv1", 0)]["passed"]
    assert not rows[("layer1.0.conv1", 0)]["same_structure"]
    relu = rows[("layer1.0.relu", 0)]
    assert relu["same_structure"] and relu["passed"]
    max_abs, _ = hand_error(activation64(model, "layer1.0.relu", x),
                            activation64(deploy, "layer1.0.relu", x))
    assert relu["max_abs"] == pytest.approx(max_abs, rel=1e-9)
    assert all(m["passed"] for m in data["modules"] if m["same_structure"])


def test_a_perturbed_deploy_conv_is_found_between_matching_modules(train_and_deploy):
    model, deploy, x = train_and_deploy
    wrong = copy.deepcopy(deploy)
    with torch.no_grad():
        wrong.layer2[0].conv1.weight.mul_(1.01)
    report = localized(model, wrong, x, batches=1)
    assert not report.passed
    first = report.first_divergence
    # the first module of the same structure that differs: the ReLU right after the conv
    assert first["kind"] == "module" and first["pass"] is None
    assert first["node"] == "layer2.0.relu"
    assert first["module_paths"] == ["layer2.0.conv1", "layer2.0.bn1"]  # the suspects
    max_abs, _ = hand_error(activation64(model, "layer2.0.relu", x),
                            activation64(wrong, "layer2.0.relu", x))
    assert first["max_abs"] == pytest.approx(max_abs, rel=1e-9)


def test_two_models_of_one_structure_are_localized_to_the_changed_layer(train_and_deploy):
    _, deploy, x = train_and_deploy
    wrong = copy.deepcopy(deploy)
    with torch.no_grad():
        wrong.layer3[0].conv2.bias.add_(0.05)
    shift = (wrong.layer3[0].conv2.bias.double() - deploy.layer3[0].conv2.bias.double())
    report = localized(deploy, wrong, x, batches=1)
    first = report.first_divergence
    assert first["node"] == "layer3.0.conv2" and first["module_paths"] == ["layer3.0.conv2"]
    assert first["max_abs"] == pytest.approx(shift.abs().max().item(), rel=1e-12)


class Untraceable(nn.Module):
    """Conv-BN-ReLU twice, with a branch on a tensor's value that torch.fx cannot trace."""

    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=deploy)
        self.bn1 = nn.Identity() if deploy else nn.BatchNorm2d(6)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 4, 3, bias=deploy)
        self.bn2 = nn.Identity() if deploy else nn.BatchNorm2d(4)
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 1e9:  # data-dependent: not traceable
            x = -x
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


def test_without_an_fx_graph_the_suspects_are_the_modules_run_since_the_last_match():
    model = randomize_bn_stats(Untraceable(), seed=1).eval()
    deploy = Untraceable(deploy=True).eval()
    with torch.no_grad():  # fold by hand (the verifier must not need repfuse to have done it)
        for conv, bn, out in ((model.conv1, model.bn1, deploy.conv1),
                              (model.conv2, model.bn2, deploy.conv2)):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            out.weight.copy_(conv.weight * scale[:, None, None, None])
            out.bias.copy_(bn.bias - bn.running_mean * scale)
    x = random_input((2, 3, 8, 8), seed=2)
    assert localized(model, deploy, x).passed
    with torch.no_grad():
        deploy.conv2.weight.mul_(1.01)
    report = localized(model, deploy, x, batches=1)
    first = report.first_divergence
    # act1 matches; conv2 (bias or not) and bn2 (BatchNorm vs Identity) differ in structure;
    # act2 is the first same-structure module to differ, and they are the suspects.
    assert first["kind"] == "module" and first["node"] == "act2"
    assert first["module_paths"] == ["conv2", "bn2"]
    assert "no fx graph" in report.localization.note
    max_abs, _ = hand_error(activation64(model, "act2", x), activation64(deploy, "act2", x))
    assert first["max_abs"] == pytest.approx(max_abs, rel=1e-9)


class MaskedChannel(nn.Module):
    """Conv-BN-ReLU whose BatchNorm shifts channel 0 so far down that the ReLU zeroes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


def test_a_rewrite_error_masked_downstream_is_still_named():
    model = randomize_bn_stats(MaskedChannel(), seed=2).eval()
    with torch.no_grad():
        model.bn.bias[0] = -1000.0
    x = random_input((2, 3, 6, 6), seed=1)
    fused = repfuse.fuse(model, x)
    with torch.no_grad():
        fused.conv.bias[0] += 1.0  # channel 0 stays far below zero: the output is unchanged
    report = localized(model, fused, x, batches=1)
    assert report.passed  # the outputs match ...
    first = report.first_divergence  # ... but the fold's boundary does not
    assert first["pass"] == "fold_batchnorm" and first["module_paths"] == ["conv", "bn"]
    max_abs, _ = hand_error(activation64(model, "bn", x), activation64(fused, "conv", x))
    assert first["max_abs"] == pytest.approx(max_abs, rel=1e-9)
    assert max_abs == pytest.approx(1.0, abs=1e-3)
    assert any("outputs still match" in line for line in report.summary_lines())


class InPlace(nn.Module):
    """Conv-BN-ReLU with an in-place ReLU, as torchvision writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(True)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.bn(self.conv(x))))


def test_in_place_activations_do_not_corrupt_the_compared_values():
    model = randomize_bn_stats(InPlace(), seed=3).eval()
    x = random_input((2, 3, 8, 8), seed=4)
    fused = repfuse.fuse(model, x)
    report = localized(model, fused, x, batches=1)
    assert report.passed and report.first_divergence is None
    (row,) = report.to_dict()["rewrites"]
    # The BN's output before the in-place ReLU rectified it: negative values included.
    reference_bn = activation64_of_node(model, x, "bn")
    assert reference_bn.min() < 0
    max_abs, _ = hand_error(reference_bn, activation64_of_node(fused, x, "conv_1"))
    assert row["node"] == "conv_1" and row["max_abs"] == pytest.approx(max_abs, rel=1e-9)
    assert row["max_rel"] < 1e-6


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class BranchyNet(nn.Module):
    """A forward that branches on a tensor's value (not traceable) around traceable blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block1, self.block2 = nn.Conv2d(3, 4, 1), Block(4), Block(4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.block1(x if x.sum() > 0 else -x)
        return self.block2(x)


def test_a_partially_captured_model_is_localized_in_its_fused_parts():
    from repfuse.convert import convert

    model = randomize_bn_stats(BranchyNet(), seed=0).eval()
    x = random_input((2, 3, 8, 8), seed=6)
    fused = convert(model, x, verify=None).fused
    assert not isinstance(fused, torch.fx.GraphModule)  # eager, with fused parts
    with torch.no_grad():
        fused.block2.conv.weight.mul_(1.01)
    report = localized(model, fused, x, batches=1)
    data = report.to_dict()
    assert data["localization"]["method"] == "provenance"
    assert [r["module_paths"] for r in data["rewrites"]] == [["block1.conv", "block1.bn"],
                                                             ["block2.conv", "block2.bn"]]
    first = report.first_divergence
    assert first["pass"] == "fold_batchnorm" and first["module_paths"] == ["block2.conv",
                                                                           "block2.bn"]
    assert first["node"].startswith("block2/")
    # Each part is judged on the input the reference gives it.
    seen: list[Tensor] = []
    ref64 = copy.deepcopy(model).double()
    ref64.block2.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        ref64(x.double())
    max_abs, _ = hand_error(activation64(model.block2, "bn", seen[0]),
                            activation64(fused.block2, "conv", seen[0]))
    assert first["max_abs"] == pytest.approx(max_abs, rel=1e-9)
