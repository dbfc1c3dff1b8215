"""``repfuse bench`` and :func:`repfuse.bench.benchmark`: the numbers against independent counts.

Op counts are checked against the aten ops the eager models really execute (counted by a
:class:`TorchDispatchMode`, not from any fx graph); parameters against ``p.numel()`` of the
train form and of the hand-written deploy form; MACs against forward hooks on the conv and
linear modules; the error field against :func:`conftest.reference64`. Latency is only checked
to be positive and finite (no timing assertions).
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import random_input, reference64, rel_err
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from repfuse.bench import OP_KINDS, benchmark, parse_batch_sizes, with_batch
from repfuse.cli import main
from repfuse.errors import RepfuseError
from repfuse.models import create_model, get_spec

FAST = {"repeat": 2, "warmup": 1}


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("repfuse: error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


class _AtenCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def executed_kinds(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Ops per kind as the eager run executes them (aten level; these zoo models use ReLU
    only, and ``addmm`` only for their Linear)."""
    with torch.no_grad(), _AtenCounter() as counter:
        model.eval()(x)
    aten = counter.counts
    return {"conv": aten["convolution"], "batchnorm": aten["native_batch_norm"],
            "add": aten["add"], "cat": aten["cat"], "activation": aten["relu"],
            "linear": aten["addmm"]}


def hooked_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Conv and linear MACs from forward hooks: output size times the reduction length."""
    total = 0

    def count(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            reduction = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            reduction = module.in_features
        total += output.numel() * reduction

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module", params=["resnet_tiny", "repvgg_tiny", "googlenet_tiny"])
def benched(request):
    name = request.param
    torch.manual_seed(0)
    model = create_model(name)
    x = random_input(get_spec(name).input_shape)
    return name, model, x, benchmark(model, x, batches=(1, 3), name=name, **FAST)


def test_op_counts_match_the_ops_each_model_executes(benched):
    name, model, x, result = benched
    fused = result.conversion.fused
    expected_before, expected_after = executed_kinds(model, x), executed_kinds(fused, x)
    for kind, count in expected_before.items():
        assert result.original.ops_by_kind[kind] == count, kind
        assert result.fused.ops_by_kind[kind] == expected_after[kind], kind
    assert result.fused.ops_by_kind["batchnorm"] == 0
    # The hand-written deploy form executes as many convs (googlenet: repfuse also runs
    # sibling 1x1 convs of one input as one conv).
    deploy_convs = executed_kinds(create_model(name, deploy=True), x)["conv"]
    assert result.fused.ops_by_kind["conv"] <= deploy_convs
    for stats in (result.original, result.fused):
        assert set(stats.ops_by_kind) == set(OP_KINDS)
        assert stats.ops == sum(stats.ops_by_kind.values())


def test_params_and_macs_match_independent_counts(benched):
    name, model, x, result = benched
    deploy = create_model(name, deploy=True)
    assert result.original.params == params_of(model)
    assert result.fused.params == params_of(deploy)  # same weights as the deploy form
    assert result.original.macs == hooked_macs(model, x)
    assert result.fused.macs == hooked_macs(result.conversion.fused, x)
    assert 0 < result.fused.bytes < result.original.bytes  # no BatchNorm to read and write


def test_error_is_the_fused_model_against_the_float64_original(benched):
    _, model, x, result = benched
    for entry in result.batches:
        inputs = x.repeat(entry.batch, 1, 1, 1)
        expected = rel_err(reference64(model, inputs), result.conversion.fused(inputs))
        assert entry.max_rel_error["fused"] == pytest.approx(expected, rel=1e-6)
        own = rel_err(reference64(model, inputs), model(inputs))
        assert entry.max_rel_error["original"] == pytest.approx(own, rel=1e-6)
        assert 0 < entry.max_rel_error["fused"] < 1e-5
        assert 0 < entry.max_rel_error["original"] < 1e-5


def test_latency_is_measured_per_batch_size(benched):
    _, _, x, result = benched
    assert [b.batch for b in result.batches] == [1, 3]
    assert [b.input_shapes for b in result.batches] == [[[1, *x.shape[1:]]], [[3, *x.shape[1:]]]]
    for entry in result.batches:
        for timing in (entry.original, entry.fused):
            assert timing.runs == FAST["repeat"]
            assert 0 < timing.min_ms <= timing.median_ms < math.inf
        assert entry.speedup == entry.original.median_ms / entry.fused.median_ms


def test_larger_batches_repeat_the_examples_rows():
    x = random_input((2, 3, 4, 4))
    (batched,) = with_batch((x,), 5)
    assert batched.shape == (5, 3, 4, 4)
    assert torch.equal(batched, torch.cat([x, x, x[:1]]))
    assert with_batch((x,), 2)[0] is x


def test_progress_is_told_every_round():
    model = create_model("repvgg_tiny")
    x = random_input(get_spec("repvgg_tiny").input_shape)
    seen = []
    benchmark(model, x, batches=(1, 2), progress=lambda *step: seen.append(step), **FAST)
    total = 1 + 2 * (FAST["warmup"] + FAST["repeat"] + 1)
    assert {t for _, _, t in seen} == {total}
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and done[0] == 0 and done[-1] == total
    assert set(range(total + 1)) <= set(done)  # no step skipped
    assert [w for w, _, _ in seen][0] == "converting model"
    assert any(w == "timing batch 2" for w, _, _ in seen)


def test_passes_and_allow_costlier_reach_the_conversion():
    model = create_model("repvgg_tiny")
    x = random_input(get_spec("repvgg_tiny").input_shape)
    result = benchmark(model, x, passes="remove_noops", **FAST)
    assert result.fused.ops_by_kind == result.original.ops_by_kind  # nothing merged
    assert set(result.conversion.passes.counts()) == {"remove_noops"}


class ShapeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * 2 if y.shape[-1] == 6 else y


def test_a_shape_specialized_model_benches_at_one_batch_size_only():
    model, x = ShapeBranch(), random_input((2, 3, 8, 8))
    result = benchmark(model, x, batches=(4,), **FAST)
    assert result.to_dict()["capture"]["specialized"]
    assert result.input_shapes == [[4, 3, 8, 8]]  # converted at the batch it runs
    with pytest.raises(RepfuseError, match="one batch size at a time"):
        benchmark(model, x, batches=(2, 4), **FAST)


@pytest.mark.parametrize(("text", "sizes"), [(["1,8"], (1, 8)), (["1", "8", "1"], (1, 8)),
                                             (["16"], (16,)), ([], ())])
def test_batch_sizes_parse(text, sizes):
    assert parse_batch_sizes(text) == sizes


def test_params_count_weights_that_fold_constants_made_buffers():
    model = create_model("dynamic_conv_tiny")
    x = random_input(get_spec("dynamic_conv_tiny").input_shape)
    banks = sum(p.numel() for n, p in model.named_parameters() if n.endswith("conv.weight")
                and p.dim() == 5)
    result = benchmark(model, x, **FAST)
    assert result.fused.params >= banks


# --- the command ----------------------------------------------------------------------------


@pytest.fixture
def keep_threads():
    """``--threads`` sets torch's thread count for the whole process: restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_json_on_stdout_and_the_table_on_stderr(keep_threads):
    result = cli("bench", "repvgg_tiny", "--batch", "1,2", "--batch", "3", "--repeat", 2,
                 "--warmup", 0, "--threads", 1, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # nothing else on stdout
    assert data["schema_version"] == 1 and data["model"] == "repvgg_tiny"
    assert data["torch"] == torch.__version__ and data["threads"] == 1
    assert (data["repeat"], data["warmup"], data["dtype"]) == (2, 0, "float32")
    assert data["input_shapes"] == [[1, 3, 32, 32]]
    assert data["convert_seconds"] > 0
    assert data["capture"] == {"partial": False, "specialized": []}
    model = create_model("repvgg_tiny")
    for role, form in (("original", model), ("fused", create_model("repvgg_tiny", deploy=True))):
        stats = data["models"][role]
        assert set(stats) == {"params", "macs", "bytes", "ops", "ops_by_kind"}
        assert list(stats["ops_by_kind"]) == list(OP_KINDS)
        assert stats["ops"] == sum(stats["ops_by_kind"].values())
        assert stats["params"] == params_of(form)
        assert stats["ops_by_kind"]["conv"] == executed_kinds(form, random_input((1, 3, 32, 32)))[
            "conv"]
    assert [b["batch"] for b in data["batches"]] == [1, 2, 3]
    for entry in data["batches"]:
        assert entry["input_shapes"] == [[entry["batch"], 3, 32, 32]]
        for timing in entry["latency_ms"].values():
            assert timing["runs"] == 2 and 0 < timing["min_ms"] <= timing["median_ms"]
        latency = entry["latency_ms"]
        assert entry["speedup"] == pytest.approx(
            latency["original"]["median_ms"] / latency["fused"]["median_ms"])
        assert 0 < entry["max_rel_error"]["fused"] < 1e-5
    table = result.stderr
    for row in ("latency, batch 1: median ms", "latency, batch 3: min ms",
                "max rel error, batch 2", "params", "MACs, batch 1",
                "bytes moved, batch 1", "ops (all)", "ops: conv", "ops: batchnorm", "ops: add",
                "original/fused"):
        assert row in table, row
    assert "ops: cat" not in table  # no concat in either model


def test_table_rows_hold_the_numbers():
    result = cli("bench", "resnet_tiny", "--repeat", 2, "--warmup", 0)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    model = create_model("resnet_tiny")
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]]
            for line in result.stderr.splitlines() if line.startswith("│")}
    assert rows["params"][0] == f"{params_of(model):,}"
    assert rows["params"][1] == f"{params_of(create_model('resnet_tiny', deploy=True)):,}"
    assert rows["ops: batchnorm"] == ["12", "0", "-"]
    assert rows["ops: conv"] == ["12", "12", "1.00x"]


@pytest.mark.parametrize("args", [["nosuchmodel"], ["repvgg_tiny", "--batch", "0"],
                                  ["repvgg_tiny", "--batch", "1,x"],
                                  ["repvgg_tiny", "--batch", "1,,8"],
                                  ["repvgg_tiny", "--passes", "nosuchpass"]],
                         ids=["unknown-model", "zero", "not-a-number", "empty", "unknown-pass"])
def test_bad_input_is_one_line_and_exit_2(args):
    line = one_error_line(cli("bench", *args))
    assert args[-1] in line

