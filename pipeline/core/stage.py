"""Stage packages that can be called like their stage function.

``pipeline.segment`` is both a package (``pipeline.segment.run``, ``.worker``, ...) and the
public function ``pipeline.segment(scan, model, output)``: once a subpackage is imported, Python
binds its name on the parent, so ``from pipeline import segment`` can only ever give the
package. :func:`callable_stage` makes that package call its stage function, so both spellings
work and ``inspect.signature`` shows the function's parameters.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


class _StagePackage(types.ModuleType):
    __wrapped__: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)


def callable_stage(package: str, function: Callable[..., Any]) -> None:
    """Make the imported package ``package`` callable as ``function``."""
    module = sys.modules[package]
    module.__class__ = _StagePackage
    module.__wrapped__ = function  # type: ignore[attr-defined]
