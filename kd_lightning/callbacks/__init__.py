"""Lightning callbacks that compress the student while it trains: pruning and quantization."""

from kd_lightning.callbacks.pruning import (
    IterativePruning,
    MagnitudePruning,
    OptimalBrainDamage,
    install_masks,
    install_pruning_for_state_dict,
)

__all__ = [
    "IterativePruning",
    "MagnitudePruning",
    "OptimalBrainDamage",
    "install_masks",
    "install_pruning_for_state_dict",
]
