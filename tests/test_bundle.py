"""Model bundles: round trip, safety (no pickle), and mismatches."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from pipeline.core.errors import ModelError, OutputExistsError
from pipeline.io.bundle import init_bundle, load_bundle, save_bundle


def test_roundtrip_preserves_weights_and_metadata(tmp_path):
    b = init_bundle(classes=("air", "matrix", "fibre"), seed=4, params={"channels": 8})
    save_bundle(b, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["format"] == "studios-model/1" and meta["halo"] == b.halo
    assert meta["classes"] == ["air", "matrix", "fibre"]
    loaded = load_bundle(tmp_path / "m")
    assert loaded.fingerprint == b.fingerprint
    x = torch.randn(1, 1, 20, 20, 20)
    with torch.inference_mode():
        assert torch.equal(loaded.build()(x), b.build()(x))


def test_seeded_init_is_reproducible_and_seed_matters():
    assert init_bundle(seed=1).fingerprint == init_bundle(seed=1).fingerprint
    assert init_bundle(seed=1).fingerprint != init_bundle(seed=2).fingerprint


def test_no_overwrite_without_flag(tmp_path):
    save_bundle(init_bundle(), tmp_path / "m")
    with pytest.raises(OutputExistsError):
        save_bundle(init_bundle(seed=3), tmp_path / "m")


class Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickle_payload_is_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "evil"
    d.mkdir()
    (d / "model.json").write_text(json.dumps(init_bundle().to_json()))
    with open(d / "weights.pt", "wb") as fh:
        pickle.dump({"stem.weight": Evil()}, fh)
    with pytest.raises(ModelError, match="pickled weights.*refused"):
        load_bundle(d)
    assert not (tmp_path / "PWNED").exists()


def test_pickle_disguised_as_safetensors_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "evil"
    d.mkdir()
    (d / "model.json").write_text(json.dumps(init_bundle().to_json()))
    with open(d / "weights.safetensors", "wb") as fh:
        pickle.dump(Evil(), fh)
    with pytest.raises(ModelError, match="not a valid safetensors"):
        load_bundle(d)
    assert not (tmp_path / "PWNED").exists()


def test_missing_and_mismatched_weights(tmp_path):
    save_bundle(init_bundle(params={"channels": 8}), tmp_path / "a")
    save_bundle(init_bundle(params={"channels": 4}), tmp_path / "b")
    (tmp_path / "a" / "weights.safetensors").replace(tmp_path / "keep")
    with pytest.raises(ModelError, match="weights.safetensors is missing"):
        load_bundle(tmp_path / "a")
    (tmp_path / "b" / "weights.safetensors").replace(tmp_path / "a" / "weights.safetensors")
    with pytest.raises(ModelError, match="has shape"):
        load_bundle(tmp_path / "a")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(arch="transformer"), "unknown architecture"),
        (lambda m: m.update(halo=99), "declares halo 99"),
        (lambda m: m.update(classes=["one"]), "lists 1 classes"),
        (lambda m: m.pop("params"), "malformed"),
        (lambda m: m.update(format="other"), "not a studios-model/1"),
    ],
)
def test_malformed_model_json(tmp_path, edit, match):
    save_bundle(init_bundle(), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    edit(meta)
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=match):
        load_bundle(tmp_path / "m")


def test_not_json_and_not_a_folder(tmp_path):
    save_bundle(init_bundle(), tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_bundle(tmp_path / "m")
    with pytest.raises(ModelError, match="not a model bundle folder"):
        load_bundle(tmp_path / "nothing")
