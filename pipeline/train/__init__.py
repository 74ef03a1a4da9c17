"""Training from sparse annotations: annotation formats, sampling, the training loop."""

from pipeline.core.stage import callable_stage
from pipeline.train.annotations import Annotations, load_annotations
from pipeline.train.loop import TrainResult, train

__all__ = ["Annotations", "TrainResult", "load_annotations", "train"]

callable_stage(__name__, train)
