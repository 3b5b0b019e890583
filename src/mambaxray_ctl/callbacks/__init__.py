"""Lightning callbacks: the prediction writer and the TensorBoard extras (with their pictures, ``images``)."""

from mambaxray_ctl.callbacks.predictions import PredictionWriter
from mambaxray_ctl.callbacks.tensorboard import (
    EmbeddingProjector,
    ParameterCounts,
    Reconstructions,
    SampleReports,
)

__all__ = ["EmbeddingProjector", "ParameterCounts", "PredictionWriter", "Reconstructions", "SampleReports"]
