"""Lightning callbacks: compress the student while it trains (pruning, quantization); write
``predict``'s outputs to a file (:class:`PredictionWriter`)."""

from kd_lightning.callbacks.optimal_brain_damage import OptimalBrainDamage
from kd_lightning.callbacks.prediction_writer import PredictionWriter
from kd_lightning.callbacks.pruning import (
    IterativePruning,
    MagnitudePruning,
    install_masks,
    install_pruning_for_state_dict,
)
from kd_lightning.callbacks.quantization import (
    QuantizationAwareTraining,
    load_compressed_student,
    load_quantized,
    quantize_student,
    save_quantized,
)

__all__ = [
    "IterativePruning",
    "MagnitudePruning",
    "OptimalBrainDamage",
    "PredictionWriter",
    "QuantizationAwareTraining",
    "install_masks",
    "install_pruning_for_state_dict",
    "load_compressed_student",
    "load_quantized",
    "quantize_student",
    "save_quantized",
]
