"""One progress interface for every stage.

Library code calls a :class:`Reporter`; the CLI passes a terminal bar, flows pass one that
publishes Prefect progress artifacts, tests pass :class:`RecordingReporter`. Library code never
configures logging handlers or prints.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


class Reporter(Protocol):
    def start(self, stage: str, total: int) -> None: ...

    def advance(self, n: int = 1, *, voxels: int = 0) -> None: ...

    def finish(self) -> None: ...


class NullReporter:
    """Reports nothing."""

    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self, n: int = 1, *, voxels: int = 0) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class RecordingReporter:
    """Keeps every call, for tests."""

    events: list[tuple[str, Any]] = field(default_factory=list)

    def start(self, stage: str, total: int) -> None:
        self.events.append(("start", (stage, total)))

    def advance(self, n: int = 1, *, voxels: int = 0) -> None:
        self.events.append(("advance", (n, voxels)))

    def finish(self) -> None:
        self.events.append(("finish", None))

    @property
    def advanced(self) -> int:
        return sum(n for kind, (n, _v) in ((k, v) for k, v in self.events if k == "advance"))


class TerminalReporter:
    """A tqdm bar on stderr showing blocks done / total and voxels/s."""

    def __init__(self, *, disable: bool | None = None) -> None:
        self._disable = (not sys.stderr.isatty()) if disable is None else disable
        self._bar: Any = None
        self._voxels = 0
        self._t0 = 0.0

    def start(self, stage: str, total: int) -> None:
        from tqdm import tqdm

        self._voxels = 0
        self._t0 = time.perf_counter()
        self._bar = tqdm(total=total, desc=stage, unit="block", disable=self._disable, file=sys.stderr)

    def advance(self, n: int = 1, *, voxels: int = 0) -> None:
        if self._bar is None:
            return
        self._voxels += voxels
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        self._bar.set_postfix_str(f"{self._voxels / elapsed / 1e6:.2f} Mvox/s", refresh=False)
        self._bar.update(n)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
