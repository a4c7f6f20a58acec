"""Stateless twins of :mod:`kd_lightning.losses`; each loss module calls one of these cores."""

from kd_lightning.functional.soft_target import (
    IGNORE_INDEX,
    hard_label_cross_entropy,
    logit_matching_mse,
    soft_target_kl,
)

__all__ = ["IGNORE_INDEX", "hard_label_cross_entropy", "logit_matching_mse", "soft_target_kl"]
