"""Start-up shim for tests (see :func:`pipeline.testing.faults.slow_blocks_env`): every block
sleeps ``STUDIOS_TEST_BLOCK_DELAY`` seconds before it runs. Only on ``PYTHONPATH`` in tests."""

import os

_DELAY = float(os.environ.get("STUDIOS_TEST_BLOCK_DELAY", "0") or 0)

if _DELAY > 0:
    import functools
    import time

    import pipeline.segment.run as _run
    import pipeline.segment.worker as _worker

    _run_block = _worker.run_block

    @functools.wraps(_run_block)
    def run_block(job, block, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(_DELAY)
        return _run_block(job, block, **kwargs)

    # the driver dispatches run.run_block; workers resolve it by name in worker: patch both
    _worker.run_block = run_block  # type: ignore[assignment]
    _run.run_block = run_block  # type: ignore[attr-defined]
