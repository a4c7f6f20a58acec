"""The compression configs under experiments/digits run through the CLI with their callbacks.

(The repository-wide config test drops callbacks; this one keeps them, shrinks the epochs and
batches, and checks what each callback must have done.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_lightning.bench.study import quiet_lightning
from kd_lightning.cli import build_cli
from kd_lightning.compression import sparsity_of

ROOT = Path(__file__).resolve().parents[2] / "experiments" / "digits"
PRUNING = ["prune_obd_distil.yaml", "prune_magnitude.yaml", "prune_obd_labels.yaml"]


def _point_checkpoints(node, path):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "checkpoint_path":
                node[key] = str(path)
            else:
                _point_checkpoints(value, path)
    elif isinstance(node, list):
        for item in node:
            _point_checkpoints(item, path)


def _run(name, checkpoint, tmp_path, **trainer):
    config = yaml.safe_load((ROOT / name).read_text())
    _point_checkpoints(config, checkpoint)
    config["trainer"].update(
        logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False,
        enable_checkpointing=False, limit_train_batches=1, limit_val_batches=1, **trainer,
    )  # fmt: skip
    for callback in config["trainer"]["callbacks"]:
        args = callback.setdefault("init_args", {})
        if "hessian_batches" in args:
            args["hessian_batches"] = 1
        if "save_path" in args:
            args["save_path"] = str(tmp_path / "int8.pt")
    resolved = tmp_path / "config.yaml"
    resolved.write_text(yaml.safe_dump(config))
    with quiet_lightning():
        cli = build_cli(["-c", str(resolved)], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory):
    """A small trained MLP: the distilled student that the pruning configs start from."""
    import lightning as L

    from kd_lightning.data import DigitsTransferSet
    from kd_lightning.methods import Supervised
    from kd_lightning.models import MLP
    from tests.conftest import fast_trainer

    L.seed_everything(0)
    module = Supervised(MLP(10, hidden_sizes=[16]))
    trainer = fast_trainer(limit_train_batches=5, limit_val_batches=1)
    trainer.fit(module, DigitsTransferSet())
    path = tmp_path_factory.mktemp("mlp") / "mlp.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("name", PRUNING)
def test_pruning_config_reaches_its_target(name, tmp_path, mlp_checkpoint):
    cli = _run(name, mlp_checkpoint, tmp_path)
    (callback,) = [c for c in cli.trainer.callbacks if hasattr(c, "target_sparsity")]
    assert callback.rounds_done == callback.num_rounds
    assert sparsity_of(cli.model.student) == pytest.approx(callback.target_sparsity, abs=1e-3)


def test_quantize_distil_config_writes_an_int8_student(tmp_path, teacher_checkpoint):
    from kd_lightning.callbacks import load_quantized

    _run("quantize_distil.yaml", teacher_checkpoint, tmp_path, max_epochs=1)
    int8 = load_quantized(tmp_path / "int8.pt")
    assert any("quantized" in type(m).__module__ for m in int8.modules())
