"""OptimalBrainDamage / MagnitudePruning callbacks.

The Hessian a callback computes inside ``fit`` is compared with an independent reference: the
textbook element-by-element double backprop of a loss written out by hand (cross-entropy, and
Hinton's soft-target objective). Hutchinson's estimate is checked to converge to it, and the
paper's recursion to equal it where it is exact (a single layer). Masks are checked against
saliencies ranked by hand; checkpoints against reload and against an uninterrupted run.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.callbacks import MagnitudePruning, OptimalBrainDamage
from kd_lightning.compression import sparsity_of, sparsity_schedule
from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.models.from_checkpoint import FromCheckpoint
from kd_lightning.teachers import PretrainedTeacher, load_student
from tests.conftest import fast_trainer


class Recorder(Callback):
    """Counts training steps; snapshots the student's effective weights before epoch 0 runs."""

    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


def _tiny_data(n=24, classes=3, features=4, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y, DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _loop_hessian_diagonal(loss_fn, tensors):
    """One scalar double backward per element: the definition, independent of the library."""
    grads = torch.autograd.grad(loss_fn(), tensors, create_graph=True)
    out = []
    for p, g in zip(tensors, grads, strict=True):
        diag = torch.zeros(p.numel())
        for k in range(p.numel()):
            (row,) = torch.autograd.grad(g.reshape(-1)[k], p, retain_graph=True)
            diag[k] = row.reshape(-1)[k]
        out.append(diag.reshape(p.shape))
    return out


def _fit_one_round(module, callback, loader, **trainer_kwargs):
    """One epoch, first round at epoch 0: the Hessian is taken at the initial weights."""
    kwargs = dict(max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)
    kwargs.update(trainer_kwargs)
    fast_trainer(callbacks=[callback], **kwargs).fit(module, loader)


def test_callback_hessian_equals_double_backprop_cross_entropy():
    torch.manual_seed(0)
    x, y, loader = _tiny_data()
    module = Supervised(MLP(3, in_features=4, hidden_sizes=[5]), num_classes=3)
    student = module.student
    w1, w2 = student.hidden[0][0].weight, student.classifier.weight

    def reference_loss():  # the mean over the first 2 batches of the hand-written CE
        return sum(F.cross_entropy(student(x[i : i + 8]), y[i : i + 8]) for i in (0, 8)) / 2

    expected = _loop_hessian_diagonal(reference_loss, [w1, w2])
    callback = OptimalBrainDamage(0.5, num_rounds=1, hessian="exact", hessian_batches=2)
    _fit_one_round(module, callback, loader)
    got = callback.last_hessian
    assert set(got) == {"hidden.0.0.weight", "classifier.weight"}
    torch.testing.assert_close(got["hidden.0.0.weight"], expected[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["classifier.weight"], expected[1], rtol=1e-5, atol=1e-7)


def test_callback_hessian_is_the_distillation_objective():
    """With a teacher, the Hessian is of alpha*T^2*KL(teacher||student) + (1-alpha)*CE."""
    torch.manual_seed(1)
    x, y, loader = _tiny_data(seed=1)
    teacher_net = MLP(3, in_features=4, hidden_sizes=[6])
    module = OfflineDistillation(MLP(3, in_features=4, hidden_sizes=[5]), teacher_net)
    module.num_classes = 3
    student = module.student
    params = [student.hidden[0][0].weight, student.classifier.weight]
    T, alpha = 4.0, 0.9

    def reference_loss():
        total = 0
        for i in (0, 8, 16):
            s, t = student(x[i : i + 8]), teacher_net(x[i : i + 8]).detach()
            kl = F.kl_div(
                F.log_softmax(s / T, -1),
                F.log_softmax(t / T, -1),
                reduction="batchmean",
                log_target=True,
            )
            total = total + alpha * T**2 * kl + (1 - alpha) * F.cross_entropy(s, y[i : i + 8])
        return total / 3

    expected = _loop_hessian_diagonal(reference_loss, params)
    callback = OptimalBrainDamage(0.5, num_rounds=1, hessian="exact", hessian_batches=3)
    _fit_one_round(module, callback, loader)
    torch.testing.assert_close(callback.last_hessian["hidden.0.0.weight"], expected[0])
    torch.testing.assert_close(callback.last_hessian["classifier.weight"], expected[1])


def test_hutchinson_mean_converges_to_the_exact_diagonal():
    x, y, loader = _tiny_data(seed=2)
    errors = {}
    for samples in (16, 4096):
        torch.manual_seed(2)
        module = Supervised(MLP(3, in_features=4, hidden_sizes=[5]), num_classes=3)
        student = module.student
        exact = _loop_hessian_diagonal(
            lambda student=student: (
                sum(F.cross_entropy(student(x[i : i + 8]), y[i : i + 8]) for i in (0, 8)) / 2
            ),
            [student.hidden[0][0].weight, student.classifier.weight],
        )
        callback = OptimalBrainDamage(
            0.5, 1, hessian="hutchinson", hutchinson_samples=samples, hessian_batches=2
        )
        _fit_one_round(module, callback, loader)
        got = callback.last_hessian
        flat_exact = torch.cat([e.reshape(-1) for e in exact])
        flat_got = torch.cat(
            [got["hidden.0.0.weight"].reshape(-1), got["classifier.weight"].reshape(-1)]
        )
        errors[samples] = (flat_got - flat_exact).abs().max().item() / flat_exact.abs().max().item()
    # Standard error shrinks as 1/sqrt(S): 256x the probes, ~16x smaller error.
    assert errors[4096] < errors[16] / 4
    assert errors[4096] < 0.1


def test_obd_recursion_is_exact_for_a_single_layer():
    torch.manual_seed(3)
    x, y, loader = _tiny_data(seed=3)
    module = Supervised(MLP(3, in_features=4, hidden_sizes=[]), num_classes=3)
    w = module.student.classifier.weight
    expected = _loop_hessian_diagonal(
        lambda: (
            sum(F.cross_entropy(module.student(x[i : i + 8]), y[i : i + 8]) for i in (0, 8)) / 2
        ),
        [w],
    )[0]
    callback = OptimalBrainDamage(0.5, 1, hessian="obd", hessian_batches=2)
    _fit_one_round(module, callback, loader)
    torch.testing.assert_close(callback.last_hessian["classifier.weight"], expected)


def test_masks_remove_the_lowest_obd_saliencies_and_reach_the_schedule():
    torch.manual_seed(4)
    x, y, loader = _tiny_data(n=32, seed=4)
    module = Supervised(MLP(3, in_features=4, hidden_sizes=[8]), num_classes=3)
    student = module.student
    before = {
        "hidden.0.0.weight": student.hidden[0][0].weight.detach().clone(),
        "classifier.weight": student.classifier.weight.detach().clone(),
    }
    callback = OptimalBrainDamage(0.6, num_rounds=1, hessian="exact", hessian_batches=2)
    _fit_one_round(module, callback, loader)  # masks from the initial weights
    h = callback.last_hessian
    saliency = torch.cat([(0.5 * h[n].clamp_min(0) * before[n] ** 2).reshape(-1) for n in before])
    kept = torch.cat(
        [
            student.hidden[0][0].weight_mask.reshape(-1),
            student.classifier.weight_mask.reshape(-1),
        ]
    ).bool()
    num_pruned = round(0.6 * saliency.numel())
    assert (~kept).sum().item() == num_pruned
    # Every pruned entry has a saliency no larger than every kept one.
    assert saliency[~kept].max() <= saliency[kept].min()


def test_schedule_rounds_epochs_and_cumulative_masks():
    L.seed_everything(0)
    module = Supervised(MLP(10, hidden_sizes=[16]), num_classes=10)
    callback = MagnitudePruning(0.8, num_rounds=3, prune_every_n_epochs=2, start_epoch=1)
    assert callback.round_epochs == [1, 3, 5]
    masks_by_epoch = {}

    class Snapshot(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            masks_by_epoch[trainer.current_epoch] = (
                pl_module.student.classifier.weight_mask.clone()
                if hasattr(pl_module.student.classifier, "weight_mask")
                else None
            )

    trainer = fast_trainer(
        max_epochs=7, limit_train_batches=2, limit_val_batches=1, callbacks=[callback, Snapshot()]
    )
    trainer.fit(module, DigitsTransferSet(batch_size=32))
    assert [h["epoch"] for h in callback.history] == [1, 3, 5]
    expected = sparsity_schedule(0.8, 3, "geometric")
    for record, target in zip(callback.history, expected, strict=True):
        assert record["sparsity"] == pytest.approx(target, abs=1e-3)
    assert sparsity_of(module.student) == pytest.approx(0.8, abs=1e-3)
    assert masks_by_epoch[0] is None
    # A pruned entry never comes back, and stays exactly zero while training goes on.
    for a, b in [(1, 2), (2, 3), (3, 5), (5, 6)]:
        assert not (masks_by_epoch[b].bool() & ~masks_by_epoch[a].bool()).any()
    w = module.student.classifier
    assert ((w.weight_orig * w.weight_mask) == 0).sum() >= (w.weight_mask == 0).sum()


def test_reload_and_resume_equal_the_uninterrupted_run(tmp_path):
    def run(max_steps, root, ckpt_path=None):
        L.seed_everything(0)
        module = Supervised(
            MLP(10, hidden_sizes=[16]), optimizer=lambda p: torch.optim.Adam(p, 3e-3)
        )
        callback = OptimalBrainDamage(
            0.7, num_rounds=2, start_epoch=1, hessian="exact", hessian_batches=1
        )
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=3,
            max_steps=max_steps,
            logger=False,
            callbacks=[callback, ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)],
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_train_batches=3,
            limit_val_batches=1,
        )
        trainer.fit(module, DigitsTransferSet(batch_size=32, shuffle_seed=1), ckpt_path=ckpt_path)
        return module, callback

    straight, straight_cb = run(-1, tmp_path / "straight")
    first, _ = run(6, tmp_path / "resumed")  # interrupted after epoch 1 (round 1 done)
    assert sparsity_of(first.student) < 0.69
    resumed, resumed_cb = run(
        -1, tmp_path / "resumed2", ckpt_path=tmp_path / "resumed" / "last.ckpt"
    )
    assert [h["epoch"] for h in resumed_cb.history] == [1, 2]  # round 1 restored, not redone
    # Same masks, same weights, same Adam state: the parameter order of pruned layers is kept.
    state_a, state_b = straight.student.state_dict(), resumed.student.state_dict()
    assert set(state_a) == set(state_b) and "classifier.weight_mask" in state_a
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key

    # The checkpoint rebuilds the pruned student on its own, and as a teacher.
    x = torch.rand(5, 1, 8, 8)
    loaded = load_student(tmp_path / "straight" / "last.ckpt")
    assert sparsity_of(loaded) == pytest.approx(0.7, abs=1e-3)
    torch.testing.assert_close(loaded(x), straight.eval()(x))
    torch.testing.assert_close(
        PretrainedTeacher(str(tmp_path / "straight" / "last.ckpt"))(x), straight(x)
    )


def test_from_checkpoint_student_distilled_from_its_unpruned_self(tmp_path):
    L.seed_everything(0)
    source = Supervised(MLP(10, hidden_sizes=[16]))
    trainer = fast_trainer(limit_train_batches=4, limit_val_batches=1)
    trainer.fit(source, DigitsTransferSet())
    source_path = tmp_path / "source.ckpt"
    trainer.save_checkpoint(source_path)

    student = FromCheckpoint(source_path)
    assert isinstance(student, MLP) and student.training
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(student.eval()(x), source.eval()(x))

    module = OfflineDistillation(
        {
            "class_path": "kd_lightning.models.from_checkpoint.FromCheckpoint",
            "init_args": {"checkpoint_path": str(source_path)},
        },
        PretrainedTeacher(str(source_path)),
    )
    trainer = fast_trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[MagnitudePruning(0.5, num_rounds=1)],
    )
    trainer.fit(module, DigitsTransferSet())
    pruned_path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(pruned_path)
    source_path.unlink()  # the pruned checkpoint no longer needs its source
    rebuilt = load_student(pruned_path)
    assert isinstance(rebuilt, MLP) and sparsity_of(rebuilt) == pytest.approx(0.5, abs=1e-3)
    torch.testing.assert_close(rebuilt(x), module.eval()(x))


def test_accuracy_floor_stops_and_undoes_the_round():
    L.seed_everything(0)
    module = Supervised(MLP(10, hidden_sizes=[16]))
    callback = MagnitudePruning(0.9, num_rounds=3, accuracy_floor=1.01)  # unreachable floor
    trainer = fast_trainer(
        max_epochs=3, limit_train_batches=2, limit_val_batches=1, callbacks=[callback]
    )
    trainer.fit(module, DigitsTransferSet())
    assert callback.stopped and callback.rounds_done == 1
    assert sparsity_of(module.student) == 0.0  # round 1 undone: all masks back to ones


def test_layer_collapse_warns():
    L.seed_everything(0)
    module = Supervised(MLP(10, hidden_sizes=[256]))  # untrained: global |w| removes the head
    trainer = fast_trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        callbacks=[MagnitudePruning(0.9, 1)],
    )
    with pytest.warns(UserWarning, match="layer collapse"):
        trainer.fit(module, DigitsTransferSet())


# ------------------------------------------------------------------ bad input, at start-up


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
@pytest.mark.parametrize("cls", [OptimalBrainDamage, MagnitudePruning])
def test_sparsity_outside_unit_interval(cls, sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\)"):
        cls(target_sparsity=sparsity)


def _fails_before_any_step(module, callback, match, **kwargs):
    counter = Recorder()
    with pytest.raises(ValueError, match=match):
        fast_trainer(callbacks=[callback, counter], **kwargs).fit(module, DigitsTransferSet())
    assert counter.steps == 0


def test_pruning_target_naming_no_parameter():
    _fails_before_any_step(
        Supervised(MLP(10, hidden_sizes=[8])),
        OptimalBrainDamage(0.5, parameters=["encoder.*.weight"]),
        r"pruning target names no parameter: .*encoder.*valid names are",
    )


def test_schedule_longer_than_training_and_unsupported_obd_student():
    _fails_before_any_step(
        Supervised(MLP(10, hidden_sizes=[8])),
        MagnitudePruning(0.5, num_rounds=3),
        "runs at the start of epoch 2 but trainer.max_epochs=2",
        max_epochs=2,
    )
    _fails_before_any_step(
        Supervised(SmallCNN(10, width=4)),
        OptimalBrainDamage(0.5, num_rounds=1, hessian="obd"),
        "hessian='obd' .* Use hessian='exact' or 'hutchinson'",
    )
    with pytest.raises(ValueError, match="hessian must be one of"):
        OptimalBrainDamage(hessian="fisher")
    with pytest.raises(ValueError, match="num_rounds must be an integer >= 1"):
        MagnitudePruning(num_rounds=0)


def test_structured_pruning_removes_whole_rows():
    L.seed_everything(0)
    module = Supervised(MLP(10, hidden_sizes=[16]))
    callback = OptimalBrainDamage(
        0.5,
        1,
        parameters=["hidden.0.0.weight"],
        structured=True,
        hessian="hutchinson",
        hutchinson_samples=8,
        hessian_batches=1,
    )
    fast_trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[callback]
    ).fit(module, DigitsTransferSet())
    mask = module.student.hidden[0][0].weight_mask
    rows = mask.all(1) | (~mask.bool()).all(1)
    assert rows.all() and (~mask.bool()).all(1).sum() == 8


def test_nn_sequential_student_works_with_every_hessian():
    for method in ("exact", "hutchinson", "obd"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
        module = Supervised(net)
        callback = OptimalBrainDamage(
            0.5, 1, hessian=method, hessian_batches=1, hutchinson_samples=4
        )
        fast_trainer(
            max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[callback]
        ).fit(module, DigitsTransferSet())
        assert sparsity_of(net) == pytest.approx(0.5, abs=1e-3)
