"""Dense pseudo-labels for sparse annotations from a feature teacher (a random forest).

Strokes drawn inside each class (off its boundaries) tell a CNN nothing about where one class
ends and the next begins, and with a few hundred voxels its 28 k weights overfit. A random
forest on fixed, smooth filter features (the 19 Gaussian-derivative features of
:class:`~pipeline.models.filterbank.FilterBankMLP`, ilastik's recipe) extrapolates from the same
strokes to a reasonable boundary. So, when the annotations are sparse:

1. *teacher*: the forest is fitted on the features of the training strokes;
2. it predicts every unlabelled voxel of the labelled planes (the whole in-plane region the
   sampler draws windows from); its class shares there are ``teacher_prior``. (Re-estimating
   the forest's priors by EM, as :mod:`pipeline.train.priors` does for the CNN, was measured
   and lost: forest posteriors are not calibrated, and EM drove the pore prior to 0.009
   against a true 0.02, leaving a few hundred pore pseudo-labels);
3. *pseudo-labels*: each voxel gets the teacher's most probable class; per class, only the
   ``keep`` most confident share of the voxels of that class is kept (a per-class quantile, so
   the rare class keeps its share instead of falling below one global threshold);
4. *student*: the CNN trains on the strokes (weight 1 per voxel's share of the labelled loss)
   plus the pseudo-labels (their loss weighted by ``weight``); validation stays on held-out
   strokes only. Inference is the same stride-free network: blockwise == whole volume.

Measured with ``bench/scribbles.py`` (128^3 phantoms, seeds 11 / 12, scribbles on 3 z-slices,
300 validated + 75 final steps, one thread; docs/accuracy.md): mean IoU 0.850 / 0.837 without
the teacher, 0.902 / 0.898 with all pseudo-labels at weight 1 (the defaults), against 0.895 /
0.856 for the forest itself; weight 3 gave 0.889 (seed 12), keep 0.8 at weight 0.5 gave 0.879
(seed 11).

Cost: the features and the forest's predictions cover the labelled planes' whole in-plane
regions and come out of the training budget; a few seconds for 3 planes of 128^2 on one core,
growing with the plane area (not measured on large scans).

Sparse means: labelled voxels are less than :data:`SPARSE_FRACTION` of the labelled planes'
area (scribbles on a 128^2 slice cover ~1 %, full slices 100 %); ``teacher="auto"`` (the
default) uses the teacher only then.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import ConfigError
from pipeline.core.normalize import apply_affine
from pipeline.models.filterbank import FilterBankMLP
from pipeline.train.annotations import Annotations
from pipeline.train.sampling import Plane, read_region

logger = logging.getLogger(__name__)

MODES = ("auto", "forest", "off")
DEFAULT_MODE = "auto"
SPARSE_FRACTION = 0.5  # labelled share of the labelled planes below which annotations are sparse
KEEP = 1.0  # per class, the most confident share of its pseudo-labelled voxels kept
WEIGHT = 1.0  # weight of the pseudo-label loss against the stroke loss
TREES = 100


def labelled_fraction(ann: Annotations) -> float:
    """Labelled voxels over the area of the labelled planes (1.0 for full slices)."""
    area = 0
    for pl in ann.planes:
        dims = [s for a, s in enumerate(ann.shape) if a != pl.axis]
        area += dims[0] * dims[1]
    return float(ann.total) / max(area, 1)


def use_teacher(mode: str, ann: Annotations) -> bool:
    if mode not in MODES:
        raise ConfigError(f"teacher {mode!r} must be one of {', '.join(MODES)}")
    if mode == "auto":
        return labelled_fraction(ann) < SPARSE_FRACTION
    return mode == "forest"


def plane_features(array: Any, shape: tuple[int, ...], pl: Plane, bank: FilterBankMLP, *, offset: float,
                   scale: float) -> np.ndarray[Any, Any]:
    """(A * B, F) float32 filter features of every voxel of ``pl``'s in-plane region."""
    a, b = pl.train.shape
    region = read_region(array, shape, pl.axis, pl.index, pl.origin, (a, b), bank.halo)
    x = apply_affine(np.ascontiguousarray(region.slab), offset, scale)  # canonical layout; features are
    with torch.inference_mode():  # invariant under axis permutations
        f = bank.features(torch.from_numpy(x)[None, None])[0, :, 0].numpy()
    return np.ascontiguousarray(f.reshape(f.shape[0], -1).T)


def pseudo_labels(array: Any, shape: tuple[int, ...], planes: list[Plane], k: int, *, offset: float,
                  scale: float, seed: int, threads: int, keep: float = KEEP) -> dict[str, Any]:
    """Fit the forest on the training strokes of ``planes`` and set each plane's ``pseudo`` map.

    ``pseudo``: (A, B) int64 class index on kept unlabelled voxels, -1 elsewhere (and on every
    labelled voxel, training or held out). Returns a summary for the metrics.
    """
    from sklearn.ensemble import RandomForestClassifier

    bank = FilterBankMLP(classes=2)
    feats = [plane_features(array, shape, pl, bank, offset=offset, scale=scale) for pl in planes]
    x = np.concatenate([f[(pl.train >= 0).ravel()] for f, pl in zip(feats, planes, strict=True)])
    y = np.concatenate([pl.train[pl.train >= 0] for pl in planes])
    present = np.unique(y)
    if len(present) < 2:
        for pl in planes:
            pl.pseudo = np.full_like(pl.train, -1)
        return {"teacher": "skipped: fewer than 2 classes labelled"}
    forest = RandomForestClassifier(n_estimators=TREES, n_jobs=max(1, threads), random_state=seed)
    forest.fit(x, y)
    unl = [((pl.train < 0) & (pl.val < 0)).ravel() for pl in planes]
    probs = np.zeros((k, sum(int(u.sum()) for u in unl)))
    probs[forest.classes_] = np.concatenate([forest.predict_proba(f[u]) for f, u in zip(feats, unl, strict=True)]).T
    label, conf = probs.argmax(0), probs.max(0)
    prior = np.bincount(label, minlength=k) / max(len(label), 1)
    chosen = np.zeros(label.shape, dtype=bool)
    for c in range(k):
        members = np.flatnonzero(label == c)
        if len(members):
            cut = np.quantile(conf[members], 1.0 - float(keep))
            chosen[members[conf[members] >= cut]] = True
    flat = np.where(chosen, label, -1)
    start = 0
    for pl, u in zip(planes, unl, strict=True):
        n = int(u.sum())
        pseudo = np.full(pl.train.size, -1, np.int64)
        pseudo[u] = flat[start : start + n]
        pl.pseudo = pseudo.reshape(pl.train.shape)
        start += n
    kept = np.bincount(flat[flat >= 0], minlength=k)
    info = {"teacher": "forest", "teacher_prior": [round(float(v), 5) for v in prior],
            "pseudo_voxels": [int(v) for v in kept]}
    logger.info("teacher (random forest on %d stroke voxels): scan priors %s, pseudo-labels per class %s",
                len(y), info["teacher_prior"], info["pseudo_voxels"])
    return info
