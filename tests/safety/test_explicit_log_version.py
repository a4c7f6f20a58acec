"""Kind 1, the run folder: a fit whose logger names a folder that already holds a run (an
explicit ``--trainer.logger.init_args.version``) is refused before anything is written, naming
the folder and ``--overwrite``; a refused fit, even with ``--overwrite``, leaves the earlier
run's files byte-identical."""

from __future__ import annotations

from pathlib import Path

from tests.safety.conftest import DIGITS, MLP_MODEL, TINY, run_cli

CONFIG = ["fit", "-c", str(DIGITS / "student_alone.yaml"), MLP_MODEL, *TINY]
BAD_LR = "--model.init_args.optimizer.init_args.lr=-1"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def finished(tmp_path: Path, version: str) -> Path:
    code, err = run_cli([*CONFIG, f"--trainer.logger.init_args.version={version}"], _Quiet())
    assert code == 0, err
    folder = (
        tmp_path
        / "runs"
        / "digits"
        / "student_alone"
        / (version if not version.isdigit() else f"version_{version}")
    )
    assert (folder / "metrics.csv").is_file() and (folder / "config.yaml").is_file()
    return folder


class _Quiet:
    def readouterr(self):
        class _Out:
            err = ""

        return _Out()


def test_an_explicit_version_naming_a_finished_run_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    for version in ("0", "mine"):
        folder = finished(tmp_path, version)
        before = snapshot(folder)
        for extra in ([], [BAD_LR], ["--trainer.max_epochs=2"]):
            code, err = run_cli(
                [*CONFIG, f"--trainer.logger.init_args.version={version}", *extra], capsys
            )
            assert code == 2, err
            first = err.strip().splitlines()[0]
            assert (
                str(folder) in first and "--overwrite" in first and "Nothing was written" in first
            )
            assert snapshot(folder) == before, (version, extra)


def test_a_refused_fit_with_overwrite_puts_the_earlier_files_back(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = finished(tmp_path, "0")
    before = snapshot(folder)
    for bad in (BAD_LR, "--model.init_args.optimizer.init_args.weight_decay=-1"):
        code, err = run_cli(
            [*CONFIG, "--trainer.logger.init_args.version=0", "--overwrite", bad], capsys
        )
        assert code == 2, err
        assert snapshot(folder) == before, bad


def test_a_new_version_or_an_explicit_overwrite_still_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = finished(tmp_path, "0")
    before = snapshot(folder)
    code, err = run_cli(CONFIG, capsys)  # the default: the next version_<N>
    assert code == 0, err
    assert snapshot(folder) == before and (folder.parent / "version_1" / "metrics.csv").is_file()
    replace = [
        "--trainer.logger.init_args.version=0",
        "--overwrite",
        "--trainer.limit_train_batches=3",
    ]
    code, err = run_cli([*CONFIG, *replace], capsys)
    assert code == 0, err
    assert (folder / "metrics.csv").read_bytes() != before["metrics.csv"]


def test_a_logger_name_through_a_missing_folder_cannot_reach_a_finished_run(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    folder = finished(tmp_path, "0")
    before = snapshot(folder)
    for detour in ("y/../student_alone", "a/b/../../student_alone"):
        code, err = run_cli(
            [*CONFIG, f"--trainer.logger.init_args.name={detour}",
             "--trainer.logger.init_args.version=0"], capsys,
        )  # fmt: skip
        assert code == 2, err
        assert "--overwrite" in err.strip().splitlines()[0]
        assert snapshot(folder) == before, detour
