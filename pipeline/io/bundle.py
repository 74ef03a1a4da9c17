"""Model bundles: a folder with ``model.json`` (architecture as data) and ``weights.safetensors``.

Loading never executes code from the bundle: the architecture is looked up by name in the
registry and built from JSON parameters; weights are read with ``safetensors`` (no pickle).
A bundle that carries pickled weights (``.pt``/``.pth``/``.pkl``/``.ckpt``) is refused.

``model.json`` keys::

    format        "studios-model/1"
    arch          registry name, e.g. "dilated_resnet"
    params        constructor parameters (JSON)
    classes       class names, index i -> label i + 1
    halo          receptive-field radius in voxels (checked against the architecture)
    normalization {"method": "percentile"|"zscore", "low": .., "high": ..}
    provenance    free-form: how it was made (training data, seed, metrics...)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import __version__
from pipeline.core.errors import ModelError, OutputExistsError
from pipeline.core.normalize import Normalization
from pipeline.models import DEFAULT_ARCH, StridefreeModel, build_model

FORMAT = "studios-model/1"
UNSAFE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


@dataclass(frozen=True)
class ModelBundle:
    """A model and everything needed to apply it to a new scan."""

    arch: str
    params: Mapping[str, Any]
    classes: tuple[str, ...]
    halo: int
    normalization: Normalization
    state: Mapping[str, torch.Tensor] = field(repr=False)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def build(self) -> StridefreeModel:
        """A fresh module with the bundle's weights, in eval mode (float32, CPU)."""
        model = build_model(self.arch, self.params)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(self.state))
        extra = sorted(set(self.state) - set(expected))
        where = self.path or "<bundle>"
        if missing or extra:
            raise ModelError(
                f"{where}: weights do not match architecture {self.arch!r} "
                f"(missing {missing[:3]}, unexpected {extra[:3]}); re-create or re-train the bundle"
            )
        for key, tensor in expected.items():
            if tuple(self.state[key].shape) != tuple(tensor.shape):
                raise ModelError(
                    f"{where}: weight {key!r} has shape {tuple(self.state[key].shape)}, architecture needs "
                    f"{tuple(tensor.shape)}; re-create or re-train the bundle"
                )
        model.load_state_dict(dict(self.state), strict=True)
        if model.halo != self.halo:
            raise ModelError(f"{where}: model.json declares halo {self.halo} but the architecture has {model.halo}")
        return model.eval()

    @property
    def fingerprint(self) -> str:
        """SHA-256 over architecture, parameters, normalisation and weights (ledger key)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.to_json(), sort_keys=True, default=str).encode())
        for key in sorted(self.state):
            h.update(key.encode())
            h.update(self.state[key].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "arch": self.arch,
            "params": dict(self.params),
            "classes": list(self.classes),
            "halo": self.halo,
            "normalization": self.normalization.to_json(),
            "provenance": dict(self.provenance),
        }


def from_model(
    model: StridefreeModel,
    *,
    classes: Sequence[str],
    normalization: Normalization | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> ModelBundle:
    """Wrap a module into a bundle (weights copied to CPU)."""
    if len(classes) != model.classes:
        raise ModelError(f"{len(classes)} class names given for a model with {model.classes} outputs")
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    return ModelBundle(
        arch=model.arch,
        params=model.params(),
        classes=tuple(classes),
        halo=model.halo,
        normalization=normalization or Normalization(),
        state=state,
        provenance=dict(provenance or {}),
    )


def init_bundle(
    *,
    classes: Sequence[str] = ("background", "foreground"),
    arch: str = DEFAULT_ARCH,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    normalization: Normalization | None = None,
) -> ModelBundle:
    """A bundle with seeded random weights (for trying the engine before training)."""
    if isinstance(classes, str):
        raise ModelError(f"classes {classes!r} is one string; give a sequence of class names (label 1..K)")
    if len(classes) < 2 or len(classes) > 255:
        raise ModelError(
            f"{len(classes)} class(es) given ({', '.join(map(str, classes))}); a segmentation model needs between "
            "2 and 255 classes"
        )
    torch.manual_seed(seed)
    p = dict(params or {})
    p.setdefault("classes", len(classes))
    p.setdefault("in_channels", 1)
    model = build_model(arch, p)
    return from_model(
        model,
        classes=classes,
        normalization=normalization,
        provenance={"kind": "random-init", "seed": seed, "created": _now(), "studios_version": __version__},
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def save_bundle(bundle: ModelBundle, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``model.json`` and ``weights.safetensors`` into ``directory``."""
    from safetensors.torch import save_file

    out = Path(directory)
    if (out / "model.json").exists() and not overwrite:
        raise OutputExistsError(f"{out}: already holds a model; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in bundle.state.items()}, str(out / "weights.safetensors"))
    (out / "model.json").write_text(json.dumps(bundle.to_json(), indent=2) + "\n")
    return out


def load_bundle(directory: str | os.PathLike[str]) -> ModelBundle:
    """Read and validate a bundle; never unpickles anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    if not path.is_dir():
        raise ModelError(f"{path}: is not a model bundle folder; create one with 'studios model init' or 'studios train'")
    meta_path = path / "model.json"
    weights = path / "weights.safetensors"
    unsafe = sorted(p.name for p in path.iterdir() if p.suffix.lower() in UNSAFE_SUFFIXES)
    if not weights.exists():
        if unsafe:
            raise ModelError(
                f"{path}: carries pickled weights ({', '.join(unsafe)}), which can execute code and are refused; "
                "convert them to weights.safetensors"
            )
        raise ModelError(f"{path}: weights.safetensors is missing; re-create or re-train the bundle")
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{meta_path}: is missing; re-create or re-train the bundle") from None
    except ValueError as exc:
        raise ModelError(f"{meta_path}: is not valid JSON ({exc}); re-create the bundle") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{meta_path}: is not a {FORMAT} file; re-create the bundle")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: is not a valid safetensors file ({exc}); re-create the bundle") from None
    try:
        classes = tuple(str(c) for c in meta["classes"])
        bundle = ModelBundle(
            arch=str(meta["arch"]),
            params=dict(meta["params"]),
            classes=classes,
            halo=int(meta["halo"]),
            normalization=Normalization(**meta.get("normalization", {})),
            state=state,
            provenance=dict(meta.get("provenance", {})),
            path=path,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{meta_path}: is malformed ({exc}); re-create the bundle") from None
    if int(bundle.params.get("classes", len(classes))) != len(classes):
        raise ModelError(f"{meta_path}: lists {len(classes)} classes but the architecture has {bundle.params.get('classes')}")
    bundle.build()  # validates weights against the architecture now, not on a worker
    return bundle
