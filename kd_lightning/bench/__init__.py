"""The research template: studies (configs x seeds -> one results table, plot and W&B group)."""

from kd_lightning.bench.report import read_csv
from kd_lightning.bench.study import Study, StudyResults, StudyRun, plan_study, run_study
from kd_lightning.bench.tracking import WandbSettings
from kd_lightning.bench.wandb_offline import read_offline_run, read_offline_runs

__all__ = [
    "Study",
    "StudyResults",
    "StudyRun",
    "WandbSettings",
    "plan_study",
    "read_csv",
    "read_offline_run",
    "read_offline_runs",
    "run_study",
]
