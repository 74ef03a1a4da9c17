"""A model's memory footprint on a device: channel widths and activation bytes per voxel.

Used to size blocks (:func:`pipeline.core.tiling.choose_block`) from free GPU memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def model_widths(model: Any) -> list[int]:
    """Channel widths of the feature maps a model computes, input first, in layer order.

    Reads ``in_channels``, then ``n_features`` (filter banks) if the model has it, then the
    ``out_channels`` of every layer that has one (``Conv3d``, rotation-invariant convs, ...).
    """
    widths = [int(getattr(model, "in_channels", 1))]
    if getattr(model, "n_features", None):
        widths.append(int(model.n_features))
    for module in model.modules():
        if module is model:
            continue
        out = getattr(module, "out_channels", None)
        if isinstance(out, int) and out > 0:
            widths.append(out)
    return widths


def activation_bytes_per_voxel(
    widths: Sequence[int], *, classes: int, element_bytes: int = 4, overhead: float = 1.5
) -> float:
    """Peak device bytes per voxel of the read box during one block's forward pass.

    Counted: a layer's input and output at once (the widest consecutive pair), one more
    feature map of the widest width (residual sums and activations that are not in place),
    the float32 input, and three float32 copies of the class maps (logits, channels-last copy,
    softmax); all times ``overhead`` for the allocator's rounding and convolution workspaces.

    Args:
        widths: channel widths, input first (:func:`model_widths`).
        classes: K.
        element_bytes: 4 for float32, 2 under bf16/fp16 autocast.
    """
    if not widths:
        raise ValueError("widths must name at least the input channels")
    pairs = max((a + b for a, b in zip(widths, widths[1:], strict=False)), default=widths[0])
    features = (pairs + max(widths)) * element_bytes
    fp32 = (widths[0] + 3 * classes) * 4
    return (features + fp32) * overhead
