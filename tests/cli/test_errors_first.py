"""Through the CLI, the library's own sentence is printed first and alone (exit status 2).

Each bad input used to surface inside jsonargparse's "Does not validate against any of the
Union subtypes", after 80-130 lines quoting the whole config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_lightning.cli import main
from kd_lightning.cli_errors import TRACEBACK_ENV, run_with_clean_errors, user_message

ROOT = Path(__file__).resolve().parents[2]
HINTON = ROOT / "experiments" / "digits" / "hinton_kd.yaml"


def _config_with(tmp_path: Path, teacher: Path, edit) -> Path:
    config = yaml.safe_load(HINTON.read_text())
    config["model"]["init_args"]["teacher"]["init_args"]["checkpoint_path"] = str(teacher)
    edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _kd_term(config):
    return config["model"]["init_args"]["loss_terms"][0]["init_args"]


def _error_lines(capsys, argv) -> list[str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    # Lightning's own "Seed set to N" may come before; nothing else may.
    lines = [line for line in lines if not line.startswith("Seed set to")]
    assert "Does not validate" not in captured.err and "Traceback" not in captured.err
    return lines


@pytest.mark.parametrize(
    ("edit", "sentence"),
    [
        (
            lambda c: _kd_term(c)["loss"]["init_args"].update(temperature=0.0),
            "temperature must be > 0",
        ),
        (lambda c: _kd_term(c).update(weight=-0.5), "weight of a loss term must be >= 0, got -0.5"),
        (
            lambda c: c["model"]["init_args"]["student"].update(
                class_path="kd_lightning.models.Nope"
            ),
            "model.init_args.student: Problem with given class_path 'kd_lightning.models.Nope'",
        ),
        (
            lambda c: c["data"]["init_args"].update(labeled_fraction=1.5),
            "labeled_fraction must be in (0, 1]",
        ),
    ],
    ids=["temperature-0", "negative-weight", "unknown-class-path", "labeled-fraction"],
)
def test_config_errors_print_the_sentence_first(
    edit, sentence, teacher_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    config = _config_with(tmp_path, teacher_checkpoint, edit)
    lines = _error_lines(capsys, ["fit", "-c", str(config)])
    assert lines[0].startswith("kd-lightning: error: ") and sentence in lines[0], lines
    assert (
        len(lines) == 2 and "--traceback" in lines[1]
    )  # the sentence, then where the traceback is


def test_missing_teacher_checkpoint_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [
        "fit",
        "-c",
        str(HINTON),
        "--model.init_args.teacher.init_args.checkpoint_path=runs/nope.ckpt",
    ]
    lines = _error_lines(capsys, argv)
    assert lines[0] == (
        "kd-lightning: error: teacher checkpoint 'runs/nope.ckpt' does not exist. Train the "
        "teacher first (e.g. `kd-lightning fit -c experiments/digits/teacher.yaml`) or fix "
        "checkpoint_path."
    )


@pytest.mark.parametrize(
    ("override", "sentence"),
    [
        ("--trainer.max_epochs=abc", "trainer.max_epochs: Expected a <class 'int'>"),
        ("--no_such_option=1", "unrecognized arguments: --no_such_option=1"),
        ("--model.init_args.student.class_path=nopkg.Net", "No module named 'nopkg'"),
    ],
)
def test_parser_errors_are_one_line(override, sentence, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lines = _error_lines(capsys, ["fit", "-c", str(HINTON), override])
    assert lines[0].startswith("kd-lightning: error: ") and sentence in lines[0], lines


def test_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "-c", str(HINTON), "--model.init_args.teacher.init_args.checkpoint_path=x.ckpt"]
    with pytest.raises(ValueError, match="Does not validate") as info:  # jsonargparse's wrapper
        main([*argv, "--traceback"])
    chain = []
    error: BaseException | None = info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__
    assert isinstance(chain[-1], FileNotFoundError)
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="Does not validate"):
        main(argv)


def _raise(error: BaseException):
    def run(argv):
        raise error

    return run


def test_errors_that_are_not_ours_keep_their_traceback(capsys):
    # A RuntimeError (a bug, a torch failure in training) is not a sentence for the user.
    with pytest.raises(RuntimeError, match="boom"):
        run_with_clean_errors("kd-lightning", _raise(RuntimeError("boom")), [])
    # A ValueError raised outside this package and outside config parsing: also not ours.
    with pytest.raises(ValueError, match="outside"):
        run_with_clean_errors("kd-lightning", _raise(ValueError("outside")), [])
    assert capsys.readouterr().err == ""


def test_user_message_picks_the_first_sentence_not_raised_by_the_parser():
    from kd_lightning.losses import SoftTargetKLLoss

    try:
        SoftTargetKLLoss(temperature=-1.0)
    except ValueError as error:
        ours = error
    assert user_message(ours) == str(ours)  # raised in kd_lightning: a sentence
    assert user_message(KeyError("plain")) is None  # no traceback: not raised by us
