"""AAND (Anomaly Amplification and Normality Distillation) as an anomalib 2.x model."""

from .lightning_model import Aand
from .torch_model import AandModel

__all__ = ["Aand", "AandModel"]
