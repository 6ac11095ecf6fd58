"""advtrain: adversarially robust training and honest robustness evaluation with PyTorch Lightning."""

__version__ = "0.1.0"
