"""Bad input to ``repfuse convert``: each case is one line on stderr, exit code 2, no traceback
(unless ``--debug``), nothing written, and every file that was there before unchanged.

:data:`CASES` is the table the README documents (``/tmp/readme_issue7.md`` lists what each
case prints); every row runs the command line in-process (click's runner) from a fresh
folder. A few cases run the installed console script instead, for the real exit code and
stderr, and for a folder that even root cannot write.
"""

from __future__ import annotations

import collections
import fractions
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_runs import REPFUSE
from click.testing import CliRunner, Result
from conftest import random_input, reference64, rel_err

from repfuse.cli import main
from repfuse.models import create_model

TINY = ["--input-shape", "1,3,32,32"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes (folders as '<dir>')."""
    files = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        files[key] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def error_line(stderr: str) -> str:
    """The one line a command that fails before any work prints."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return final_error_line(stderr)


def final_error_line(stderr: str) -> str:
    """The error line that ends a command's output (after its summary, if it got that far)."""
    lines = stderr.splitlines()
    assert "Traceback" not in stderr
    assert [line for line in lines if line.startswith("repfuse: ")] == lines[-1:], stderr
    assert lines[-1].startswith("repfuse: error: ")
    return lines[-1]


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict:
    return create_model("resnet_tiny").state_dict()


# --- the files a case starts from --------------------------------------------------------------


def write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        (folder / name).write_bytes(data)
    return make


def truncated_state_dict(folder: Path) -> None:
    torch.save(create_model("resnet_tiny").state_dict(), folder / "w.pt")
    data = (folder / "w.pt").read_bytes()
    (folder / "w.pt").write_bytes(data[: len(data) // 2])


def saved(name: str, obj_factory: Callable[[], object]) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        torch.save(obj_factory(), folder / name)
    return make


def plain_pickle(folder: Path) -> None:
    (folder / "list.pkl").write_bytes(pickle.dumps([1, 2, 3], protocol=4))


def factory_module(source: str) -> Callable[[Path], None]:
    """``nets.py`` in the folder, and a state dict ``w.pt`` of what ``nets:build`` builds."""

    def make(folder: Path) -> None:
        (folder / "nets.py").write_text(source)
        torch.save({"unused": torch.zeros(1)}, folder / "w.pt")  # replaced below if it builds
        namespace: dict = {}
        exec(compile(source, "nets.py", "exec"), namespace)
        try:
            model = namespace["build"]()
        except Exception:
            return
        if isinstance(model, torch.nn.Module):
            torch.save(model.state_dict(), folder / "w.pt")
    return make


RAISING_FORWARD = '''
import torch
from torch import nn

class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        raise ValueError("this forward is broken")

def build():
    return Broken()
'''

FACTORY_RAISES = '''
def build():
    raise RuntimeError("no weights here")
'''

FACTORY_NOT_A_MODULE = '''
def build():
    return {"conv": 1}
'''

UNPICKLABLE = '''
import torch
from torch import nn

class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.callback = lambda y: y  # a local function: the saved model cannot be pickled

    def forward(self, x):
        y = self.conv(x)
        return self.callback(y) if y.sum() > -1e9 else y

def build():
    return Gated()
'''


@dataclass(frozen=True)
class Case:
    """One row of the bad-input table."""

    name: str
    what: str  # the bad input, in the README's words
    make: Callable[[Path], None] | None  # files to create in the folder first
    args: tuple[str, ...]
    message: str  # part of the one-line error
    after_summary: bool = False  # fails only when writing: the conversion summary comes first


def nothing(folder: Path) -> None:
    """No files."""


CASES = [
    Case("empty-file", "an empty file", write_bytes("w.pt", b""),
         ("w.pt", "--arch", "resnet_tiny"), "'w.pt' is empty (0 bytes), not a model file"),
    Case("truncated", "a truncated state dict (first half of the file)", truncated_state_dict,
         ("w.pt", "--arch", "resnet_tiny"), "a damaged or truncated torch.save archive"),
    Case("random-bytes", "random bytes", write_bytes("w.pt", os.urandom(4096).replace(
        b"\x80", b"\x81").replace(b"PK", b"pk")), ("w.pt", "--arch", "resnet_tiny"),
         "neither a zip archive nor a pickle"),
    Case("text-file", "a text file named .pt", write_bytes("w.pt", b"weights: [1, 2, 3]\n"),
         ("w.pt", "--arch", "resnet_tiny"), "it is a text file"),
    Case("plain-pickle", "a plain pickle (pickle.dump of a list)", plain_pickle,
         ("list.pkl", "--arch", "resnet_tiny"), "a plain pickle, not a torch.save file"),
    Case("non-module-tensors", "torch.save of a list of tensors",
         saved("w.pt", lambda: [torch.ones(2)]), ("w.pt", "--arch", "resnet_tiny"),
         "'w.pt' holds a list, not a state dict or a model"),
    Case("non-module-dict", "torch.save of a dict without tensors",
         saved("w.pt", lambda: collections.OrderedDict(epoch=3)),
         ("w.pt", "--arch", "resnet_tiny"), "holds a OrderedDict, not a state dict"),
    Case("pickled-object-untrusted", "a pickled object (a Fraction) without --trust",
         saved("w.pt", lambda: fractions.Fraction(1, 3)), ("w.pt",),
         "is a pickled object, not a state dict: loading it can run arbitrary code"),
    Case("pickled-object-trusted", "a pickled non-module object with --trust",
         saved("w.pt", lambda: fractions.Fraction(1, 3)), ("w.pt", "--trust"),
         "'w.pt' holds a Fraction, not a torch.nn.Module"),
    Case("pickled-module-untrusted", "a whole pickled module without --trust",
         saved("whole.pt", lambda: create_model("resnet_tiny")), ("whole.pt", *TINY),
         "Re-run with --trust if you trust its source"),
    Case("unknown-extension", "an unknown input type (.h5, HDF5 magic bytes)",
         write_bytes("model.h5", b"\x89HDF\r\n\x1a\n" + bytes(200)), ("model.h5",),
         "expected a torch.save file"),
    Case("onnx-garbage", "an .onnx file that is not ONNX", write_bytes("m.onnx", b"not onnx"),
         ("m.onnx",), "cannot load 'm.onnx' as an ONNX model"),
    Case("pt2-garbage", "a .pt2 file that is not a torch.export program",
         write_bytes("m.pt2", b"not a program"), ("m.pt2",),
         "cannot load 'm.pt2' as a torch.export program"),
    Case("missing-file", "a missing file", nothing, ("absent.pt",),
         "no file or zoo model named 'absent.pt'"),
    Case("directory", "a directory", lambda folder: (folder / "d.pt").mkdir(), ("d.pt",),
         "'d.pt' is a directory, not a model file"),
    Case("state-dict-no-arch", "a state dict without --arch",
         saved("w.pt", lambda: create_model("resnet_tiny").state_dict()), ("w.pt",),
         "say which model it belongs to with --arch"),
    Case("state-dict-wrong-arch", "a state dict of another architecture",
         saved("w.pt", lambda: create_model("vgg_tiny").state_dict()),
         ("w.pt", "--arch", "resnet_tiny"), "does not fit --arch resnet_tiny"),
    Case("arch-missing-module", "--arch naming a module that does not exist",
         saved("w.pt", lambda: create_model("resnet_tiny").state_dict()),
         ("w.pt", "--arch", "no_such_module_xyz:build"), "cannot import 'no_such_module_xyz'"),
    Case("arch-factory-raises", "--arch factory that raises", factory_module(FACTORY_RAISES),
         ("w.pt", "--arch", "nets:build"), "calling nets:build() failed: RuntimeError"),
    Case("arch-not-a-module", "--arch factory returning a non-module",
         factory_module(FACTORY_NOT_A_MODULE), ("w.pt", "--arch", "nets:build"),
         "nets:build() returned dict, not a torch.nn.Module"),
    Case("shape-not-integers", "--input-shape with a non-integer", nothing,
         ("resnet_tiny", "--input-shape", "1,3,x,32"), "bad --input-shape '1,3,x,32'"),
    Case("shape-zero", "--input-shape with a zero", nothing,
         ("resnet_tiny", "--input-shape", "1,0,32,32"), "expected positive integers"),
    Case("shape-wrong-channels", "--input-shape with the wrong channel count", nothing,
         ("resnet_tiny", "--input-shape", "1,5,32,32"), "inputs of shape [1, 5, 32, 32]"),
    Case("shape-wrong-rank", "--input-shape of the wrong rank", nothing,
         ("resnet_tiny", "--input-shape", "3,32"), "inputs of shape [3, 32]"),
    Case("shape-wrong-partial", "--input-shape that an untraceable model cannot run", nothing,
         ("branchynet_tiny", "--input-shape", "1,4,32,32"),
         "running the model on inputs of shape [1, 4, 32, 32] failed"),
    Case("forward-raises", "a model whose forward raises", factory_module(RAISING_FORWARD),
         ("w.pt", "--arch", "nets:build", "--input-shape", "1,3,8,8"),
         "ValueError: this forward is broken"),
    Case("output-unknown-extension", "an unknown output type (-o out.txt)", nothing,
         ("resnet_tiny", *TINY, "-o", "out.txt"), "unsupported output type '.txt'"),
    Case("report-unknown-extension", "an unknown report type (--report r.csv)", nothing,
         ("resnet_tiny", *TINY, "--report", "r.csv"), "unsupported report type '.csv'"),
    Case("output-missing-folder", "an output in a missing folder", nothing,
         ("resnet_tiny", *TINY, "-o", "no/such/folder/out.pt"),
         "the folder of output 'no/such/folder/out.pt' does not exist"),
    Case("report-missing-folder", "a report in a missing folder", nothing,
         ("resnet_tiny", *TINY, "--report", "missing/r.json"),
         "the folder of output 'missing/r.json' does not exist"),
    Case("output-is-a-folder", "an output path that is a folder",
         lambda folder: (folder / "out.pt").mkdir(), ("resnet_tiny", *TINY, "-o", "out.pt"),
         "output 'out.pt' is a directory"),
    Case("output-under-a-file", "an output whose folder is a file",
         write_bytes("file", b"x"), ("resnet_tiny", *TINY, "-o", "file/out.pt"),
         "'file' is not a folder"),
    Case("output-is-input", "an output equal to the input",
         saved("whole.pt", lambda: create_model("resnet_tiny")),
         ("whole.pt", "--trust", *TINY, "-o", "whole.pt"),
         "refusing to overwrite the input 'whole.pt'"),
    Case("unpicklable-model", "a model that cannot be saved (holds a lambda)",
         factory_module(UNPICKLABLE), ("w.pt", "--arch", "nets:build", "--input-shape",
                                       "1,3,8,8", "-o", "out.pt"),
         "cannot save the model to 'out.pt': it holds something that cannot be pickled",
         after_summary=True),
]


def run_case(case: Case, folder: Path, monkeypatch, *extra: str) -> Result:
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        return CliRunner().invoke(main, ["convert", *case.args, *extra])
    finally:
        sys.modules.pop("nets", None)


@pytest.mark.filterwarnings("ignore::repfuse.RepfuseWarning")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_every_file_alone(case, tmp_path, monkeypatch):
    if case.make is not None:
        case.make(tmp_path)
    before = snapshot(tmp_path)

    result = run_case(case, tmp_path, monkeypatch)

    assert result.exit_code == 2, result.output
    line = final_error_line(result.stderr) if case.after_summary else error_line(result.stderr)
    assert case.message in line
    assert result.stdout == ""
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


@pytest.mark.parametrize("case", [c for c in CASES if c.name in (
    "truncated", "shape-wrong-channels", "forward-raises", "output-missing-folder")],
    ids=lambda c: c.name)
def test_debug_shows_the_traceback_instead(case, tmp_path, monkeypatch):
    if case.make is not None:
        case.make(tmp_path)
    result = run_case(case, tmp_path, monkeypatch, "--debug")
    assert result.exit_code != 0
    assert result.exception is not None and not isinstance(result.exception, SystemExit)
    assert case.message.split("'")[0] in str(result.exception)


# Rows where a library could print on its own (torch.export logs a traceback before raising,
# torch.load warns about pickle protocols): only a real process shows the real stderr.
NOISY = [c for c in CASES if c.name in ("pt2-garbage", "onnx-garbage", "plain-pickle",
                                          "random-bytes")]


@pytest.mark.parametrize("case", NOISY, ids=[c.name for c in NOISY])
def test_console_script_stderr_is_the_one_line(case, tmp_path):
    case.make(tmp_path)
    before = snapshot(tmp_path)
    done = subprocess.run([str(REPFUSE), "convert", *case.args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert case.message in error_line(done.stderr)
    assert done.stdout == ""
    assert snapshot(tmp_path) == before


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    """The installed ``repfuse`` in a subprocess: the real stderr and exit code."""
    (tmp_path / "w.pt").write_bytes(b"")
    before = snapshot(tmp_path)
    done = subprocess.run([str(REPFUSE), "convert", "w.pt", "--arch", "resnet_tiny"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "is empty (0 bytes)" in error_line(done.stderr)
    assert snapshot(tmp_path) == before
    loud = subprocess.run([str(REPFUSE), "convert", "w.pt", "--arch", "resnet_tiny", "--debug"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert loud.returncode != 0 and "Traceback (most recent call last)" in loud.stderr


# --- unwritable folders --------------------------------------------------------------------------


def test_output_folder_that_refuses_the_file_is_one_line(tmp_path, monkeypatch):
    """The folder exists and looks writable, but creating the file fails (as in a read-only
    folder when running as root, or a full disk): exit 2, nothing left behind."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", "resnet_tiny", *TINY, "-o", "out.pt"])
    assert result.exit_code == 2, result.output
    assert "cannot write 'out.pt': Permission denied" in final_error_line(result.stderr)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(main, ["convert", "resnet_tiny", *TINY, "-o", "ro/out.pt"])
        assert result.exit_code == 2
        assert "folder 'ro' is not writable" in error_line(result.stderr)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_folder_even_root_cannot_write(tmp_path):
    """sysfs refuses new files to everyone: the real failure path, in the console script."""
    target = "/sys/kernel/repfuse_test_out.pt"
    done = subprocess.run([str(REPFUSE), "convert", "resnet_tiny", *TINY, "-o", target],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    line = final_error_line(done.stderr)
    assert "/sys/kernel" in line and ("not writable" in line or "cannot write" in line)
    assert not Path(target).exists()


# --- replacing an existing output ----------------------------------------------------------------


def test_existing_output_survives_a_failed_verification(tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"the previous fused model")
    result = CliRunner().invoke(main, ["convert", "resnet_tiny", *TINY, "-o", str(out),
                                       "--rtol", "0", "--atol", "0"])
    assert result.exit_code == 1  # not equivalent at zero tolerance: nothing written
    assert out.read_bytes() == b"the previous fused model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


def test_existing_output_survives_a_write_that_fails_halfway(tmp_path, monkeypatch):
    out = tmp_path / "out.pt"
    out.write_bytes(b"the previous fused model")
    real_save = torch.save

    def half_then_fail(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    result = CliRunner().invoke(main, ["convert", "resnet_tiny", *TINY, "-o", str(out)])
    monkeypatch.setattr(torch, "save", real_save)
    assert result.exit_code == 2
    assert final_error_line(result.stderr) == \
        f"repfuse: error: cannot write '{out}': No space left on device"
    assert out.read_bytes() == b"the previous fused model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]  # no temporary file


def test_existing_output_is_replaced_by_a_complete_one(tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"the previous fused model")
    result = CliRunner().invoke(main, ["convert", "resnet_tiny", *TINY, "-o", str(out)])
    assert result.exit_code == 0, result.output
    fused = torch.load(out, weights_only=False)
    x = random_input((2, 3, 32, 32), seed=3)
    with torch.no_grad():
        assert rel_err(reference64(create_model("resnet_tiny"), x), fused(x)) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


# --- the trust model: nothing from a file runs without --trust -----------------------------------


class MakesAFolder:
    """Unpickling this runs ``os.mkdir(path)``: a stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def export_with_pickled_weight(folder: Path, marker: Path) -> Path:
    """A real torch.export program of resnet_tiny whose first weight is a pickle that runs code
    (the archive allows pickled weights; ``torch.export.load`` unpickles them without
    ``weights_only``)."""
    program = folder / "tiny.pt2"
    model = create_model("resnet_tiny")
    torch.export.save(torch.export.export(model, (random_input((1, 3, 32, 32)),)), program)
    source = zipfile.ZipFile(program)
    prefix = source.namelist()[0].split("/")[0]
    config_name = f"{prefix}/data/weights/model_weights_config.json"
    config = json.loads(source.read(config_name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    payload = io.BytesIO()
    torch.save(MakesAFolder(marker), payload)
    crafted = folder / "crafted.pt2"
    with zipfile.ZipFile(crafted, "w", zipfile.ZIP_STORED) as out:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == config_name:
                data = json.dumps(config).encode()
            elif item.filename == f"{prefix}/data/weights/{first['path_name']}":
                data = payload.getvalue()
            out.writestr(item.filename, data)
    program.unlink()
    return crafted


def test_export_program_with_pickled_contents_needs_trust(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    crafted = export_with_pickled_weight(tmp_path, marker)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["convert", crafted.name])

    assert result.exit_code == 2
    line = error_line(result.stderr)
    assert "'crafted.pt2' holds pickled objects beyond tensors: loading it can run arbitrary " \
           "code. Re-run with --trust" in line
    assert not marker.exists()  # nothing in the file ran
    assert snapshot(tmp_path) == before

    trusted = CliRunner().invoke(main, ["convert", crafted.name, "--trust"])
    assert marker.is_dir()  # with --trust the file's code runs, as the user allowed
    assert trusted.exit_code == 2  # and the weight it "held" is no tensor: a clean error
    assert "cannot load 'crafted.pt2' as a torch.export program" in error_line(trusted.stderr)


def test_pickle_that_runs_code_is_never_unpickled_without_trust(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    torch.save(MakesAFolder(marker), tmp_path / "model.pt")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", "model.pt"])
    assert result.exit_code == 2
    assert "loading it can run arbitrary code" in error_line(result.stderr)
    assert not marker.exists()
    result = CliRunner().invoke(main, ["convert", "model.pt", "--arch", "resnet_tiny"])
    assert result.exit_code == 2 and not marker.exists()  # --arch does not imply trust
