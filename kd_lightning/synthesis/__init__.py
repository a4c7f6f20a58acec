"""Data-free transfer sets: inputs synthesised from a trained teacher alone (pure torch).

- :class:`DeepInversion` (Yin et al. 2020): match the teacher's BatchNorm statistics.
- :class:`DataImpressions` (Nayak et al. 2019): match Dirichlet-sampled soft targets whose
  concentration comes from the teacher's class similarity.

Both return a :class:`SynthesisedSet` that can be saved and reused as an ordinary transfer set
(:class:`kd_lightning.data.synthesised.SynthesisedTransferSet`).
"""

from kd_lightning.synthesis.base import InputSynthesiser, frozen_for_input_gradients, unwrap_teacher
from kd_lightning.synthesis.data_impressions import (
    DataImpressions,
    class_similarity_matrix,
    dirichlet_concentration,
    find_classifier,
    sample_dirichlet,
)
from kd_lightning.synthesis.deep_inversion import (
    BatchNormStatistics,
    DeepInversion,
    balanced_classes,
    batchnorm_statistics_distance,
    channel_statistics,
    l2_prior,
    total_variation,
)
from kd_lightning.synthesis.store import (
    SynthesisedSet,
    SynthesisedSetError,
    module_digest,
    tensors_digest,
)

__all__ = [
    "BatchNormStatistics",
    "DataImpressions",
    "DeepInversion",
    "InputSynthesiser",
    "SynthesisedSet",
    "SynthesisedSetError",
    "balanced_classes",
    "batchnorm_statistics_distance",
    "channel_statistics",
    "class_similarity_matrix",
    "dirichlet_concentration",
    "find_classifier",
    "frozen_for_input_gradients",
    "l2_prior",
    "module_digest",
    "sample_dirichlet",
    "tensors_digest",
    "total_variation",
    "unwrap_teacher",
]
