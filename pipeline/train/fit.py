"""The optimisation loop: steps, validation, learning-rate halving, early stopping, final phase.

Two phases when validation voxels exist:

1. *validated*: optimiser steps on the training strokes; after every epoch the held-out strokes
   are scored (:func:`selection_score`: mean IoU, then loss); the learning rate halves after
   ``PLATEAU`` epochs without improvement, training stops after ``patience`` such epochs (or at
   ``VALIDATED_SHARE`` of a time budget, or after ``epochs`` epochs); the best weights are kept;
2. *all labels*: the held-out strokes go back to training and training continues from the best
   weights at their learning rate for ``FINAL_SHARE`` of the steps that led to them (at least one
   epoch), within the time budget, so no label is wasted. The validation figures reported are
   those of the best epoch of phase 1 (an estimate for the final model, which saw more labels).

Without validation voxels there is one phase on all labels, keeping the weights of the lowest
epoch training loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core import interrupt
from pipeline.core.normalize import apply_affine
from pipeline.core.progress import Reporter
from pipeline.models import StridefreeModel
from pipeline.train.optim import Adam
from pipeline.train.sampling import Plane, Sampler, apply_symmetry, intensity, patch, symmetry
from pipeline.train.unlabelled import THRESHOLD, WEIGHT, UnlabelledPool, unlabelled_loss
from pipeline.train.validation import val_scores

PLATEAU = 3  # epochs without improvement before the learning rate halves
MIN_LR = 1e-5
SAVE_RESERVE_S = 1.0  # seconds kept free at the end of a time budget to write the bundle
VALIDATED_SHARE = 0.8  # of a time budget, at most, for the validated phase
FINAL_SHARE = 0.25  # steps on all labels after the validated phase, as a share of the best epoch's steps


class Fit:
    """Optimiser steps on labelled (and unlabelled) windows, validation, best weights."""

    def __init__(self, model: StridefreeModel, planes: list[Plane], sampler: Sampler, *, offset: float,
                 scale: float, device: torch.device, lr: float, batch_size: int, rng: np.random.Generator,
                 classes: int, unlabelled: str = "none", pool: UnlabelledPool | None = None,
                 warmup: int = 0, pseudo_weight: float = 0.0) -> None:
        self.model, self.planes, self.sampler = model, planes, sampler
        self.offset, self.scale, self.device, self.rng = offset, scale, device, rng
        self.batch_size, self.k, self.lr = batch_size, classes, lr
        self.unlabelled, self.pool, self.warmup = unlabelled, pool, warmup
        self.pseudo_weight = float(pseudo_weight) if any(pl.pseudo is not None for pl in planes) else 0.0
        self.opt = Adam(model.parameters(), lr=lr)
        self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.epochs = self.steps = self.final_steps = 0
        self.has_val = any(pl.val_windows for pl in planes)
        self.confident = 0.0
        self.class_counts = np.zeros(classes)  # supervised voxels per class (loss weight), all steps

    def step(self) -> tuple[float, int, int]:
        """One optimiser step; returns (labelled loss, correct, supervised voxels)."""
        self.model.train()
        h, s = self.model.halo, self.sampler.size
        groups: dict[tuple[int, ...], list[tuple[np.ndarray[Any, Any], ...]]] = {}
        for _ in range(self.batch_size):
            i, u0, v0 = self.sampler.window()
            pl = self.planes[i]
            xr, yr = patch(pl, u0, v0, s, s, h, pl.train)
            sym = symmetry(self.rng)
            xg, y = apply_symmetry(xr, sym), np.ascontiguousarray(apply_symmetry(yr, sym))
            if self.pseudo_weight and pl.pseudo is not None:
                yp = np.ascontiguousarray(apply_symmetry(patch(pl, u0, v0, s, s, h, pl.pseudo)[1], sym))
            else:
                yp = np.full_like(y, -1)
            groups.setdefault(xg.shape, []).append((xg, y, yp))
        self.opt.zero_grad(set_to_none=True)
        n = sum(int((g[1] >= 0).sum()) for members in groups.values() for g in members)
        n_p = sum(int((g[2] >= 0).sum()) for members in groups.values() for g in members)
        w_p = self.pseudo_weight / max(n_p, 1) * max(n, 1)  # pseudo-label weight per voxel, strokes = 1
        for members in groups.values():
            for _, y, yp in members:
                self.class_counts += np.bincount(y[y >= 0].ravel(), minlength=self.k)[: self.k]
                if n_p:
                    self.class_counts += w_p * np.bincount(yp[yp >= 0].ravel(), minlength=self.k)[: self.k]
        total, correct = 0.0, 0
        for group in groups.values():
            jittered = [intensity(g[0], self.offset, self.scale, self.rng) for g in group]
            xt = torch.from_numpy(np.stack(jittered)[:, None])
            yt = torch.from_numpy(np.stack([g[1] for g in group])).to(self.device)
            logits = self.model(xt.to(self.device))
            loss = F.cross_entropy(logits, yt, ignore_index=-1, reduction="sum") / max(n, 1)
            if n_p:
                pt = torch.from_numpy(np.stack([g[2] for g in group])).to(self.device)
                loss = loss + self.pseudo_weight * F.cross_entropy(logits, pt, ignore_index=-1,
                                                                   reduction="sum") / n_p
            if self.unlabelled == "windows" and self.steps >= self.warmup:
                clean = np.stack([apply_affine(np.ascontiguousarray(g[0]), self.offset, self.scale)
                                  for g in group])
                with torch.no_grad():
                    self.model.eval()
                    conf, pseudo = F.softmax(self.model(torch.from_numpy(clean[:, None]).to(self.device)), 1).max(1)
                    self.model.train()
                    pseudo[(conf < THRESHOLD) | (yt >= 0)] = -1
                    self.confident = float((pseudo >= 0).float().mean())
                loss = loss + WEIGHT * F.cross_entropy(logits, pseudo, ignore_index=-1, reduction="sum") / (
                    pseudo.numel() * len(groups))
            loss.backward()
            total += float(loss.detach())
            with torch.no_grad():
                correct += int(((logits.argmax(1) == yt) & (yt >= 0)).sum())
        if self.unlabelled in ("pseudo", "entropy") and self.pool is not None and self.steps >= self.warmup:
            u_loss, self.confident = unlabelled_loss(self.unlabelled, self.model, self.pool, self.batch_size,
                                                     offset=self.offset, scale=self.scale, device=self.device,
                                                     rng=self.rng)
            u_loss.backward()
        self.opt.step()
        self.steps += 1
        return total, correct, n

    @torch.no_grad()
    def validate(self) -> tuple[float, np.ndarray[Any, Any]]:
        """(mean loss, K x K confusion matrix truth x prediction) on the held-out strokes."""
        self.model.eval()
        h = self.model.halo
        confusion = np.zeros((self.k, self.k), dtype=np.int64)
        loss, n = 0.0, 0
        for pl in self.planes:
            for u0, v0, su, sv in pl.val_windows:
                x, y = patch(pl, u0, v0, su, sv, h, pl.val)
                xt = torch.from_numpy(apply_affine(np.ascontiguousarray(x), self.offset, self.scale)[None, None])
                yt = torch.from_numpy(np.ascontiguousarray(y)[None]).to(self.device)
                logits = self.model(xt.to(self.device))
                loss += float(F.cross_entropy(logits, yt, ignore_index=-1, reduction="sum"))
                mask = yt >= 0
                n += int(mask.sum())
                pred = logits.argmax(1)[mask].cpu().numpy()
                truth = yt[mask].cpu().numpy()
                confusion += np.bincount(truth * self.k + pred, minlength=self.k * self.k).reshape(self.k, self.k)
        return loss / max(n, 1), confusion

    def run(self, *, start: float, deadline: float, epochs: int | None, steps_per_epoch: int, patience: int,
            reporter: Reporter, names: Sequence[str], on_all_labels: Any = None) -> dict[str, Any]:
        """Phase 1 until ``epochs``, the deadline share or early stopping; then phase 2 on all labels.

        ``deadline``: ``time.perf_counter()`` seconds (the last validation is finished before it).
        ``on_all_labels``: called with no argument before phase 2; returns the new :class:`Sampler`.
        Returns the metrics of the best epoch and the training summary.
        """
        by_time = epochs is None
        budget = deadline - start
        reporter.start("train", int(math.ceil(budget)) if by_time else epochs * steps_per_epoch)  # type: ignore[operator]
        self._reported, self._reserve = 0, SAVE_RESERVE_S
        validated_end = start + VALIDATED_SHARE * budget if self.has_val and by_time else deadline
        curve: list[float] = []
        best: dict[str, Any] = {}
        best_score, since_best, stopped, best_lr, best_steps = (-math.inf, -math.inf), 0, "epochs", self.opt.lr, 0
        try:
            while epochs is None or self.epochs < epochs:
                run_loss, run_correct, run_n, run_steps, out_of_time = 0.0, 0, 0, 0, False
                for _ in range(steps_per_epoch):
                    interrupt.check(f"training stopped in epoch {self.epochs + 1}; no model was written, "
                                    "run the same command to train again")
                    loss, correct, n = self.step()
                    run_steps += 1
                    run_loss, run_correct, run_n = run_loss + loss, run_correct + correct, run_n + n
                    out_of_time = self._advance(reporter, start, deadline, by_time, n, validated_end,
                                                {"loss": loss, "acc": correct / max(n, 1)})
                    if out_of_time:
                        break
                self.epochs += 1
                curve.append(run_loss / run_steps)
                entry = {"epoch": self.epochs, "train_loss": curve[-1], "train_accuracy": run_correct / max(run_n, 1)}
                t_val = time.perf_counter()
                if self.has_val:
                    vloss, confusion = self.validate()
                    entry.update(val_scores(confusion, names), val_loss=vloss)
                    _metrics(reporter, {"val acc": entry["val_accuracy"], "val mIoU": entry["val_mean_iou"]})
                    score = selection_score(entry["val_mean_iou"], vloss)
                else:
                    score = selection_score(0.0, curve[-1])
                self._reserve = time.perf_counter() - t_val + SAVE_RESERVE_S
                if better(score, best_score) or not best:
                    best_score, since_best, best = score, 0, entry
                    best_lr, best_steps = self.opt.lr, self.steps
                    self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                else:
                    since_best += 1
                    if since_best % PLATEAU == 0:
                        self.opt.lr = max(MIN_LR, self.opt.lr * 0.5)
                if out_of_time or time.perf_counter() + self._reserve >= validated_end:
                    stopped = "time"
                    break
                if self.has_val and since_best >= patience:
                    stopped = "early-stopping"
                    break
            if self.has_val and on_all_labels is not None:
                self._final_phase(on_all_labels, best_lr, best_steps, steps_per_epoch, start, deadline, by_time,
                                  reporter)
        finally:
            reporter.finish()
        metrics = {k: v for k, v in best.items() if k.startswith("val_")}
        metrics.update(
            best_epoch=best.get("epoch", 0), stopped=stopped, epochs=self.epochs, steps=self.steps,
            final_steps=self.final_steps, loss_first=curve[0] if curve else None,
            loss_last=curve[-1] if curve else None, loss_curve=[round(v, 5) for v in curve],
            train_accuracy=best.get("train_accuracy"),
        )
        return metrics

    def _final_phase(self, on_all_labels: Any, lr: float, best_steps: int, steps_per_epoch: int, start: float,
                     deadline: float, by_time: bool, reporter: Reporter) -> None:
        """Continue from the best weights on every label for ``FINAL_SHARE`` of their steps."""
        self.model.load_state_dict(self.best_state)
        self.sampler = on_all_labels()
        self.opt.lr = lr
        want = max(steps_per_epoch, int(math.ceil(FINAL_SHARE * best_steps)))
        for _ in range(want):
            interrupt.check("training stopped in its final phase; no model was written, "
                            "run the same command to train again")
            if by_time and time.perf_counter() + SAVE_RESERVE_S >= deadline:
                break
            loss, correct, n = self.step()
            self.final_steps += 1
            self._advance(reporter, start, deadline, by_time, n, deadline, {"loss": loss, "acc": correct / max(n, 1)})
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _advance(self, reporter: Reporter, start: float, deadline: float, by_time: bool, n: int, end: float,
                 values: Mapping[str, Any]) -> bool:
        """Report one step; True when the time up to ``end`` (less the reserve) is spent."""
        now = time.perf_counter()
        if by_time:
            seconds = min(int(now - start), int(math.ceil(deadline - start)))
            reporter.advance(seconds - self._reported, voxels=n)
            self._reported = seconds
        else:
            reporter.advance(1, voxels=n)
        _metrics(reporter, values)
        return now + self._reserve >= end


def selection_score(mean_iou: float, loss: float) -> tuple[float, float]:
    """What the best epoch maximises: validation mean IoU (to 4 decimals), then minus the loss.

    Mean IoU first, as the result is judged: the cross-entropy of held-out voxels rises once the
    model grows confident on a few boundary voxels while the IoU still improves: on one full
    slice the loss chose epoch 5 (7 when weighted per class), the IoU epoch 11, and the rest of
    the phantom scored 0.932 instead of 0.890-0.911 (docs/accuracy.md). The loss breaks ties, as
    where every held-out stroke voxel is right (scribbles: accuracy 1.000 on 77 voxels) or
    without validation (training loss).
    """
    return round(float(mean_iou), 4), -float(loss)


def better(score: tuple[float, float], best: tuple[float, float]) -> bool:
    """``score`` beats ``best``: a higher mean IoU, or the same and a loss lower by > 0.01 %."""
    return score[0] > best[0] or (score[0] == best[0] and score[1] > best[1] + 1e-4 * abs(best[1]))


def _metrics(reporter: Reporter, values: Mapping[str, Any]) -> None:
    hook = getattr(reporter, "metrics", None)
    if callable(hook):
        hook(dict(values))
