"""Quality control of a segmentation: qc.json for machines, report.html for people."""

from pipeline.qc.run import QCResult, load_qc, run_qc

__all__ = ["QCResult", "load_qc", "run_qc"]
