"""Progress off a terminal: one line per epoch by default (batch jobs, CI logs); on a terminal
one live line rewritten in place."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from kd_lightning.bench.callbacks import StudyProgress
from kd_lightning.bench.study import _parser


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _epochs(progress: StudyProgress, count: int) -> None:
    trainer = SimpleNamespace(
        current_epoch=0,
        max_epochs=count,
        callback_metrics={},
        sanity_checking=False,
        is_global_zero=True,
    )
    progress.on_fit_start(trainer, None)
    for epoch in range(count):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"val/acc": 0.5 + epoch / 10}
        progress.on_train_epoch_end(trainer, None)
    progress.on_fit_end(trainer, None)


def test_off_a_terminal_every_epoch_prints_a_line_by_default():
    stream = io.StringIO()
    _epochs(StudyProgress("[1/2] kd seed=0", stream=stream), 3)
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[:2] for line in lines] == [
        ["[1/2] kd seed=0 epoch 1/3", "val acc 0.5000"],
        ["[1/2] kd seed=0 epoch 2/3", "val acc 0.6000"],
        ["[1/2] kd seed=0 epoch 3/3", "val acc 0.7000"],
    ]


def test_every_n_epochs_and_zero():
    stream = io.StringIO()
    _epochs(StudyProgress("p", stream=stream, every_n_epochs=2), 4)
    assert [line.split(" | ")[0] for line in stream.getvalue().splitlines()] == [
        "p epoch 2/4",
        "p epoch 4/4",
    ]
    silent = io.StringIO()
    _epochs(StudyProgress("p", stream=silent, every_n_epochs=0), 2)
    assert silent.getvalue() == ""
    with pytest.raises(ValueError, match="every_n_epochs must be >= 0"):
        StudyProgress("p", every_n_epochs=-1)


def test_on_a_terminal_one_line_is_rewritten_in_place():
    terminal = _Terminal()
    _epochs(StudyProgress("p", stream=terminal), 2)
    text = terminal.getvalue()
    assert "\n" not in text  # no line of its own per epoch
    assert text.count("\r\033[K") == 3  # two epochs, then the line is cleared at fit end


def test_the_cli_leaves_the_choice_to_the_stream():
    assert _parser().parse_args(["s.yaml"]).epoch_lines is None
    assert _parser().parse_args(["s.yaml", "--epoch-lines", "0"]).epoch_lines == 0
