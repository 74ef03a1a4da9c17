"""studios: exact blockwise segmentation of large tomograms with stride-free local models.

The library imports without Prefect or ``distributed``; those are loaded only by the code
paths that need them (:mod:`pipeline.executors`, ``flows/``).
"""

__version__ = "0.1.0"
