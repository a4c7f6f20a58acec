"""The model zoo: plain ``nn.Module``s that return logits."""

from kd_lightning.models.mlp import MLP
from kd_lightning.models.small_cnn import SmallCNN
from kd_lightning.models.spec import instantiate, model_spec, records_init_args

__all__ = ["MLP", "SmallCNN", "instantiate", "model_spec", "records_init_args"]
