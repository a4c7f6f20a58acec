"""Teachers as knowledge sources: frozen, pretrained (from any file), ensembles, EMA, cached.

Every source has ``teach(batch, knowledge) -> {"logits": ..., ...}``; methods call it and file
the result under the source's name in the step's knowledge.
"""

from kd_lightning.artifact import CHECKPOINT_KEY, STUDENT_PREFIX, load_student, read_checkpoint
from kd_lightning.teachers.cached import CachedTeacher
from kd_lightning.teachers.ema import EMATeacher
from kd_lightning.teachers.ensemble import TeacherEnsemble
from kd_lightning.teachers.frozen import FrozenTeacher, call_model, output_logits
from kd_lightning.teachers.pretrained import PermutedTeacher, PretrainedTeacher, load_weights_file

__all__ = [
    "CHECKPOINT_KEY",
    "STUDENT_PREFIX",
    "CachedTeacher",
    "EMATeacher",
    "FrozenTeacher",
    "PermutedTeacher",
    "PretrainedTeacher",
    "TeacherEnsemble",
    "call_model",
    "load_student",
    "load_weights_file",
    "read_checkpoint",
    "output_logits",
]
