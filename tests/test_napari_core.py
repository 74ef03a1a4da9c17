"""The napari plugin's Qt-free parts on the bundled cement scan: annotations store, reader, slab preview.

The preview of a slice is checked against ``pipeline.segment`` of the whole scan on that slice:
equal labels and probabilities in exact mode (float bit-identical to the segment's own blocks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.compute.executors import SerialExecutor
from pipeline.core.errors import InputError, StudiosError
from pipeline.core.tiling import plan_blocks
from pipeline.demo import bundled_scan
from pipeline.ingest.run import ingest
from pipeline.io.bundle import load_bundle
from pipeline.io.store import open_image
from pipeline.napari.preview import assemble, predict_block, preview_slice, slice_blocks
from pipeline.napari.reader import get_reader, read_image
from pipeline.napari.store import annotations_path, open_annotations
from pipeline.segment.predict import quantize
from pipeline.segment.run import segment
from pipeline.train.loop import train


@pytest.fixture(scope="module")
def cement(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Cement scan (64^3 chunks), painted annotations, a model trained on them, an exact segmentation."""
    d = tmp_path_factory.mktemp("napari_core")
    scan = d / "cement.zarr"
    ingest(bundled_scan(), scan, chunks=(64, 64, 64))
    store = open_annotations(scan, classes=("void", "cement"))
    from PIL import Image

    for z in (24, 64, 104):
        plane = np.asarray(Image.open(Path(bundled_scan()).parent / f"cement_scribbles_z{z:03d}.png"))
        store.array[z] = plane
    train(scan, store.path, d / "model", classes=store.classes, epochs=1, steps_per_epoch=8, seed=0, threads=2)
    segment(scan, d / "model", d / "seg.zarr", block=64, executor=SerialExecutor(), exact=True,
            probabilities=True, qc=False)
    return {"dir": d, "scan": scan, "annotations": store.path, "model": d / "model", "seg": d / "seg.zarr"}


def test_store_writes_only_touched_chunks_and_keeps_classes(tmp_path: Path) -> None:
    scan = tmp_path / "s.zarr"
    ingest(bundled_scan(), scan, chunks=(64, 64, 64))
    store = open_annotations(scan, classes=("void", "cement"), colors=("#000080", "#ffa500"))
    assert store.path == annotations_path(scan) == tmp_path / "s.annotations.zarr"
    assert store.stored_chunks() == []
    store.array[70, 10:12, 100:103] = 2  # one chunk: (1, 0, 1)
    store.array[3:5, 90, 20] = 1  # a stroke on a y-slice: chunk (0, 1, 0)
    assert store.stored_chunks() == ["c/0/1/0", "c/1/0/1"]
    again = open_annotations(scan)
    assert again.classes == ("void", "cement") and again.colors == ("#000080", "#ffa500")
    assert int(np.asarray(again.array[70, 11, 101])) == 2 and int(np.asarray(again.array[4, 90, 20])) == 1
    renamed = again.with_classes(("pore", "paste", "sand"), ("#000080", "#ffa500", "#00ff00"))
    assert open_annotations(scan).classes == ("pore", "paste", "sand") == renamed.classes


def test_store_errors_name_the_file(tmp_path: Path) -> None:
    scan = tmp_path / "s.zarr"
    ingest(bundled_scan(), scan, chunks=(64, 64, 64))
    with pytest.raises(StudiosError, match="distinct"):
        open_annotations(scan, classes=("a", "a"))
    other = zarr.create_group(str(tmp_path / "s.annotations.zarr"), zarr_format=3)
    other.create_array("0", shape=(4, 4, 4), dtype="uint8")
    with pytest.raises(InputError, match=r"s\.annotations\.zarr: annotations have shape"):
        open_annotations(scan)
    assert tuple(zarr.open_group(str(tmp_path / "s.annotations.zarr"))["0"].shape) == (4, 4, 4)  # untouched
    with pytest.raises(InputError, match="does not exist"):
        open_annotations(tmp_path / "missing.zarr")


def test_studios_train_reads_the_annotations_store(cement: dict[str, Path], tmp_path: Path) -> None:
    from pipeline.cli.main import main

    rc = main(["train", str(cement["scan"]), str(cement["annotations"]), str(tmp_path / "m"), "--epochs", "1",
               "--steps-per-epoch", "2", "--classes", "void", "cement", "--threads", "1"])
    assert rc == 0
    bundle = load_bundle(tmp_path / "m")
    assert bundle.classes == ("void", "cement")
    assert bundle.provenance["annotations"]["counts"] == [665 + 797 + 649, 1422 + 873 + 1655]


def test_reader_is_lazy_and_keeps_class_names(cement: dict[str, Path], tmp_path: Path) -> None:
    import dask.array as da

    assert get_reader(str(tmp_path)) is None
    assert get_reader(str(bundled_scan())) is None
    reader = get_reader(str(cement["scan"]))
    assert reader is not None
    data, kwargs, kind = reader(str(cement["scan"]))[0]
    assert kind == "image" and kwargs["multiscale"] is True
    assert all(isinstance(level, da.Array) for level in data)
    assert data[0].shape == (128, 128, 128) and data[1].shape == (64, 64, 64)
    lo, hi = kwargs["contrast_limits"]
    assert lo < hi
    seg, skw, skind = read_image(cement["seg"])
    assert skind == "labels" and skw["features"]["class"] == ["unlabelled", "void", "cement"]
    assert skw["colormap"][1] != skw["colormap"][2] and skw["colormap"][0] == "transparent"
    ann, akw, akind = read_image(cement["annotations"])
    assert akind == "labels" and isinstance(ann, zarr.Array) and ann.shape == (128, 128, 128)


def test_slice_blocks_tile_the_slice_nearest_first() -> None:
    blocks = slice_blocks((50, 300, 200), 1, 7, 9, tile=128, focus=(0, 0))
    assert [b.write.shape for b in blocks][:1] == [(50, 1, 128)]
    covered = np.zeros((50, 200), int)
    for b in blocks:
        assert b.write.offset[1] == 7 and b.read.shape == tuple(s + 18 for s in b.write.shape)
        covered[b.write.offset[0]:b.write.end[0], b.write.offset[2]:b.write.end[2]] += 1
    assert (covered == 1).all()
    with pytest.raises(StudiosError, match="outside the scan"):
        slice_blocks((50, 300, 200), 1, 300, 9)


@pytest.mark.parametrize("axis,index", [(0, 64), (1, 40), (2, 127)])
def test_preview_equals_blockwise_segmentation_exactly(cement: dict[str, Path], axis: int, index: int) -> None:
    bundle = load_bundle(cement["model"])
    model = bundle.build().eval()
    image = open_image(cement["scan"])
    offset, scale = bundle.normalization.affine(image.stats)
    pv = assemble(preview_slice(model, image.array, axis, index, offset=offset, scale=scale, exact=True, tile=48),
                  image.shape, axis, index, 2)
    where: list[object] = [slice(None)] * 3
    where[axis] = index
    seg = zarr.open_group(str(cement["seg"]), mode="r")
    labels = np.asarray(seg["0"][tuple(where)])
    probs = np.asarray(seg["probabilities/0"][(slice(None), *where)])
    assert labels.min() >= 1
    assert np.array_equal(pv.labels, labels)
    assert np.array_equal(quantize(pv.probs), probs)
    # float probabilities: bit-identical to the segmentation's own 64^3 blocks on this slice
    # (checked on one slice: each 64^3 block costs seconds in exact mode)
    for block in plan_blocks(image.shape, (64, 64, 64), model.halo):
        if axis != 1 or not block.write.offset[axis] <= index < block.write.end[axis]:
            continue
        ref = predict_block(model, image.array, block, offset=offset, scale=scale, exact=True).probs
        sel = [slice(None)] * 3
        sel[axis] = slice(index - block.write.offset[axis], index - block.write.offset[axis] + 1)
        a, b = (d for d in range(3) if d != axis)
        mine = pv.probs[:, block.write.offset[a]:block.write.end[a], block.write.offset[b]:block.write.end[b]]
        assert np.array_equal(np.squeeze(ref[(slice(None), *sel)], axis=axis + 1), mine)
    assert np.allclose(pv.uncertainty, 1.0 - np.abs(pv.probs[0] - pv.probs[1]), atol=1e-6)


def test_preview_default_mode_labels_equal_except_float_ties(cement: dict[str, Path]) -> None:
    bundle = load_bundle(cement["model"])
    model = bundle.build().eval()
    image = open_image(cement["scan"])
    offset, scale = bundle.normalization.affine(image.stats)
    pv = assemble(preview_slice(model, image.array, 0, 30, offset=offset, scale=scale), image.shape, 0, 30, 2)
    labels = np.asarray(zarr.open_group(str(cement["seg"]), mode="r")["0"][30])
    margin = np.abs(pv.probs[0] - pv.probs[1])
    assert np.array_equal(pv.labels[margin > 1e-5], labels[margin > 1e-5])


def test_chunk_cache_matches_numpy_and_flushes_only_touched_chunks(tmp_path: Path) -> None:
    from pipeline.napari.cache import ChunkCache

    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(40, 50, 60), chunks=(16, 16, 16), dtype="uint8",
                          fill_value=0, zarr_format=3)
    ref = np.zeros(z.shape, np.uint8)
    cache = ChunkCache(z)
    rng = np.random.default_rng(0)
    for _ in range(50):  # brush dabs: fancy reads and writes
        pts = tuple(rng.integers(0, 20, 20) for _ in z.shape)  # dabs inside chunks (0..1)^3
        vals = rng.integers(1, 5, 20).astype(np.uint8)
        cache[pts] = vals
        ref[pts] = vals
        assert np.array_equal(cache[pts], ref[pts])
    cache[3] = 7
    ref[3] = 7
    cache[5:9, 2, 10:40] = 2
    ref[5:9, 2, 10:40] = 2
    for key in [(3,), (slice(None), 7), (slice(None), slice(None), 59), (slice(2, 30), 10, slice(5, 55)),
                (Ellipsis, 4), (-1,)]:
        assert np.array_equal(cache[key], ref[key]), key
    assert not np.asarray(z[...]).any()  # nothing written before the flush
    touched = cache.dirty
    assert cache.flush() == touched and cache.dirty == 0
    assert np.array_equal(np.asarray(z[...]), ref)
    stored = [p for p in (tmp_path / "a.zarr" / "c").rglob("*") if p.is_file()]
    assert len(stored) == touched < 3 * 4 * 4  # of 48 chunks
