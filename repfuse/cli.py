"""The ``repfuse`` command line: options parsed into :func:`repfuse.convert`, :func:`verify`
and :func:`repfuse.bench.benchmark`, and their result printed (:mod:`repfuse.verify.render`).

Exit codes: 0 ok / equivalent, 1 not equivalent, 2 bad input or usage, 3 internal error (a bug
in repfuse). An APPROXIMATE result (``--prune-below``, or a candidate made with it) is never
called equivalent: 0 with its measured error reported, 1 only when it exceeds a tolerance given
with ``--rtol``/``--atol`` (:class:`repfuse.convert.Approximation`). Errors are one line on
stderr; ``--debug`` shows the traceback. Human-readable output goes to stderr, machine output
(``--json``) to stdout.

Options shared by commands come in groups (:func:`option_group`): a group's values reach the
command as one dict, keyed by parameter name, which is passed on as keyword arguments (the
fusion group to :func:`repfuse.convert`, the verification group to
:class:`~repfuse.verify.VerifyOptions`, ...). A new option is one ``click.option`` in its group
plus the keyword it feeds; a new command is one function here that loads with
:func:`load_source` and prints with :func:`~repfuse.verify.render.render_terminal`.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.progress import Progress
from torch import Tensor

from repfuse.bench import benchmark, parse_batch_sizes
from repfuse.convert import (
    DeployForm,
    EmitCode,
    ExportOptions,
    QuantOptions,
    convert,
    example_inputs,
    made_by,
    plan_outputs,
    verify_candidate,
    verify_report,
)
from repfuse.errors import RepfuseError
from repfuse.export.base import dynamic_axes_of
from repfuse.io import (
    LoadedModel,
    forward_parameters,
    input_shapes_for,
    load_model,
)
from repfuse.memory import check_memory
from repfuse.models import list_models
from repfuse.passes import DEFAULT_PIPELINE, REGISTRY, history
from repfuse.verify import InputSet, ProgressCallback, VerifyOptions
from repfuse.verify.inputs import load_batches
from repfuse.verify.render import (
    check_report_path,
    render_json,
    render_terminal,
    terminal_console,
    write_report,
)

EXIT_OK, EXIT_NOT_EQUIVALENT, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def handles_errors(command):
    """Add ``--debug`` and turn exceptions into one line and an exit code. An error that
    carries a conversion (an export failing after verification) prints its summary first."""

    @click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
    @functools.wraps(command)
    def wrapper(*args, debug: bool, **kwargs):
        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except RepfuseError as exc:
            if debug:
                raise
            done = getattr(exc, "conversion", None)
            if done is not None:
                render_terminal(done, terminal_console())
            click.echo(f"repfuse: error: {_one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("repfuse: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if debug:
                raise
            click.echo(
                f"repfuse: internal error: {type(exc).__name__}: {_one_line(exc)} "
                "(a bug in repfuse; re-run with --debug for the traceback)", err=True,
            )
            sys.exit(EXIT_INTERNAL)

    return wrapper


def option_group(name: str, *options: Callable) -> Callable:
    """Add ``options`` to a command (listed in this order in ``--help``) and pass their values
    to it as one dict, the keyword ``name``, keyed by parameter name."""

    def probe() -> None:
        """Collects the parameter names of ``options``."""

    for option in options:
        option(probe)
    keys = [param.name for param in probe.__click_params__]

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            group = {key: kwargs.pop(key) for key in keys}
            return command(*args, **{name: group}, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


model_options = option_group(
    "source",
    click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]N,C,H,W",
                 help="Example input shape; repeat for each input of forward, in order or by "
                      "parameter name (image=1,3,224,224). Inferred from the first conv or "
                      "linear layer for a one-input model when omitted."),
    click.option("--arch", metavar="PKG.MOD:FACTORY",
                 help="Model factory (or zoo name) for a state-dict MODEL."),
    click.option("--trust", is_flag=True,
                 help="Allow loading a whole pickled module (runs code from the file; the "
                      "current directory is importable)."),
)

input_options = option_group(
    "data",
    click.option("--inputs", "inputs_spec", metavar="FILE|PKG.MOD:FN",
                 help="Verify on these batches: a .pt/.npy/.npz file of tensors (a tuple for "
                      "several inputs), or a function returning an iterable of batches (e.g. a "
                      "DataLoader)."),
    click.option("--max-batches", type=click.IntRange(min=1),
                 help="Use at most this many batches (of --inputs, or random ones)."),
    click.option("--distribution", type=click.Choice(["normal", "uniform"]), default="normal",
                 show_default=True, help="Random inputs: N(0, 1) or U[0, 1)."),
)

fusion_options = option_group(
    "fusion",
    click.option("--passes", metavar="a,b,...",
                 help="Passes to run, comma-separated (default: all; see `repfuse passes`)."),
    click.option("--allow-costlier", is_flag=True,
                 help="Also apply exact merges the cost model says do not pay."),
    click.option("--prune-below", type=float, metavar="T",
                 help="APPROXIMATE: treat channels whose BN |gamma| (or filter L2 norm, with "
                      "--prune-by norm) is below T as constant, so exact pruning removes them; "
                      "the result is labelled approximate, with its error against the original "
                      "(exit 0 unless --rtol/--atol are given and exceeded)."),
    click.option("--prune-by", type=click.Choice(["gamma", "norm"]),
                 help="What --prune-below compares with T: BN |gamma| (default, before the BN "
                      "folds) or the conv/linear filter's L2 norm (after them)."),
)

verify_options = option_group(
    "checking",
    click.option("--batches", default=3, show_default=True, type=click.IntRange(min=1),
                 help="Input batches to compare on (the example and seeded random ones)."),
    click.option("--seed", default=0, show_default=True, help="Seed of the random inputs."),
    click.option("--rtol", type=float, help="Relative tolerance (to max |reference|; >= 0)."),
    click.option("--atol", type=float, help="Absolute tolerance (>= 0)."),
    click.option("--localize/--no-localize", default=None,
                 help="Compare activations to find the first diverging rewrite: always, or "
                      "never (default: only when the outputs differ)."),
)

export_options = option_group(
    "exporting",
    click.option("--opset", type=click.IntRange(min=7), metavar="N",
                 help="ONNX opset of an .onnx output (default 17)."),
    click.option("--dynamic-batch", is_flag=True,
                 help="Make axis 0 a dynamic batch axis in an .onnx, .pt2 or .ts output."),
    click.option("--dynamic-axes", metavar="A,B,...",
                 help="Make these axes of every input dynamic in an .onnx, .pt2 or .ts output "
                      "(0 is the batch; 2,3 height and width of NCHW; negative from the end)."),
    click.option("--emit-code", type=click.Path(), metavar="DIR",
                 help="Also write the fused model as Python source (model.py) and weights "
                      "(weights.pt) into DIR; they load without repfuse."),
    click.option("--deploy-arch", metavar="PKG.MOD:FACTORY",
                 help="Load the fused weights by structure into this deploy-form model (or a "
                      "zoo model's deploy form, e.g. repvgg_a0), verify it, and write its "
                      "state dict to the .pt output."),
)

report_options = option_group(
    "reporting",
    click.option("--report", "reports", multiple=True, type=click.Path(dir_okay=False),
                 help="Write a report here: .json, .md or .html (by extension; repeatable)."),
    click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout."),
)


class _Group(click.Group):
    """Keeps the command line as given (``ctx.meta["argv"]``), for a report's provenance."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = ["repfuse", *args]
        return super().parse_args(ctx, args)


def command_line() -> list[str]:
    """The command line of the running command, as the user typed it."""
    return click.get_current_context().meta.get("argv", ["repfuse"])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="repfuse")
def main() -> None:
    """repfuse: exact structural reparameterization and fusion of PyTorch models.

    \b
    Examples:
      repfuse convert resnet18                      # a bundled model, no file needed
      repfuse convert model.pt --arch mypkg.nets:build -o model.fused.pt
      repfuse verify resnet18 resnet18.fused.pt --trust
      repfuse inspect resnet_tiny
      repfuse quant-report repvgg_tiny              # what INT8 will do to the fused model
      repfuse models                                # the bundled zoo
      repfuse passes
    """
    # torch.export.load pickles tree specs through a deprecated path; not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")


# --- loading ------------------------------------------------------------------------------------


@dataclass
class Source:
    """A loaded model, its example inputs, the user's batches (if any), what was assumed."""

    loaded: LoadedModel
    inputs: tuple[Tensor, ...]
    input_set: InputSet | None
    notes: list[str]

    @property
    def files(self) -> dict[str, Path]:
        return {"model": self.loaded.path} if self.loaded.path is not None else {}


def load_source(spec: str, source: dict, data: dict | None = None, batches: int = 3,
                arch: str | None = None) -> Source:
    """Load ``spec`` with the model options, work out its example input shapes, refuse shapes
    too large for this machine before drawing anything, and read the user's batches."""
    data = data or {"inputs_spec": None, "max_batches": None, "distribution": "normal"}
    loaded = load_model(spec, arch=arch or source["arch"], trust=source["trust"])
    module = loaded.module
    notes = list(loaded.notes)
    given = source["input_shapes"]
    names, required = forward_parameters(module)
    if data["inputs_spec"] is not None and not given and not loaded.input_shapes \
            and required > 1:
        # the batches say the shapes; their ranks are unknown, so a tuple is one batch
        input_set = load_batches(data["inputs_spec"], (None,) * required,
                                 max_batches=data["max_batches"], progress=True)
        return Source(loaded, _first_batch(input_set, module), input_set, notes)
    shapes, note = input_shapes_for(module, given, loaded.input_shapes)
    check_memory(module, shapes, batches)
    inputs = example_inputs(shapes, module, distribution=data["distribution"])
    if data["inputs_spec"] is None:
        return Source(loaded, inputs, None, notes + ([note] if note else []))
    input_set = load_batches(data["inputs_spec"], inputs, max_batches=data["max_batches"],
                             progress=True)
    return Source(loaded, _first_batch(input_set, module), input_set, notes)


def _first_batch(input_set: InputSet, module: torch.nn.Module) -> tuple[Tensor, ...]:
    """The first batch, floating tensors in the model's dtype: the example traced with."""
    dtype = next((t.dtype for t in (*module.parameters(), *module.buffers())
                  if t.is_floating_point()), torch.float32)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in input_set.batches[0])


def verify_options_of(checking: dict, data: dict, input_set: InputSet | None) -> VerifyOptions:
    """The verification options: ``--max-batches`` caps the random batches too."""
    batches = checking["batches"]
    if data["max_batches"] is not None:
        batches = min(batches, data["max_batches"])
    return VerifyOptions(batches=batches, seed=checking["seed"], rtol=checking["rtol"],
                         atol=checking["atol"], distribution=data["distribution"],
                         inputs=input_set, localize=checking["localize"])


def _export_options(exporting: dict) -> ExportOptions:
    axes: list[int] = []
    if exporting["dynamic_axes"]:
        try:
            axes = [int(a) for a in exporting["dynamic_axes"].split(",") if a.strip()]
        except ValueError:
            raise RepfuseError(f"bad --dynamic-axes '{exporting['dynamic_axes']}': expected "
                               "integers like 0,2,3") from None
    return ExportOptions(opset=exporting["opset"],
                         dynamic_axes=dynamic_axes_of(exporting["dynamic_batch"], axes))


@contextmanager
def progress_bar(console: Console) -> Iterator[ProgressCallback]:
    """A progress callback drawing a transient bar on a terminal (nothing in a log)."""
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("starting", total=None)

        def show(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total or None)

        yield show


def _default_output(spec: str) -> Path:
    path = Path(spec)
    if path.exists():
        return path.with_name(f"{path.stem}.fused.pt")
    return Path(f"{spec}.fused.pt")


def _files_read(loaded: Source, data: dict) -> dict:
    """The files a command read, by role, for its report's provenance."""
    given = {"inputs": data["inputs_spec"]} if data["inputs_spec"] else {}
    return {**loaded.files, **given}


def _input_files(spec: str, data: dict | None) -> list[Path]:
    files = [Path(spec)] if Path(spec).exists() else []
    if data and data["inputs_spec"] and Path(data["inputs_spec"]).exists():
        files.append(Path(data["inputs_spec"]))
    return files


# --- commands -----------------------------------------------------------------------------------


@main.command("convert")
@click.argument("model")
@click.option("-o", "--output", type=click.Path(),  # a folder: io.check_destination says so
              help="Where to write the fused model, by extension: .pt (GraphModule), .onnx, "
                   ".pt2 (torch.export), .ts (TorchScript) (default: <stem>.fused.pt beside "
                   "MODEL).")
@export_options
@model_options
@fusion_options
@report_options
@input_options
@verify_options
@click.option("--quant-report", "with_quant", is_flag=True,
              help="Add the quantization readiness report of the fused model (as `repfuse "
                   "quant-report`; calibrated on --inputs when given) to the reports.")
@click.option("--force", is_flag=True, help="Write the outputs even if verification fails.")
@handles_errors
def convert_command(model, output, exporting, source, fusion, reporting, data, checking,
                    with_quant, force):
    """Fuse MODEL, verify it against the original, and write the fused model.

    MODEL is a zoo name (see `repfuse models`), a state dict with --arch, a torch.export .pt2,
    or a pickled module with --trust. The outputs are written only if verification passes;
    every destination is checked before any work.

    \b
    Examples:
      repfuse convert resnet18 -o out/resnet18.fused.pt --report out/resnet18.html
      repfuse convert resnet18 --inputs batches.pt --max-batches 8 --report r.json
      repfuse convert weights.pt --arch mypkg.nets:resnet50 --input-shape 1,3,224,224
      repfuse convert two_in.pt --trust --input-shape image=1,3,64,64 --input-shape extra=1,6
      repfuse convert whole_model.pt --trust
      repfuse convert repvgg_a0 -o repvgg_a0.onnx --dynamic-batch --emit-code out/repvgg_a0
      repfuse convert repvgg_a0 --deploy-arch repvgg_a0 -o repvgg_a0.deploy.pt
      repfuse convert repvgg_tiny --quant-report --inputs calib.pt --report r.html
      repfuse convert slim.pt --arch nets:slim --prune-below 1e-3 --report pruned.html
    """
    out = Path(output) if output else _default_output(model)
    outputs: list[Any] = [DeployForm(out, exporting["deploy_arch"])
                          if exporting["deploy_arch"] else out]
    if exporting["emit_code"]:
        outputs.append(EmitCode(exporting["emit_code"]))
    outputs += [check_report_path(r) for r in reporting["reports"]]
    export = _export_options(exporting)
    inputs_given = _input_files(model, data)
    plan_outputs(outputs, export, inputs_given)  # every destination, before any work
    console = terminal_console()
    loaded = load_source(model, source, data, checking["batches"])
    with progress_bar(console) as show:
        result = convert(
            loaded.loaded.module, loaded.inputs, outputs, **fusion,
            verify=verify_options_of(checking, data, loaded.input_set), export=export,
            quant=QuantOptions(inputs=loaded.input_set) if with_quant else None,
            force=force, name=model, source=loaded.loaded.source, notes=loaded.notes,
            input_files=inputs_given, progress=show,
            provenance=made_by(command_line(), _files_read(loaded, data)),
        )
    render_terminal(result, console)
    if reporting["as_json"]:
        click.echo(render_json(result))
    sys.exit(EXIT_OK if result.passed else EXIT_NOT_EQUIVALENT)


@main.command("verify")
@click.argument("reference")
@click.argument("candidate")
@model_options
@click.option("--candidate-arch", metavar="PKG.MOD:FACTORY",
              help="Model factory (or zoo name) for a state-dict CANDIDATE (default: --arch).")
@input_options
@verify_options
@report_options
@handles_errors
def verify_command(reference, candidate, source, candidate_arch, data, checking, reporting):
    """Check that CANDIDATE computes what REFERENCE computes (exit 0 yes, 1 no, 2 bad input).

    Both are loaded like MODEL of `repfuse convert`; --arch applies to a state-dict REFERENCE
    (and CANDIDATE, unless --candidate-arch is given). When the outputs differ, the report names
    the first rewrite (or, for models repfuse did not make, the first module at a shared path)
    whose output diverges. A CANDIDATE made with approximate rewrites (--prune-below) is
    APPROXIMATE, never equivalent: exit 0 with its measured error, 1 only when it exceeds the
    --rtol/--atol given.

    \b
    Examples:
      repfuse verify resnet18 resnet18.fused.pt --trust --report verify.html
      repfuse verify train.pt deploy.pt --arch mypkg.nets:train --candidate-arch mypkg.nets:deploy
      repfuse verify resnet18 r18.fused.pt --trust --inputs mydata:loader --max-batches 4
    """
    reports = [check_report_path(r) for r in reporting["reports"]]
    plan_outputs(reports, ExportOptions(), _input_files(reference, data) + [Path(candidate)])
    console = terminal_console()
    ref = load_source(reference, source, data, checking["batches"])
    cand = load_model(candidate, arch=candidate_arch or source["arch"], trust=source["trust"])
    options = verify_options_of(checking, data, ref.input_set)
    with progress_bar(console) as show:
        result, approximate = verify_candidate(
            ref.loaded.module, cand.module, ref.inputs, options,
            rewrites=history(cand.module).rewrites, reference_name=reference,
            candidate_name=candidate, progress=show)
    files = {**ref.files, **({"candidate": cand.path} if cand.path is not None else {})}
    report = {**verify_report(result, approximate), "notes": ref.notes,
              "provenance": made_by(command_line(), files)}
    render_terminal(report, console)
    for path in reports:
        write_report(path, report)
        console.print(f"wrote report {path}")
    if reporting["as_json"]:
        click.echo(render_json(report))
    sys.exit(EXIT_OK if report["passed"] else EXIT_NOT_EQUIVALENT)


@main.command()
@click.argument("model")
@model_options
@fusion_options
@report_options
@handles_errors
def inspect(model, source, fusion, reporting):
    """Show what repfuse would rewrite in MODEL and why other candidates were declined.

    Nothing but the reports asked for is written; --json prints the rewrites and declines
    (with reasons and module paths) to stdout.

    \b
    Examples:
      repfuse inspect resnet_tiny
      repfuse inspect weights.pt --arch mypkg.nets:build --json > plan.json
    """
    reports = [check_report_path(r) for r in reporting["reports"]]
    plan_outputs(reports, ExportOptions(), _input_files(model, None))
    console = terminal_console()
    loaded = load_source(model, source, batches=1)
    with progress_bar(console) as show:
        result = convert(loaded.loaded.module, loaded.inputs, reports, **fusion, verify=None,
                         name=model, source=loaded.loaded.source, notes=loaded.notes,
                         progress=show,
                         provenance=made_by(command_line(), loaded.files))
    render_terminal(result, console)
    if reporting["as_json"]:
        click.echo(render_json(result))


@main.command("quant-report")
@click.argument("model")
@model_options
@input_options
@click.option("--equalize/--no-equalize", default=True, show_default=True,
              help="Include the form after exact cross-layer equalization (the equalize pass) "
                   "beside the fused one.")
@fusion_options
@report_options
@handles_errors
def quant_report_command(model, source, data, equalize, fusion, reporting):
    """Say how INT8 (and float16) will treat MODEL once fused, before you quantize it.

    MODEL is loaded like that of `repfuse convert` and fused (not verified, nothing written but
    the reports). Per conv/linear layer, in float64: per-channel weight ranges, the SQNR of
    symmetric INT8 weights per tensor and per channel (computed by quantizing), outlier
    channels and the batch norms that inflated them, float16 range; layers under 30 dB are
    flagged. With --inputs (calibration batches, as `repfuse verify` takes them): activation
    ranges and the end-to-end SQNR of a simulated INT8 model for the train form, the fused form
    and the equalized form. The table goes to stderr, --json prints the report to stdout.
    Exit 0 whatever it finds (2 bad input).

    \b
    Examples:
      repfuse quant-report repvgg_tiny
      repfuse quant-report weights.pt --arch mypkg.nets:build --inputs calib.pt --report q.html
      repfuse quant-report repvgg_tiny --no-equalize --json > quant.json
    """
    reports = [check_report_path(r) for r in reporting["reports"]]
    plan_outputs(reports, ExportOptions(), _input_files(model, data))
    console = terminal_console()
    loaded = load_source(model, source, data, batches=1)
    with progress_bar(console) as show:
        result = convert(
            loaded.loaded.module, loaded.inputs, reports, **fusion, verify=None,
            quant=QuantOptions(inputs=loaded.input_set, equalize=equalize), name=model,
            source=loaded.loaded.source, notes=loaded.notes, progress=show,
            provenance=made_by(command_line(), _files_read(loaded, data)),
        )
    render_terminal(result, console)
    if reporting["as_json"]:
        click.echo(render_json(result))


@main.command("passes")
def list_passes():
    """List the passes, in default pipeline order, with a one-line description each.

    \b
    Example:
      repfuse passes
    """
    for name in DEFAULT_PIPELINE:
        click.echo(f"{name:<18} {REGISTRY[name].summary}")
    for name, cls in REGISTRY.items():
        if name not in DEFAULT_PIPELINE:
            click.echo(f"{name:<18} {cls.summary} (not in the default pipeline)")


@main.command()
def models():
    """List the bundled zoo models (usable as MODEL without a file).

    \b
    Example:
      repfuse models
    """
    for spec in list_models():
        shape = ",".join(str(s) for s in spec.input_shape)
        click.echo(f"{spec.name:<22} {shape:<14} {spec.description}")


@main.command()
@click.argument("model")
@model_options
@click.option("--batch", "batch_sizes", multiple=True, metavar="N[,N...]",
              help="Batch sizes to time (repeatable or comma-separated; default: the "
                   "example input's). Larger batches repeat the example's rows.")
@click.option("--repeat", default=20, show_default=True, type=click.IntRange(min=1),
              help="Timed rounds per batch size (each runs both models once).")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0),
              help="Untimed rounds per batch size first.")
@click.option("--threads", type=click.IntRange(min=1), help="torch.set_num_threads for the "
              "timing.")
@fusion_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON to stdout.")
@handles_errors
def bench(model, source, batch_sizes, repeat, warmup, threads, fusion, as_json):
    """Compare MODEL with its fused form: latency, params, MACs, bytes, ops, error.

    MODEL is loaded like that of `repfuse convert` and converted once (no verification). Both
    models are timed in eager mode on CPU, in one process, round by round interleaved; the
    table (stderr) gives original, fused and original/fused per metric. MACs and bytes are
    for the input converted with (the first --batch). --json prints the same to stdout.

    \b
    Examples:
      repfuse bench repvgg_a0 --batch 1,8 --repeat 30
      repfuse bench weights.pt --arch mypkg.nets:build --input-shape 1,3,224,224 --json
    """
    sizes = parse_batch_sizes(batch_sizes)
    if threads is not None:
        torch.set_num_threads(threads)
    console = terminal_console()
    loaded = load_source(model, source, batches=1)
    with progress_bar(console) as show:
        result = benchmark(loaded.loaded.module, loaded.inputs, batches=sizes, repeat=repeat,
                           warmup=warmup, name=model, progress=show, **fusion)
    data = {**result.to_dict(), "source": loaded.loaded.source, "notes": loaded.notes,
            "provenance": made_by(command_line(), loaded.files)}
    render_terminal(data, console)
    if as_json:
        click.echo(json.dumps(data, indent=2))
