"""Kind 4: trainer settings that break or empty a fit (precision, gradient clipping, validation
interval, learning rate, a monitored name never logged) are refused before the first step, by
one set of checks that a fit's start-up and a study's preflight share."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from kd_lightning.callbacks.monitor_check import UnknownMonitor
from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import Supervised
from kd_lightning.models import MLP
from tests.safety.conftest import refused_third_run, trainer, unchanged, weights


def _fit(tmp_path, module=None, **trainer_kwargs):
    module = module or Supervised(MLP(hidden_sizes=[8]))
    before = weights(module)
    fit = trainer(tmp_path, **trainer_kwargs)
    return module, before, lambda: fit.fit(module, DigitsTransferSet(batch_size=32))


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"gradient_clip_val": math.nan}, "trainer.gradient_clip_val is nan"),
        ({"gradient_clip_val": math.inf}, "trainer.gradient_clip_val is inf"),
        ({"gradient_clip_val": -1.0}, "trainer.gradient_clip_val is -1.0"),
        ({"val_check_interval": 0}, "trainer.val_check_interval is 0"),
        ({"check_val_every_n_epoch": 0}, "trainer.check_val_every_n_epoch is 0"),
        ({"accumulate_grad_batches": 0}, "trainer.accumulate_grad_batches is 0"),
        ({"precision": "16-true"}, "precision '16-true' cannot train on the CPU"),
    ],
)
def test_trainer_settings_that_break_a_fit_are_refused_before_any_step(tmp_path, setting, named):
    module, before, run = _fit(tmp_path, **setting)
    with pytest.raises(ValueError) as err:
        run()
    assert named in str(err.value)
    assert unchanged(before, module)


@pytest.mark.parametrize(
    ("optimizer", "named"),
    [
        (lambda p: torch.optim.Adam(p, lr=math.inf), "group 0 of Adam is inf"),
        (lambda p: torch.optim.SGD(p, lr=math.nan), "group 0 of SGD is nan"),
        (lambda p: torch.optim.SGD(p, lr=0.0), "group 0 of SGD is 0"),
        (
            lambda p: torch.optim.SGD([{"params": p[:2]}, {"params": p[2:], "lr": math.inf}], 0.1),
            "group 1 of SGD is inf",
        ),
    ],
    ids=["adam inf", "sgd nan", "zero", "second group inf"],
)
def test_a_learning_rate_that_is_not_finite_and_positive_is_refused_before_any_step(
    tmp_path, optimizer, named
):
    module = Supervised(MLP(hidden_sizes=[8]), optimizer=lambda p: optimizer(list(p)))
    module, before, run = _fit(tmp_path, module)
    with pytest.raises(ValueError, match="must be finite and > 0") as err:
        run()
    assert named in str(err.value) and "optimizer.init_args.lr" in str(err.value)
    assert unchanged(before, module)


def test_a_warm_up_from_zero_is_not_a_zero_learning_rate(tmp_path):
    warm = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)  # noqa: E731
    module = Supervised(MLP(hidden_sizes=[8]), lr_scheduler=warm)
    _fit(tmp_path, module, limit_val_batches=0)[2]()


@pytest.mark.parametrize(
    ("callback", "nearest"),
    [
        (lambda: ModelCheckpoint(monitor="val/accuracy"), "'val/acc'"),
        (lambda: ModelCheckpoint(monitor="val/los", mode="min"), "'val/loss'"),
        (lambda: EarlyStopping(monitor="val/los"), "'val/loss'"),
        (lambda: EarlyStopping(monitor="val_acc", mode="max"), None),
    ],
    ids=["checkpoint accuracy", "checkpoint los", "early stopping los", "no stage prefix"],
)
@pytest.mark.parametrize("sanity", [2, 0], ids=["sanity check", "no sanity check"])
def test_a_monitored_name_the_run_never_logs_is_refused_naming_the_nearest(
    tmp_path, callback, nearest, sanity
):
    module, before, run = _fit(
        tmp_path, callbacks=[callback()], enable_checkpointing=True, num_sanity_val_steps=sanity
    )
    with pytest.raises(UnknownMonitor, match="which this run never logs") as err:
        run()
    message = str(err.value)
    if nearest is not None:
        assert f"nearest: [{nearest}" in message
        if sanity:  # refused after the sanity check: not one step taken
            assert unchanged(before, module) and "before any training step" in message
    else:  # a name without a stage prefix may come from training: judged after epoch 1
        assert "after its first training epoch" in message and "'val/acc'" in message


def test_a_training_only_name_is_judged_after_the_first_epoch(tmp_path):
    _, _, run = _fit(tmp_path, callbacks=[EarlyStopping(monitor="train/los", mode="min")])
    with pytest.raises(UnknownMonitor, match=r"after its first training epoch.*") as err:
        run()
    assert "nearest: ['train/loss'" in str(err.value)


@pytest.mark.parametrize(
    ("monitor", "extra"),
    [
        ("val/loss", {}),
        ("train/loss_epoch", {}),
        ("train/acc", {}),
        ("val/acc", {"limit_val_batches": 0}),
    ],
    ids=["val", "train epoch", "train only", "no validation: not judged"],
)
def test_names_the_run_logs_pass(tmp_path, monitor, extra):
    mode = "min" if "loss" in monitor else "max"
    _, _, run = _fit(tmp_path, callbacks=[ModelCheckpoint(monitor=monitor, mode=mode)],
                     enable_checkpointing=True, **extra)  # fmt: skip
    run()


@pytest.mark.parametrize(
    ("bad", "sentence"),
    [
        ({"trainer.precision": "16-true"}, "cannot train on the CPU"),
        ({"trainer.gradient_clip_val": math.nan}, "gradient_clip_val is nan"),
        ({"trainer.val_check_interval": 0}, "val_check_interval is 0"),
        ({"model.init_args.optimizer.init_args.lr": math.inf}, "learning rate of parameter group"),
    ],
    ids=["16-true", "clip nan", "val_check_interval 0", "lr inf"],
)
def test_a_study_refuses_a_bad_trainer_setting_of_its_third_run_before_the_first_trains(
    tmp_path, bad, sentence
):
    message = refused_third_run(tmp_path, bad)
    assert "'third'" in message and sentence in message and "nothing has trained" in message
    assert "'first'" not in message and "'second'" not in message


ES = "lightning.pytorch.callbacks.EarlyStopping"


@pytest.mark.parametrize(
    ("callback", "nearest"),
    [
        ({"class_path": ES, "init_args": {"monitor": "val/los"}}, "'val/loss'"),
        # a study keeps its own ModelCheckpoint (the config's are dropped): EarlyStopping here
        ({"class_path": ES, "init_args": {"monitor": "val/accuracy", "mode": "max"}}, "'val/acc'"),
        ({"class_path": ES, "init_args": {"monitor": "val/loss_kd"}}, "'val/loss'"),
    ],
    ids=["los", "accuracy", "a term the run does not have"],
)
def test_a_study_refuses_a_monitor_of_its_third_run_that_is_never_logged(
    tmp_path, callback, nearest
):
    message = refused_third_run(tmp_path, {"trainer.callbacks": [callback]})
    assert "'third'" in message and "which this run never logs" in message
    assert f"nearest: [{nearest}" in message and "'first'" not in message
