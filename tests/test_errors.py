"""Only a PoftError (errors.py: a problem the user can fix) becomes a one-line `Error: ...`.

A builtin exception that reaches the CLI is a bug: it keeps its traceback (click's CliRunner
hands it back as result.exception) instead of being dressed up as a message for the user, which
the CLI did for every ValueError, FileNotFoundError and FileExistsError before errors.py.
"""

import errno
import pathlib

import pytest
from click.testing import CliRunner

from poft_mlx import errors
from poft_mlx.cli.main import main
from poft_mlx.data import builtin

USER_ERRORS = [
    errors.ConfigError("--set train.iters: expected an integer, got 'x'"),
    errors.DataError("d.jsonl:3: messages: no assistant turn"),
    errors.InputMissing("data.train: d.jsonl is not a file"),
    errors.WouldOverwrite("runs/x already exists and is not empty"),
    errors.ModelRefError("'nope' is not a model folder"),
    errors.ExportError("run folder not found: runs/x"),
    errors.DiskFull.writing("out/train.jsonl", 2**20, "free space and run it again", free=0),
]


def gsm8k_raising(monkeypatch, error: BaseException):
    """`poft-mlx data gsm8k` with its one library call replaced by one that raises `error`."""

    def split_gsm8k(*args, **kwargs):
        raise error

    monkeypatch.setattr(builtin, "split_gsm8k", split_gsm8k)
    return CliRunner().invoke(main, ["data", "gsm8k", "out"])


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda e: type(e).__name__)
def test_a_user_error_is_one_line_with_exit_code_1(monkeypatch, error):
    result = gsm8k_raising(monkeypatch, error)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.output == f"Error: {error}\n"
    assert "Traceback" not in result.output


@pytest.mark.parametrize("bug", [ValueError("could not broadcast (3,) to (4,)"),
                                 FileNotFoundError(errno.ENOENT, "No such file or directory", "/tmp/x"),
                                 FileExistsError(errno.EEXIST, "File exists", "/tmp/x"),
                                 KeyError("model.layers.0")],
                         ids=lambda e: type(e).__name__)
def test_a_builtin_exception_is_a_bug_and_keeps_its_traceback(monkeypatch, bug):
    result = gsm8k_raising(monkeypatch, bug)
    assert result.exception is bug and not isinstance(result.exception, errors.PoftError)
    assert result.exit_code != 0
    assert "Error:" not in result.output


def test_an_unreadable_data_file_is_a_data_error_naming_it(tmp_path, monkeypatch):
    from poft_mlx.data.records import read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q", "completion": "a"}\n')

    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    with pytest.raises(errors.DataError, match=rf"^1 problem\(s\) in the data:\n  {path}:0: <file>: cannot be read "
                                               r"\(Permission denied\)$"):
        read_jsonl(path)


def test_an_unreadable_chat_template_file_is_a_template_error_naming_it(tmp_path):
    from poft_mlx.data.render import resolve_template

    path = tmp_path / "t.jinja"
    path.write_bytes(b"{{ '\xff' }}")
    with pytest.raises(errors.TemplateError, match=f"chat_template '{path}': cannot read the file"):
        resolve_template(str(path))


def test_every_error_class_is_still_importable_where_it_was():
    from poft_mlx.config import ConfigError
    from poft_mlx.data.records import DataError
    from poft_mlx.data.render import TemplateError
    from poft_mlx.evaluation.lm_eval import LmEvalMissing
    from poft_mlx.export.fuse import ExportError, FuseCheckError
    from poft_mlx.models.files import ModelFileError
    from poft_mlx.models.refs import ModelRefError
    from poft_mlx.runtime.diskspace import DiskFull
    from poft_mlx.runtime.distributed import PeerLost
    from poft_mlx.runtime.runlock import RunLocked

    assert (ConfigError, DataError, TemplateError, LmEvalMissing, ExportError, FuseCheckError, ModelFileError,
            ModelRefError, DiskFull, PeerLost, RunLocked) == (
        errors.ConfigError, errors.DataError, errors.TemplateError, errors.MissingExtra, errors.ExportError,
        errors.FuseCheckError, errors.ModelFileError, errors.ModelRefError, errors.DiskFull, errors.PeerLost,
        errors.RunLocked)
    # Code that catches the builtin a class stood for keeps working.
    assert issubclass(DataError, ValueError) and issubclass(RunLocked, FileExistsError)
    assert issubclass(DiskFull, OSError) and issubclass(LmEvalMissing, ImportError)


def test_disk_full_says_which_file_how_much_it_needed_and_what_was_free(tmp_path):
    e = errors.DiskFull.writing(tmp_path / "scratch.tmp", 3 * 2**20, "nothing was written", free=2**20)
    assert str(e) == f"no space left on device writing {tmp_path / 'scratch.tmp'}: it needs 3.0 MiB, 1.0 MiB free " \
                     "there; nothing was written"
    assert e.errno == errno.ENOSPC and e.filename == str(tmp_path / "scratch.tmp") and e.need == 3 * 2**20
    told = e.at(tmp_path / "model", "free space and convert again")  # the folder the user asked for
    assert str(told).startswith(f"no space left on device writing {tmp_path / 'model'}: it needs 3.0 MiB, ")
    assert str(told).endswith(" free there; free space and convert again") and told.need == e.need
