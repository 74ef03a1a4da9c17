"""studios: exact blockwise segmentation of large tomograms with stride-free local models.

The public API, one name per stage (loaded on first use, so ``import pipeline`` stays cheap)::

    from pipeline import ingest, train, segment, run_qc, ClusterSpec

Layers (see docs/architecture.md): :mod:`pipeline.core` (pure) < :mod:`pipeline.io` and
:mod:`pipeline.models` < :mod:`pipeline.compute` < the stages :mod:`pipeline.ingest`,
:mod:`pipeline.train`, :mod:`pipeline.segment`, :mod:`pipeline.qc` < :mod:`pipeline.service`
and :mod:`pipeline.cli`. The library imports without Prefect, FastAPI or ``distributed``;
``distributed`` is loaded only when blocks are dispatched (:mod:`pipeline.compute.executors`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.core.blas import pin_mkl_code_path

__version__ = "0.1.0"

pin_mkl_code_path()  # before any computation: one MKL code path, so --exact is bit-identical (core/blas.py)

_EXPORTS: dict[str, str] = {
    "ingest": "pipeline.ingest.run",
    "ingest_array": "pipeline.ingest.run",
    "IngestResult": "pipeline.ingest.run",
    "train": "pipeline.train.loop",
    "TrainResult": "pipeline.train.loop",
    "load_annotations": "pipeline.train.annotations",
    "segment": "pipeline.segment.run",
    "SegmentResult": "pipeline.segment.run",
    "predict_volume": "pipeline.segment.predict",
    "run_qc": "pipeline.qc.run",
    "QCResult": "pipeline.qc.run",
    "analyse": "pipeline.analyse.run",
    "AnalysisResult": "pipeline.analyse.run",
    "ClusterSpec": "pipeline.compute.cluster",
    "SerialExecutor": "pipeline.compute.executors",
    "ModelBundle": "pipeline.io.bundle",
    "init_bundle": "pipeline.io.bundle",
    "load_bundle": "pipeline.io.bundle",
    "save_bundle": "pipeline.io.bundle",
    "open_image": "pipeline.io.store",
    "Box": "pipeline.core.geometry",
    "Block": "pipeline.core.tiling",
    "plan_blocks": "pipeline.core.tiling",
    "StudiosError": "pipeline.core.errors",
}

__all__ = [
    "__version__",
    "AnalysisResult",
    "Block",
    "Box",
    "ClusterSpec",
    "IngestResult",
    "ModelBundle",
    "QCResult",
    "SegmentResult",
    "SerialExecutor",
    "StudiosError",
    "TrainResult",
    "analyse",
    "ingest",
    "ingest_array",
    "init_bundle",
    "load_annotations",
    "load_bundle",
    "open_image",
    "plan_blocks",
    "predict_volume",
    "run_qc",
    "save_bundle",
    "segment",
    "train",
]

if TYPE_CHECKING:
    from pipeline.analyse.run import AnalysisResult, analyse
    from pipeline.compute.cluster import ClusterSpec
    from pipeline.compute.executors import SerialExecutor
    from pipeline.core.errors import StudiosError
    from pipeline.core.geometry import Box
    from pipeline.core.tiling import Block, plan_blocks
    from pipeline.ingest.run import IngestResult, ingest, ingest_array
    from pipeline.io.bundle import ModelBundle, init_bundle, load_bundle, save_bundle
    from pipeline.io.store import open_image
    from pipeline.qc.run import QCResult, run_qc
    from pipeline.segment.predict import predict_volume
    from pipeline.segment.run import SegmentResult, segment
    from pipeline.train.annotations import load_annotations
    from pipeline.train.loop import TrainResult, train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
