"""The analyse stage: objects, fibre orientation, pores and surfaces of a segmentation, blockwise."""

from pipeline.analyse.run import AnalysisResult, analyse

__all__ = ["AnalysisResult", "analyse"]
