"""The research template: studies (configs x seeds -> one results table, figure and W&B group)."""

from kd_lightning.bench.plan import PlannedRun, plan_study
from kd_lightning.bench.preflight import PreflightError
from kd_lightning.bench.report import read_csv
from kd_lightning.bench.study import StudyOverwriteError, StudyResults, run_study
from kd_lightning.bench.study_file import Study, StudyError, StudyRun
from kd_lightning.bench.tracking import WandbSettings
from kd_lightning.bench.wandb_offline import read_offline_run, read_offline_runs

__all__ = [
    "PlannedRun",
    "PreflightError",
    "Study",
    "StudyError",
    "StudyOverwriteError",
    "StudyResults",
    "StudyRun",
    "WandbSettings",
    "plan_study",
    "read_csv",
    "read_offline_run",
    "read_offline_runs",
    "run_study",
]
