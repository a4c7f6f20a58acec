"""The research template: studies (configs x seeds -> one results table)."""

from kd_lightning.bench.study import Study, StudyRun, run_study

__all__ = ["Study", "StudyRun", "run_study"]
