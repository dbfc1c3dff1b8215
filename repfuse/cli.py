"""The ``repfuse`` command line: a thin layer over :mod:`repfuse.convert` and friends.

Exit codes: 0 ok / equivalent, 1 not equivalent, 2 bad input or usage, 3 internal error (a bug
in repfuse). Errors are one line on stderr; ``--debug`` shows the traceback. Human-readable
output goes to stderr, machine output (``--json``) to stdout.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from repfuse.errors import RepfuseError

EXIT_OK, EXIT_NOT_EQUIVALENT, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

console = Console(stderr=True, highlight=False, soft_wrap=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def handles_errors(command):
    """Add ``--debug`` and turn exceptions into one line and an exit code."""

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


def model_options(command):
    """Options shared by every command that loads a model."""
    options = [
        click.option("--input-shape", "input_shape", metavar="N,C,H,W",
                     help="Example input shape; inferred from the first conv when omitted."),
        click.option("--arch", metavar="PKG.MOD:FACTORY",
                     help="Model factory (or zoo name) for a state-dict MODEL."),
        click.option("--trust", is_flag=True,
                     help="Allow loading a whole pickled module (runs code from the file)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="repfuse")
def main() -> None:
    """repfuse: exact structural reparameterization and fusion of PyTorch models.

    \b
    Examples:
      repfuse convert resnet18                      # a bundled model, no file needed
      repfuse convert model.pt --arch mypkg.nets:build -o model.fused.pt
      repfuse verify resnet18 resnet18.fused.pt --trust
      repfuse inspect resnet_tiny
      repfuse passes
    """
    # torch.export.load pickles tree specs through a deprecated path; not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")


def _load(spec: str, arch: str | None, trust: bool, input_shape: str | None):
    """The model, an example input, and a note on what was assumed (or None)."""
    from repfuse.convert import example_input
    from repfuse.io import infer_input_shape, load_model, parse_shape

    loaded = load_model(spec, arch=arch, trust=trust)
    note = None
    if input_shape is not None:
        shape = parse_shape(input_shape)
    elif loaded.input_shape is not None:
        shape = loaded.input_shape
    else:
        shape, note = infer_input_shape(loaded.module)
    return loaded, example_input(shape, loaded.module), note


def _default_output(spec: str, loaded) -> Path:
    if loaded.path is not None:
        return loaded.path.with_name(f"{loaded.path.stem}.fused.pt")
    return Path(f"{spec}.fused.pt")


def _check_report_path(report: str | None) -> Path | None:
    """The report path, if its extension names a rendering (.json, .md, .html)."""
    from repfuse.verify.render import check_report_path

    return None if report is None else check_report_path(report)


def input_options(command):
    """Options choosing the inputs verification runs on (see repfuse.verify.inputs)."""
    options = [
        click.option("--inputs", "inputs_spec", metavar="FILE|PKG.MOD:FN",
                     help="Verify on these batches: a .pt/.npy/.npz file of tensors, or a "
                          "function returning an iterable of batches (e.g. a DataLoader)."),
        click.option("--max-batches", type=click.IntRange(min=1),
                     help="Use at most this many batches (of --inputs, or random ones)."),
        click.option("--distribution", type=click.Choice(["normal", "uniform"]),
                     default="normal", show_default=True,
                     help="Random inputs: N(0, 1) or U[0, 1)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _inputs_for(x, module, inputs_spec: str | None, max_batches: int | None, distribution: str):
    """The example input to trace with and the user's batches (None: seeded random ones)."""
    from repfuse.convert import example_input
    from repfuse.verify.inputs import load_batches

    if inputs_spec is None:
        if distribution != "normal":
            x = example_input(tuple(x.shape), module, distribution=distribution)
        return x, None
    loaded = load_batches(inputs_spec, (x,), max_batches=max_batches, progress=True)
    first = loaded.batches[0][0]
    return (first.to(x.dtype) if first.is_floating_point() else first), loaded


def _random_count(batches: int, max_batches: int | None) -> int:
    return batches if max_batches is None else min(batches, max_batches)


@dataclass(frozen=True)
class ExportRequest:
    """What `convert` writes besides (or instead of) the fused GraphModule."""

    opset: int | None
    dynamic_batch: bool
    emit_code: str | None
    deploy_arch: str | None


def export_options(command):
    """The export options of `convert`, passed to it as one ``exports`` argument."""

    @functools.wraps(command)
    def wrapper(*args, opset, dynamic_batch, emit_code, deploy_arch, **kwargs):
        request = ExportRequest(opset, dynamic_batch, emit_code, deploy_arch)
        return command(*args, exports=request, **kwargs)

    options = [
        click.option("--opset", type=click.IntRange(min=7), metavar="N",
                     help="ONNX opset of an .onnx output (default 17)."),
        click.option("--dynamic-batch", is_flag=True,
                     help="Make axis 0 a dynamic batch axis in an .onnx, .pt2 or .ts output."),
        click.option("--emit-code", type=click.Path(file_okay=False), metavar="DIR",
                     help="Also write the fused model as Python source (model.py) and weights "
                          "(weights.pt) into DIR; they load without repfuse."),
        click.option("--deploy-arch", metavar="PKG.MOD:FACTORY",
                     help="Load the fused weights by structure into this deploy-form model (or "
                          "a zoo model's deploy form, e.g. repvgg_a0), verify it, and write its "
                          "state dict to the .pt output."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def _check_output(out: Path, exports: ExportRequest, loaded) -> None:
    """Refuse output types and option combinations that make no sense, before any work."""
    from repfuse.export import OnnxModel, check_deploy_arch, check_output_path

    if isinstance(loaded.module, OnnxModel):
        raise RepfuseError(f"'{loaded.path}' is an ONNX model: it runs in onnxruntime and cannot "
                           "be fused (it can be the REFERENCE of `repfuse verify`)")
    check_output_path(out)
    if exports.deploy_arch is not None:
        if out.suffix != ".pt":
            raise RepfuseError(f"--deploy-arch writes a state dict: use a .pt output, not '{out}'")
        check_deploy_arch(exports.deploy_arch)
    if exports.opset is not None and out.suffix != ".onnx":
        raise RepfuseError(f"--opset applies to an .onnx output, not '{out}'")
    if exports.dynamic_batch and out.suffix == ".pt":
        raise RepfuseError(f"--dynamic-batch applies to .onnx, .pt2 and .ts outputs, not '{out}'")


def _check_destinations(*paths: Path | None) -> None:
    """Refuse outputs in missing or unwritable folders before any work is done."""
    from repfuse.io import check_destination

    for path in paths:
        if path is not None:
            check_destination(path)


def _write_outputs(result, reference, x, out: Path, exports: ExportRequest, check,
                   passed: bool, force: bool) -> bool:
    """Write ``out`` (and the emitted code); whether verification and every export passed."""
    from repfuse.export import (
        DEFAULT_OPSET,
        EXPORTERS,
        emit_code,
        export_deploy_state_dict,
    )
    from repfuse.io import save_model

    made = []
    if exports.deploy_arch is not None:
        made.append(export_deploy_state_dict(result.fused, x, out, exports.deploy_arch,
                                             reference=reference, options=check, force=force))
    elif out.suffix in EXPORTERS:
        extra = {"opset": exports.opset or DEFAULT_OPSET} if out.suffix == ".onnx" else {}
        made.append(EXPORTERS[out.suffix](result.fused, x, out, reference=reference,
                                          dynamic_batch=exports.dynamic_batch, options=check,
                                          force=force, **extra))
    else:
        save_model(result.fused, out)
        suffix = "" if passed else " despite failed verification (--force)"
        console.print(f"wrote {out}{suffix}")
    if exports.emit_code is not None:
        made.append(emit_code(result.fused, exports.emit_code, x, reference=reference,
                              description=f"{check.reference_name}, fused", options=check,
                              force=force))
    for export in made:
        style = "green" if export.passed else "red"
        for line in export.summary_lines():
            console.print(f"[{style}]{line}[/]")
        if export.written:
            failed = not (passed and export.passed)
            suffix = " despite failed verification (--force)" if failed else ""
            console.print(f"wrote {export.path}{suffix}")
        else:
            console.print(f"[bold red]not written[/]: the {export.format} check failed (use "
                          f"--force to write {export.path} anyway)")
    result.exports.extend(made)
    return passed and all(export.passed for export in made)


@main.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(),  # a folder: io.check_destination says so
              help="Where to write the fused model, by extension: .pt (GraphModule), .onnx, "
                   ".pt2 (torch.export), .ts (TorchScript) (default: <stem>.fused.pt beside "
                   "MODEL).")
@export_options
@model_options
@click.option("--passes", "pass_names", metavar="a,b,...",
              help="Passes to run, comma-separated (default: all; see `repfuse passes`).")
@click.option("--report", type=click.Path(dir_okay=False),
              help="Write a report here: .json, .md or .html (by extension).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout.")
@input_options
@click.option("--rtol", type=float, help="Relative tolerance of verification (to max |ref|).")
@click.option("--atol", type=float, help="Absolute tolerance of verification.")
@click.option("--force", is_flag=True, help="Write the output even if verification fails.")
@click.option("--allow-costlier", is_flag=True,
              help="Also apply exact merges the cost model says do not pay.")
@handles_errors
def convert(model, output, input_shape, arch, trust, pass_names, report, as_json, inputs_spec,
            max_batches, distribution, rtol, atol, force, allow_costlier, exports):
    """Fuse MODEL, verify it against the original, and write the fused model.

    MODEL is a zoo name (see `repfuse passes`/README), a state dict with --arch, a torch.export
    .pt2, or a pickled module with --trust. The output is written only if verification passes.

    \b
    Examples:
      repfuse convert resnet18 -o out/resnet18.fused.pt --report out/resnet18.html
      repfuse convert resnet18 --inputs batches.pt --max-batches 8 --report r.json
      repfuse convert weights.pt --arch mypkg.nets:resnet50 --input-shape 1,3,224,224
      repfuse convert whole_model.pt --trust
      repfuse convert repvgg_a0 -o repvgg_a0.onnx --dynamic-batch --emit-code out/repvgg_a0
      repfuse convert repvgg_a0 --deploy-arch repvgg_a0 -o repvgg_a0.deploy.pt
    """
    from repfuse.convert import convert as run_convert
    from repfuse.export import CheckOptions
    from repfuse.verify.render import render_json, write_report

    report_path = _check_report_path(report)
    loaded, x, note = _load(model, arch, trust, input_shape)
    x, input_set = _inputs_for(x, loaded.module, inputs_spec, max_batches, distribution)
    note = note if input_set is None else None  # the shape comes from the user's inputs
    out = Path(output) if output else _default_output(model, loaded)
    _check_output(out, exports, loaded)
    _check_destinations(out, report_path)
    if loaded.path is not None and out.resolve() == loaded.path.resolve():
        raise RepfuseError(f"refusing to overwrite the input '{out}'; choose another -o")
    if pass_names is None and out.suffix == ".onnx":
        from repfuse.export import ONNX_PIPELINE

        pass_names = ",".join(ONNX_PIPELINE)
        console.print("[yellow]note[/]: merge_siblings is left out for an .onnx output "
                      "(onnxruntime runs a conv + Split slower than the separate convs); "
                      "--passes chooses the passes")
    result = run_convert(loaded.module, x, pass_names, rtol=rtol, atol=atol, name=model,
                         allow_costlier=allow_costlier, batches=_random_count(3, max_batches),
                         distribution=distribution, verify_inputs=input_set)
    _print_conversion(loaded.source, list(x.shape), note, result)
    passed = result.report.passed
    if passed or force:
        check = CheckOptions(batches=_random_count(3, max_batches), rtol=rtol, atol=atol,
                             reference_name=model, distribution=distribution, inputs=input_set)
        passed = _write_outputs(result, loaded.module, x, out, exports, check, passed, force)
    else:
        console.print(f"[bold red]not written[/]: verification failed (use --force to write "
                      f"{out} anyway)")
    if report_path is not None:
        write_report(report_path, result)
        console.print(f"wrote report {report_path}")
    if as_json:
        click.echo(render_json(result))
    sys.exit(EXIT_OK if passed else EXIT_NOT_EQUIVALENT)


def _print_conversion(source: str, shape: list[int], note: str | None, result) -> None:
    console.print(f"[bold]{source}[/]  input {shape}  ({result.seconds:.2f} s to fuse)")
    if note:
        console.print(f"[yellow]note[/]: {note}")
    for line in result.capture.summary_lines():  # partial capture, shape specialization
        console.print(f"[yellow]{line}[/]" if not line.startswith("  ") else line)
    passes = Table(title="passes (MACs and bytes after each pass's rewrites)",
                   title_justify="left")
    for column in ("pass", "rewrites", "declined", "MACs", "bytes moved"):
        passes.add_column(column, justify="left" if column == "pass" else "right")
    declined = {}
    for decline in result.passes.declined:
        declined[decline.pass_name] = declined.get(decline.pass_name, 0) + 1
    for row in result.cost_by_pass():
        passes.add_row(row["pass"], str(row["rewrites"]), str(declined.get(row["pass"], 0)),
                       f"{row['macs']:,}", f"{row['bytes']:,}")
    console.print(passes)
    _print_declines(result.passes.declined, limit=5)
    _print_not_mergeable(result.not_mergeable)
    console.print(_cost_table(result.cost_before, result.cost_after))
    for line in result.report.summary_lines():
        style = "green" if result.report.passed else "red"
        console.print(f"[{style}]{line}[/]")


def _print_declines(declined, limit: int) -> None:
    for decline in declined[:limit]:
        console.print(f"  declined by {decline.pass_name}: {decline.reason}")
    if len(declined) > limit:
        console.print(f"  ... and {len(declined) - limit} more (see `repfuse inspect`)")


def _print_not_mergeable(items) -> None:
    from repfuse.passes.nonlinear import summarize

    groups = summarize(items)
    if not groups:
        return
    counted = ", ".join(f"{g['count']} {g['op']}" for g in groups)
    console.print(f"not mergeable exactly (they stay): {counted}")
    for kind in dict.fromkeys(g["kind"] for g in groups):
        reason = next(g["reason"] for g in groups if g["kind"] == kind)
        console.print(f"  {reason}")


def _cost_table(before, after) -> Table:
    table = Table(title="cost", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for op in sorted(set(before.ops) | set(after.ops)):
        if before.ops.get(op, 0) != after.ops.get(op, 0):
            table.add_row(op, str(before.ops.get(op, 0)), str(after.ops.get(op, 0)))
    table.add_row("ops (all)", str(sum(before.ops.values())), str(sum(after.ops.values())))
    table.add_row("params", f"{before.params:,}", f"{after.params:,}")
    table.add_row("MACs", f"{before.macs:,}", f"{after.macs:,}")
    table.add_row("bytes moved", f"{before.bytes:,}", f"{after.bytes:,}")
    return table


@main.command("verify")
@click.argument("reference")
@click.argument("candidate")
@model_options
@click.option("--batches", default=3, show_default=True, help="Input batches to compare on.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@input_options
@click.option("--rtol", type=float, help="Relative tolerance (to max |reference|).")
@click.option("--atol", type=float, help="Absolute tolerance.")
@click.option("--report", type=click.Path(dir_okay=False),
              help="Write a report here: .json, .md or .html (by extension).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout.")
@handles_errors
def verify_command(reference, candidate, input_shape, arch, trust, batches, seed, inputs_spec,
                   max_batches, distribution, rtol, atol, report, as_json):
    """Check that CANDIDATE computes what REFERENCE computes (exit 0 yes, 1 no, 2 bad input).

    Both are loaded like MODEL of `repfuse convert`; --arch applies to state-dict files.
    The report names the first rewrite (or, for models repfuse did not make, the first module
    at a shared path) whose output diverges.

    \b
    Examples:
      repfuse verify resnet18 resnet18.fused.pt --trust --report verify.html
      repfuse verify train.pt deploy.pt --arch mypkg.nets:build --json
      repfuse verify resnet18 r18.fused.pt --trust --inputs mydata:loader --max-batches 4
    """
    from repfuse.io import load_model
    from repfuse.verify import verify
    from repfuse.verify.render import render_json, render_terminal, write_report

    report_path = _check_report_path(report)
    _check_destinations(report_path)
    ref, x, note = _load(reference, arch, trust, input_shape)
    x, input_set = _inputs_for(x, ref.module, inputs_spec, max_batches, distribution)
    cand = load_model(candidate, arch=arch, trust=trust)
    if note and input_set is None:
        console.print(f"[yellow]note[/]: {note}")
    result = verify(ref.module, cand.module, x, batches=_random_count(batches, max_batches),
                    seed=seed, rtol=rtol, atol=atol, reference_name=reference,
                    candidate_name=candidate, distribution=distribution, inputs=input_set)
    render_terminal(result, console)
    if report_path is not None:
        write_report(report_path, result)
        console.print(f"wrote report {report_path}")
    if as_json:
        click.echo(render_json(result))
    sys.exit(EXIT_OK if result.passed else EXIT_NOT_EQUIVALENT)


@main.command()
@click.argument("model")
@model_options
@click.option("--passes", "pass_names", metavar="a,b,...", help="Passes to consider.")
@click.option("--allow-costlier", is_flag=True,
              help="Also apply exact merges the cost model says do not pay.")
@handles_errors
def inspect(model, input_shape, arch, trust, pass_names, allow_costlier):
    """Show what repfuse would rewrite in MODEL and why other candidates were declined.

    Nothing is written.

    \b
    Example:
      repfuse inspect resnet_tiny
    """
    from repfuse.convert import convert as run_convert

    loaded, x, note = _load(model, arch, trust, input_shape)
    result = run_convert(loaded.module, x, pass_names, check=False, name=model,
                         allow_costlier=allow_costlier)
    console.print(f"[bold]{loaded.source}[/]  input {list(x.shape)}")
    if note:
        console.print(f"[yellow]note[/]: {note}")
    _print_blocks(result.passes)
    _print_not_mergeable(result.not_mergeable)
    console.print(_cost_table(result.cost_before, result.cost_after))


def _print_blocks(passes) -> None:
    """Rewrites and declines grouped by block (the common parent of their module paths)."""
    from repfuse.passes.base import block_of

    # A rewrite belongs to the block of the last rewrite that consumed its result, so BN folds
    # inside a branch show under the block whose branches were merged.
    block_by_node: dict[str, str] = {}
    blocks_of_rewrites = []
    for rewrite in reversed(passes.rewrites):
        block = block_by_node.get(rewrite.node, block_of(rewrite.module_paths))
        for name in rewrite.replaced:
            block_by_node.setdefault(name, block)
        blocks_of_rewrites.append(block)
    blocks: dict[str, list[str]] = {}
    for rewrite, block in zip(passes.rewrites, reversed(blocks_of_rewrites), strict=True):
        target = f" -> {rewrite.module}" if rewrite.module else ""
        blocks.setdefault(block, []).append(
            f"  [green]{rewrite.pass_name}[/]: {rewrite.detail}{target}"
        )
    for decline in passes.declined:
        blocks.setdefault(block_of(decline.module_paths), []).append(
            f"  [yellow]declined by {decline.pass_name}[/]: {decline.reason}"
        )
    if not blocks:
        console.print("nothing to rewrite")
    for block, lines in blocks.items():
        console.print(f"[bold]{block or '(top level)'}[/]")
        for line in lines:
            console.print(line)


@main.command("passes")
def list_passes():
    """List the passes, in default pipeline order, with a one-line description each.

    \b
    Example:
      repfuse passes
    """
    from repfuse.passes import DEFAULT_PIPELINE, REGISTRY

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
    from repfuse.models import list_models

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
@click.option("--passes", "pass_names", metavar="a,b,...",
              help="Passes to run, comma-separated (default: all; see `repfuse passes`).")
@click.option("--allow-costlier", is_flag=True,
              help="Also apply exact merges the cost model says do not pay.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON to stdout.")
@handles_errors
def bench(model, input_shape, arch, trust, batch_sizes, repeat, warmup, threads, pass_names,
          allow_costlier, as_json):
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
    import torch
    from rich.progress import Progress

    from repfuse.bench import benchmark, parse_batch_sizes
    from repfuse.export import OnnxModel

    sizes = parse_batch_sizes(batch_sizes)
    if threads is not None:
        torch.set_num_threads(threads)
    loaded, x, note = _load(model, arch, trust, input_shape)
    if isinstance(loaded.module, OnnxModel):
        raise RepfuseError(f"'{loaded.path}' is an ONNX model: it runs in onnxruntime and cannot "
                           "be fused")
    # Not on a terminal rich would still write a blank line; a log needs no bar.
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"bench {model}", total=None)

        def show(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        result = benchmark(loaded.module, x, batches=sizes, repeat=repeat, warmup=warmup,
                           passes=pass_names, allow_costlier=allow_costlier, name=model,
                           progress=show)
    console.print(f"[bold]{loaded.source}[/]  input {result.input_shapes[0]}  "
                  f"({result.conversion.seconds:.2f} s to fuse; torch {torch.__version__}, "
                  f"{result.threads} threads)")
    if note:
        console.print(f"[yellow]note[/]: {note}")
    for line in result.conversion.capture.summary_lines():
        console.print(f"[yellow]{line}[/]" if not line.startswith("  ") else line)
    table = Table(title=f"{model}: original vs fused", title_justify="left",
                  caption="original/fused above 1: the fused model is faster or smaller. "
                          "max rel error: each model against the original run in float64.",
                  caption_justify="left")
    for column in ("", "original", "fused", "original/fused"):
        table.add_column(column, justify="right" if column else "left")
    for row in result.rows():
        table.add_row(*row)
    console.print(table)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
