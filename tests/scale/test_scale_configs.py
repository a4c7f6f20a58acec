"""The configs of docs/scale.md: DDP and bf16 on CPU (gloo, 2 processes) here and in CI; the
teacher cache (a student trains with the teacher's file gone); FSDP parsed here and trained only
where CUDA is available (Lightning refuses FSDP on CPU): those tests are skipped on this machine.
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning.cli import KDLightningCLI, build_cli, main
from kd_lightning.methods import DistillationModule

ROOT = Path(__file__).resolve().parents[2]
SCALE = ROOT / "experiments" / "scale"
TINY = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_model_summary=false",
]
TEACHER_ARG = "--model.init_args.teacher.init_args.checkpoint_path"
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="FSDP and GPU DDP need CUDA (Lightning refuses FSDP on CPU)",
)


def _val_rows(metrics_csv: Path) -> list[dict[str, str]]:
    with open(metrics_csv) as f:
        return [r for r in csv.DictReader(f) if r.get("val/acc")]


@pytest.mark.slow
def test_ddp_config_runs_as_two_cpu_processes_in_bf16(teacher_checkpoint, tmp_path):
    """The command docs/scale.md gives for CPU: the config's own `strategy: ddp`, launched from
    the shell, so Lightning starts rank 1 as a second `kd-lightning` process."""
    command = [sys.executable, "-m", "kd_lightning", "fit", "-c", str(SCALE / "ddp.yaml")]
    command += ["--trainer.accelerator=cpu", "--trainer.devices=2", *TINY]
    command += [f"{TEACHER_ARG}={teacher_checkpoint}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MEMBER: 2/2" in done.stderr and "distributed_backend=gloo" in done.stderr
    assert "bfloat16 Automatic Mixed Precision" in done.stderr
    lines = done.stdout.splitlines()
    # Rank 0 alone prints: one line per epoch, one summary.
    assert [line.split(" | ")[0] for line in lines if line.startswith("epoch ")] == [
        "epoch 1/2",
        "epoch 2/2",
    ]
    assert sum(line.startswith("fit done: val/acc") for line in lines) == 1
    run = tmp_path / "runs/scale/ddp/version_0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    saved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert (saved["strategy"], str(saved["devices"]), saved["precision"]) == (
        "ddp",
        "2",
        "bf16-mixed",
    )
    assert len(_val_rows(run / "metrics.csv")) == 2


def test_ddp_config_in_two_forked_cpu_processes(teacher_checkpoint, tmp_path, monkeypatch, capfd):
    """The CI tier: the same config in-process, its ranks forked (`ddp_notebook`) rather than
    launched as new processes (plain `ddp` would launch pytest's own command line again)."""
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "-c", str(SCALE / "ddp.yaml"), "--trainer.accelerator=cpu"]
    argv += ["--trainer.devices=2", "--trainer.strategy=ddp_notebook", *TINY]
    # Lightning's log lines, written to file descriptor 2 by every forked rank.
    handler = logging.StreamHandler(sys.__stderr__)
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(handler)
    try:
        main([*argv, f"{TEACHER_ARG}={teacher_checkpoint}"])
    finally:
        lightning_log.removeHandler(handler)
    out, err = capfd.readouterr()
    assert "Starting with 2 processes" in err and "bfloat16 Automatic Mixed Precision" in err
    lines = out.splitlines()
    assert [line.split(" | ")[0] for line in lines if line.startswith("epoch ")] == [
        "epoch 1/2",
        "epoch 2/2",
    ]
    run = tmp_path / "runs/scale/ddp/version_0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert len(_val_rows(run / "metrics.csv")) == 2


def test_cached_teacher_config_trains_with_the_teacher_file_gone(
    teacher_checkpoint, tmp_path, monkeypatch, capsys
):
    """The cache is built once from the teacher; later runs never load it."""
    monkeypatch.chdir(tmp_path)
    teacher = tmp_path / "teacher.ckpt"
    teacher.write_bytes(teacher_checkpoint.read_bytes())
    argv = ["fit", "-c", str(SCALE / "cached_teacher.yaml"), *TINY, "--trainer.max_epochs=1"]
    argv += [f"--data.init_args.teacher_cache.init_args.teacher_checkpoint={teacher}"]
    main(argv)
    cache = tmp_path / "runs/scale/teacher_cache.kdtc"
    assert cache.is_file()
    teacher.unlink()  # a machine without the teacher: the valid cache is used as it is
    stamp = cache.stat().st_mtime_ns
    main(argv)
    assert cache.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert (tmp_path / "runs/scale/cached_teacher/version_1/checkpoints/best.ckpt").is_file()


class _ParseOnly(KDLightningCLI):
    """Parse and build the config's classes (the strategy too), but no Trainer: on CPU
    Lightning refuses to build a Trainer with FSDP."""

    def instantiate_trainer(self, **kwargs):
        return None


def test_fsdp_config_shards_every_transformer_block_of_student_and_teacher(
    vit_teacher_checkpoint, tmp_path, monkeypatch
):
    from lightning.pytorch.strategies import FSDPStrategy

    from kd_lightning.models.tiny_vit import Block

    monkeypatch.chdir(tmp_path)
    argv = ["-c", str(SCALE / "fsdp.yaml"), f"{TEACHER_ARG}={vit_teacher_checkpoint}"]
    cli = _ParseOnly(
        DistillationModule,
        None,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        save_config_callback=None,
        args=argv,
        run=False,
    )
    strategy = cli.config_init["trainer"]["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy.kwargs["use_orig_params"] is True  # frozen and trained units side by side
    students = [m for m in cli.model.student.modules() if isinstance(m, Block)]
    teachers = [m for m in cli.model.teacher.modules() if isinstance(m, Block)]
    assert len(students) == 2 and len(teachers) == 4  # depth 2 student, depth 4 teacher
    assert not any(p.requires_grad for p in cli.model.teacher.parameters())


# ----------------------------------------------------------------- CUDA only (skipped on CPU)
def _fit_on_gpu(config: Path, teacher: Path, tmp_path: Path):
    argv = ["-c", str(config), f"{TEACHER_ARG}={teacher}", *TINY, "--trainer.devices=1"]
    cli = build_cli(argv, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


@requires_cuda
def test_fsdp_config_trains_on_gpu_with_the_teacher_out_of_the_optimizer(
    vit_teacher_checkpoint, tmp_path, monkeypatch
):
    from torch.distributed.fsdp import FullyShardedDataParallel

    from kd_lightning.teachers import load_student

    monkeypatch.chdir(tmp_path)
    cli = _fit_on_gpu(SCALE / "fsdp.yaml", vit_teacher_checkpoint, tmp_path)
    wrapped = [m for m in cli.trainer.model.modules() if isinstance(m, FullyShardedDataParallel)]
    assert len(wrapped) >= 1 + 2 + 4  # the root, the student's and the teacher's blocks
    optimized = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in cli.model.teacher.parameters())
    run = tmp_path / "runs/scale/fsdp/version_0/checkpoints"
    student = load_student(run / "best.ckpt")
    assert type(student).__name__ == "TinyViT"
    assert torch.isfinite(student(torch.zeros(2, 1, 8, 8))).all()


@requires_cuda
def test_ddp_config_trains_on_gpu(teacher_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _fit_on_gpu(SCALE / "ddp.yaml", teacher_checkpoint, tmp_path)
    assert cli.trainer.precision == "bf16-mixed"
    run = tmp_path / "runs/scale/ddp/version_0"
    assert (run / "checkpoints/best.ckpt").is_file() and len(_val_rows(run / "metrics.csv")) == 2
