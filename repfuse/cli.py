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
    if report is None:
        return None
    path = Path(report)
    if path.suffix != ".json":
        raise RepfuseError(f"unsupported report type '{path.suffix}' for '{report}' (use .json)")
    return path


@main.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write the fused model (default: <stem>.fused.pt beside MODEL).")
@model_options
@click.option("--passes", "pass_names", metavar="a,b,...",
              help="Passes to run, comma-separated (default: all; see `repfuse passes`).")
@click.option("--report", type=click.Path(dir_okay=False), help="Write a JSON report here.")
@click.option("--rtol", type=float, help="Relative tolerance of verification (to max |ref|).")
@click.option("--atol", type=float, help="Absolute tolerance of verification.")
@click.option("--force", is_flag=True, help="Write the output even if verification fails.")
@handles_errors
def convert(model, output, input_shape, arch, trust, pass_names, report, rtol, atol, force):
    """Fuse MODEL, verify it against the original, and write the fused model.

    MODEL is a zoo name (see `repfuse passes`/README), a state dict with --arch, a torch.export
    .pt2, or a pickled module with --trust. The output is written only if verification passes.

    \b
    Examples:
      repfuse convert resnet18 -o out/resnet18.fused.pt --report out/resnet18.json
      repfuse convert weights.pt --arch mypkg.nets:resnet50 --input-shape 1,3,224,224
      repfuse convert whole_model.pt --trust
    """
    from repfuse.convert import convert as run_convert
    from repfuse.io import save_model, write_text

    report_path = _check_report_path(report)
    loaded, x, note = _load(model, arch, trust, input_shape)
    out = Path(output) if output else _default_output(model, loaded)
    if out.suffix != ".pt":
        raise RepfuseError(f"unsupported output type '{out.suffix}' for '{out}' (use .pt)")
    if loaded.path is not None and out.resolve() == loaded.path.resolve():
        raise RepfuseError(f"refusing to overwrite the input '{out}'; choose another -o")
    result = run_convert(loaded.module, x, pass_names, rtol=rtol, atol=atol, name=model)
    _print_conversion(loaded.source, list(x.shape), note, result)
    passed = result.report.passed
    if passed or force:
        save_model(result.fused, out)
        suffix = "" if passed else " despite failed verification (--force)"
        console.print(f"wrote {out}{suffix}")
    else:
        console.print(f"[bold red]not written[/]: verification failed (use --force to write "
                      f"{out} anyway)")
    if report_path is not None:
        write_text(report_path, json.dumps(result.report_dict(), indent=2))
        console.print(f"wrote report {report_path}")
    sys.exit(EXIT_OK if passed else EXIT_NOT_EQUIVALENT)


def _print_conversion(source: str, shape: list[int], note: str | None, result) -> None:
    console.print(f"[bold]{source}[/]  input {shape}  ({result.seconds:.2f} s to fuse)")
    if note:
        console.print(f"[yellow]note[/]: {note}")
    passes = Table(title="passes", title_justify="left")
    passes.add_column("pass")
    passes.add_column("rewrites", justify="right")
    passes.add_column("declined", justify="right")
    declined = {}
    for decline in result.passes.declined:
        declined[decline.pass_name] = declined.get(decline.pass_name, 0) + 1
    for name, count in result.passes.counts().items():
        passes.add_row(name, str(count), str(declined.get(name, 0)))
    console.print(passes)
    _print_declines(result.passes.declined, limit=5)
    console.print(_cost_table(result.cost_before, result.cost_after))
    for line in result.report.summary_lines():
        style = "green" if result.report.passed else "red"
        console.print(f"[{style}]{line}[/]")


def _print_declines(declined, limit: int) -> None:
    for decline in declined[:limit]:
        console.print(f"  declined by {decline.pass_name}: {decline.reason}")
    if len(declined) > limit:
        console.print(f"  ... and {len(declined) - limit} more (see `repfuse inspect`)")


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
    return table


@main.command("verify")
@click.argument("reference")
@click.argument("candidate")
@model_options
@click.option("--batches", default=3, show_default=True, help="Input batches to compare on.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--rtol", type=float, help="Relative tolerance (to max |reference|).")
@click.option("--atol", type=float, help="Absolute tolerance.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write a JSON report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout.")
@handles_errors
def verify_command(reference, candidate, input_shape, arch, trust, batches, seed, rtol, atol,
                   report, as_json):
    """Check that CANDIDATE computes what REFERENCE computes (exit 0 yes, 1 no, 2 bad input).

    Both are loaded like MODEL of `repfuse convert`; --arch applies to state-dict files.

    \b
    Examples:
      repfuse verify resnet18 resnet18.fused.pt --trust
      repfuse verify train.pt deploy.pt --arch mypkg.nets:build --json
    """
    from repfuse.io import load_model, write_text
    from repfuse.verify import verify

    report_path = _check_report_path(report)
    ref, x, note = _load(reference, arch, trust, input_shape)
    cand = load_model(candidate, arch=arch, trust=trust)
    if note:
        console.print(f"[yellow]note[/]: {note}")
    result = verify(ref.module, cand.module, x, batches=batches, seed=seed, rtol=rtol,
                    atol=atol, reference_name=reference, candidate_name=candidate)
    for line in result.summary_lines():
        console.print(line)
    if report_path is not None:
        write_text(report_path, result.to_json())
    if as_json:
        click.echo(result.to_json())
    sys.exit(EXIT_OK if result.passed else EXIT_NOT_EQUIVALENT)


@main.command()
@click.argument("model")
@model_options
@click.option("--passes", "pass_names", metavar="a,b,...", help="Passes to consider.")
@handles_errors
def inspect(model, input_shape, arch, trust, pass_names):
    """Show what repfuse would rewrite in MODEL and why other candidates were declined.

    Nothing is written.

    \b
    Example:
      repfuse inspect resnet_tiny
    """
    from repfuse.convert import convert as run_convert

    loaded, x, note = _load(model, arch, trust, input_shape)
    result = run_convert(loaded.module, x, pass_names, check=False, name=model)
    console.print(f"[bold]{loaded.source}[/]  input {list(x.shape)}")
    if note:
        console.print(f"[yellow]note[/]: {note}")
    _print_blocks(result.passes)
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
@click.option("--repeat", default=20, show_default=True, help="Timed runs per model.")
@click.option("--warmup", default=3, show_default=True, help="Untimed runs per model first.")
@click.option("--threads", type=int, help="torch.set_num_threads for the timing.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON to stdout.")
@handles_errors
def bench(model, input_shape, arch, trust, repeat, warmup, threads, as_json):
    """Time MODEL and its fused form side by side (eager CPU, interleaved, same process).

    \b
    Example:
      repfuse bench resnet50 --repeat 30
    """
    import torch

    from repfuse.bench import time_models
    from repfuse.convert import convert as run_convert

    if threads is not None:
        torch.set_num_threads(threads)
    loaded, x, _ = _load(model, arch, trust, input_shape)
    result = run_convert(loaded.module, x, check=False, name=model)
    loaded.module.eval()
    timings = time_models({"original": loaded.module, "fused": result.fused}, (x,),
                          warmup=warmup, repeat=repeat)
    ratio = timings["original"].median_ms / timings["fused"].median_ms
    summary = {
        "model": model, "input_shape": list(x.shape), "threads": torch.get_num_threads(),
        "convert_seconds": result.seconds, "speedup": ratio,
        "timings": {name: t.to_dict() for name, t in timings.items()},
    }
    console.print(
        f"{model}: fuse {result.seconds:.2f} s; original {timings['original'].median_ms:.2f} ms,"
        f" fused {timings['fused'].median_ms:.2f} ms (median of {repeat}); "
        f"fused is {ratio:.2f}x faster"
    )
    if as_json:
        click.echo(json.dumps(summary, indent=2))
