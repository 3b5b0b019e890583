"""Lightning callbacks: the prediction writer and the TensorBoard extras."""

from mambaxray_ctl.callbacks.predictions import PredictionWriter
from mambaxray_ctl.callbacks.tensorboard import EmbeddingProjector, ParameterCounts, SampleReports

__all__ = ["EmbeddingProjector", "ParameterCounts", "PredictionWriter", "SampleReports"]
