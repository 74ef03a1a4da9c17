"""The analyse stage: objects, fibre orientation, pores and surfaces of a segmentation, blockwise."""

from pipeline.analyse.run import AnalysisResult, analyse
from pipeline.core.stage import callable_stage

__all__ = ["AnalysisResult", "analyse"]

callable_stage(__name__, analyse)
