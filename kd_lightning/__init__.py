"""kd_lightning: knowledge distillation on PyTorch Lightning."""
