"""Ingest: every supported format and dtype, statistics, OME-Zarr metadata, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from conftest import CEMENT

from pipeline.core.errors import InputError, OutputExistsError
from pipeline.core.normalize import compute_stats
from pipeline.ingest.run import ingest
from pipeline.io.store import open_image

SHAPE = (9, 20, 23)


def _volume(dtype: str, rng: np.random.Generator) -> np.ndarray:
    if dtype == "float32":
        return rng.normal(0.3, 0.1, SHAPE).astype(np.float32)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -3000), min(info.max, 60000), SHAPE, endpoint=True).astype(dtype)


def _read(path: Path) -> np.ndarray:
    return np.asarray(open_image(path, kind="scan").array[...])


def _tiff_stack(folder: Path, volume: np.ndarray) -> Path:
    folder.mkdir()
    for z in range(volume.shape[0]):
        tifffile.imwrite(folder / f"slice_{z}.tif", volume[z])  # natural order: slice_10 after slice_9
    return folder


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_all_formats_and_dtypes_roundtrip(tmp_path, rng, dtype):
    vol = _volume(dtype, rng)
    sources = {
        "stack": _tiff_stack(tmp_path / "stack", vol),
        "multipage": tmp_path / "vol.tif",
        "npy": tmp_path / "vol.npy",
        "h5": f"{tmp_path / 'vol.h5'}:/exchange/data",
        "zarr": tmp_path / "in.zarr",
    }
    tifffile.imwrite(sources["multipage"], vol)
    np.save(sources["npy"], vol)
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f.create_dataset("exchange/data", data=vol, chunks=(2, 10, 10))
    zarr.create_array(str(sources["zarr"]), data=vol, chunks=(4, 8, 8))
    for name, src in sources.items():
        out = tmp_path / f"{name}.zarr"
        result = ingest(src, out, chunks=(4, 8, 8), workers=2)
        got = _read(out)
        assert got.dtype == np.dtype(dtype), name
        np.testing.assert_array_equal(got, vol, err_msg=name)
        assert result.stats.count == vol.size
        assert result.stats.min == pytest.approx(float(vol.min()))
        assert result.stats.max == pytest.approx(float(vol.max()))
        assert result.stats.mean == pytest.approx(float(vol.astype(np.float64).mean()), rel=1e-9)
        assert result.stats.std == pytest.approx(float(vol.astype(np.float64).std()), rel=1e-6)


@pytest.mark.parametrize("order", ["<", ">"])
def test_raw_both_byte_orders(tmp_path, rng, order):
    vol = _volume("uint16", rng)
    raw = tmp_path / "vol.raw"
    vol.astype(np.dtype("uint16").newbyteorder(order)).tofile(raw)
    out = tmp_path / "raw.zarr"
    ingest(raw, out, raw_shape=SHAPE, raw_dtype="uint16", byte_order=order)
    np.testing.assert_array_equal(_read(out), vol)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_tiff_slices_in_every_layout_read_alike(tmp_path, rng, dtype):
    """Uncompressed slices are read straight from their pixel offset; the others through
    tifffile's decoder: big-endian, striped, compressed and predicted slices in one folder."""
    vol = _volume(dtype, rng)
    folder = tmp_path / "mixed"
    folder.mkdir()
    layouts = [{}, {"byteorder": ">"}, {"rowsperstrip": 3}, {"compression": "zlib"},
               {"compression": "zlib", "predictor": dtype != "float32"},  # float predictor: imagecodecs
               {"byteorder": ">", "compression": "zlib"}]
    for z in range(vol.shape[0]):
        tifffile.imwrite(folder / f"slice_{z}.tif", vol[z], **layouts[z % len(layouts)])
    from pipeline.io.sources import open_source

    src = open_source(folder)
    assert [r is not None for r in src._raw[: len(layouts)]] == [True, True, True, False, False, False]
    np.testing.assert_array_equal(src.read(0, vol.shape[0]), vol)
    out = tmp_path / "mixed.zarr"
    ingest(folder, out, chunks=(4, 8, 8))
    np.testing.assert_array_equal(_read(out), vol)


def test_slice_shortened_after_the_folder_was_opened(tmp_path, rng):
    from pipeline.io.sources import open_source

    folder = _tiff_stack(tmp_path / "s", _volume("uint16", rng))
    src = open_source(folder)
    victim = folder / "slice_6.tif"
    victim.write_bytes(victim.read_bytes()[:400])
    _bad(tmp_path, src, "slice_6.tif.*could not be read.*replace this slice")


def test_natural_sort_of_slices(tmp_path, rng):
    vol = np.arange(12, dtype=np.uint8)[:, None, None] * np.ones((12, 4, 5), np.uint8)
    _tiff_stack(tmp_path / "s", vol)
    ingest(tmp_path / "s", tmp_path / "o.zarr")
    assert list(_read(tmp_path / "o.zarr")[:, 0, 0]) == list(range(12))


def test_integer_percentiles_are_exact(tmp_path, rng):
    vol = _volume("uint16", rng)
    np.save(tmp_path / "v.npy", vol)
    r = ingest(tmp_path / "v.npy", tmp_path / "o.zarr")
    for q in (0.5, 50.0, 99.5):
        assert r.stats.percentile(q) == np.percentile(vol, q, method="lower")
    assert sum(r.stats.histogram) == vol.size
    assert compute_stats(vol).percentiles == r.stats.percentiles


def test_ome_zarr_metadata_and_pyramid(tmp_path):
    out = tmp_path / "cement.zarr"
    ingest(CEMENT, out, voxel_size=(0.65, 0.65, 0.65))
    group = zarr.open_group(str(out), mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in ms["axes"])
    paths = [d["path"] for d in ms["datasets"]]
    assert paths[0] == "0" and len(paths) >= 2
    for level, d in enumerate(ms["datasets"]):
        scale = d["coordinateTransformations"][0]["scale"]
        assert scale == pytest.approx([0.65 * 2**level] * 3)
        assert group[d["path"]].shape == tuple(-(-128 // 2**level) for _ in range(3))
    meta = json.loads((out / "0" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and any("blosc" in c["name"] for c in meta["codecs"])
    studios = group.attrs["studios"]
    assert studios["complete"] is True and studios["kind"] == "scan"
    assert studios["provenance"]["source"].endswith("cement_128x128x128.tif")
    assert studios["provenance"]["dtype"] == "uint8"
    assert set(studios["stats"]) >= {"min", "max", "mean", "std", "percentiles", "histogram"}


# ---------------------------------------------------------------- bad input


def _bad(tmp_path: Path, source, match: str, **kwargs) -> None:
    out = tmp_path / "out.zarr"
    with pytest.raises(InputError, match=match) as info:
        ingest(source, out, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.zarr.partial-*"))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _bad(tmp_path, tmp_path / "empty", "empty folder")


def test_missing_file(tmp_path):
    _bad(tmp_path, tmp_path / "nope.tif", "does not exist")


def test_truncated_tiff_in_stack(tmp_path, rng):
    folder = _tiff_stack(tmp_path / "s", _volume("uint16", rng))
    victim = folder / "slice_4.tif"
    victim.write_bytes(victim.read_bytes()[:300])
    _bad(tmp_path, folder, "slice_4.tif.*truncated")


def test_mixed_slice_shapes_and_dtypes(tmp_path, rng):
    folder = _tiff_stack(tmp_path / "s", _volume("uint8", rng))
    tifffile.imwrite(folder / "slice_3.tif", np.zeros((20, 22), np.uint8))
    _bad(tmp_path, folder, "slice_3.tif.*share shape")
    tifffile.imwrite(folder / "slice_3.tif", np.zeros((20, 23), np.uint16))
    _bad(tmp_path, folder, "slice_3.tif.*share shape and type")


def test_non_image_among_slices(tmp_path, rng):
    folder = _tiff_stack(tmp_path / "s", _volume("uint8", rng))
    (folder / "slice_5.tif").write_text("this is a log file, not an image\n")
    _bad(tmp_path, folder, "slice_5.tif.*not a readable TIFF")


def test_raw_size_mismatch(tmp_path):
    raw = tmp_path / "v.raw"
    np.zeros(100, np.uint16).tofile(raw)
    _bad(tmp_path, raw, "holds 200 bytes.*needs", raw_shape=(2, 5, 11), raw_dtype="uint16")
    _bad(tmp_path, raw, "needs --shape", raw_dtype="uint16")


def test_hdf5_dataset_missing(tmp_path):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("entry/data", data=np.zeros((2, 3, 4), np.uint8))
    _bad(tmp_path, f"{tmp_path / 'v.h5'}:/exchange/data", "no dataset '/exchange/data'.*entry")


def test_nan_inf_policy(tmp_path, rng):
    vol = _volume("float32", rng)
    vol[3, 4, 5] = np.nan
    vol[6, 1, 1] = np.inf
    np.save(tmp_path / "v.npy", vol)
    _bad(tmp_path, tmp_path / "v.npy", "2 NaN/Inf voxels.*--nonfinite zero")
    r = ingest(tmp_path / "v.npy", tmp_path / "ok.zarr", nonfinite="zero")
    assert r.nonfinite == 2
    got = _read(tmp_path / "ok.zarr")
    assert got[3, 4, 5] == 0 and got[6, 1, 1] == 0 and np.isfinite(got).all()
    assert open_image(tmp_path / "ok.zarr").attrs["provenance"]["nonfinite_replaced"] == 2


def test_2d_image_as_volume(tmp_path):
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((30, 40), np.uint8))
    _bad(tmp_path, tmp_path / "one.tif", "2D image")


def test_unsupported_dtype(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((3, 4, 5), np.int64))
    _bad(tmp_path, tmp_path / "v.npy", "int64 is not supported")


def test_existing_output_untouched_without_overwrite(tmp_path, rng):
    np.save(tmp_path / "a.npy", _volume("uint8", rng))
    np.save(tmp_path / "b.npy", _volume("uint8", rng))
    out = tmp_path / "o.zarr"
    ingest(tmp_path / "a.npy", out)
    before = _read(out).copy()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        ingest(tmp_path / "b.npy", out)
    np.testing.assert_array_equal(_read(out), before)
    ingest(tmp_path / "b.npy", out, overwrite=True)
    np.testing.assert_array_equal(_read(out), np.load(tmp_path / "b.npy"))


def test_failed_overwrite_keeps_old_output(tmp_path, rng):
    np.save(tmp_path / "a.npy", _volume("uint8", rng))
    out = tmp_path / "o.zarr"
    ingest(tmp_path / "a.npy", out)
    before = _read(out).copy()
    bad = _volume("float32", rng)
    bad[0, 0, 0] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(InputError):
        ingest(tmp_path / "bad.npy", out, overwrite=True)
    np.testing.assert_array_equal(_read(out), before)


def test_output_inside_input(tmp_path, rng):
    folder = _tiff_stack(tmp_path / "s", _volume("uint8", rng))
    with pytest.raises(InputError, match="inside the input"):
        ingest(folder, folder / "out.zarr")


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "float32"])
def test_stats_in_pieces_match_numpy(monkeypatch, rng, dtype):
    """Slabs are accumulated in small pieces (bounded temporaries); the figures do not change."""
    import pipeline.core.normalize as normalize

    monkeypatch.setattr(normalize, "_PIECE", 1000)
    if dtype == "float32":
        vol = rng.normal(3.0, 2.0, size=(5, 31, 29)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        vol = rng.integers(info.min, info.max, size=(5, 31, 29), endpoint=True).astype(dtype)
    s = compute_stats(vol)
    assert s.count == vol.size
    assert (s.min, s.max) == (float(vol.min()), float(vol.max()))
    assert s.mean == pytest.approx(float(vol.astype(np.float64).mean()), rel=1e-12)
    assert s.std == pytest.approx(float(vol.astype(np.float64).std()), rel=1e-9)
    if dtype == "float32":  # float histograms are scaled up from a strided sample
        assert sum(s.histogram) == pytest.approx(vol.size, rel=0.01)
    else:
        assert sum(s.histogram) == vol.size


@pytest.mark.parametrize(("method", "workers"), [("mean", 1), ("mean", 3), ("nearest", 2)])
def test_tiled_pyramid_equals_downsampling_the_whole_level(tmp_path, rng, method, workers):
    """Levels are built in tiles of 2 chunks per axis (odd shapes, several tiles per axis)."""
    from pipeline.io.store import build_pyramid, create_array, downsample

    vol = rng.integers(0, 60000, size=(45, 37, 70)).astype(np.uint16)
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="w")
    create_array(group, "0", shape=vol.shape, dtype=vol.dtype, chunks=(4, 6, 8))[...] = vol
    levels = build_pyramid(group, method=method, min_size=4, max_levels=4, workers=workers)
    assert levels == 4
    expected = vol
    for level in range(1, levels):
        expected = downsample(expected, method=method)
        assert np.array_equal(np.asarray(group[str(level)][...]), expected), level


@pytest.mark.parametrize(("dtype", "chunks", "workers"), [("uint16", (16, 32, 32), 2), ("float32", (16, 32, 32), 3),
                                                         ("uint8", (15, 32, 32), 2)])
def test_ingest_pyramid_from_slabs_in_memory_equals_the_whole_volume(tmp_path, rng, dtype, chunks, workers):
    """Level 1 from the slabs in memory (5 slabs: the last row is one half; odd y and x), or from
    level 0 when the slab height is odd: either way the whole-volume down-sampling, bit for bit."""
    import os

    from pipeline.ingest.run import ingest_array
    from pipeline.io.store import downsample

    vol = (rng.random((72, 66, 70)) * 250).astype(dtype)
    res = ingest_array(vol, tmp_path / "s.zarr", chunks=chunks, workers=workers)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert res.levels == 2 and np.array_equal(np.asarray(group["0"][...]), vol)
    assert np.array_equal(np.asarray(group["1"][...]), downsample(vol, method="mean"))
    rows = sorted(os.listdir(tmp_path / "s.zarr" / "1" / "c"))
    assert rows == [str(i) for i in range(-(-36 // chunks[0]))]  # every chunk row of level 1 written


def test_mean_downsample_is_the_mean_of_the_voxels_present(rng):
    from pipeline.io.store import downsample

    vol = rng.integers(0, 65535, size=(5, 4, 7)).astype(np.uint16)
    out = downsample(vol, method="mean")
    assert out.shape == (3, 2, 4)
    for z, y, x in np.ndindex(out.shape):
        cell = vol[2 * z : 2 * z + 2, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2].astype(np.float64)
        assert out[z, y, x] == np.rint(cell.mean()), (z, y, x)
