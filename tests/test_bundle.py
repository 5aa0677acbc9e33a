"""Model bundles: round trip, integrity checks with clear errors, the shipped demo bundle."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mirror_model.bundle import (
    FORMAT_VERSION,
    Bundle,
    headline_metrics,
    load_bundle,
    save_bundle,
)
from mirror_model.errors import BundleError
from mirror_model.inference import predict
from mirror_model.models import INFERENCE_PREFIXES, inference_state_dict


def _predict_all(bundle, case):
    return predict(
        bundle,
        slide_path=case.slide_path,
        expression_path=case.expression_path,
        sample_id=case.sample_id,
        device="cpu",
        precision="fp32",
    )


def _assert_same(a, b):
    assert a.modalities == b.modalities == ("slide", "rna")
    np.testing.assert_array_equal(a.coords_level0, b.coords_level0)
    np.testing.assert_allclose(a.attention, b.attention, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.slide_embedding, b.slide_embedding, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.rna_embedding, b.rna_embedding, rtol=0, atol=1e-6)
    for c in a.subtype_probabilities:
        assert abs(a.subtype_probabilities[c] - b.subtype_probabilities[c]) < 1e-6
    assert abs(a.risk_score - b.risk_score) < 1e-6
    assert a.risk_percentile == b.risk_percentile and a.risk_group == b.risk_group


def test_round_trip_file_gives_identical_predictions(case):
    loaded = load_bundle(case.path)
    _assert_same(_predict_all(case.bundle, case), _predict_all(loaded, case))
    assert loaded.genes == case.genes
    assert loaded.class_names == case.classes
    assert loaded.input_kinds == ("slide", "rna", "both")
    assert loaded.tile_px == 64 and loaded.target_mpp == 1.0
    assert loaded.sha256 == hashlib.sha256(case.path.read_bytes()).hexdigest()
    # the state dict is restored bit for bit
    for k, v in case.state.items():
        np.testing.assert_array_equal(loaded.model_state[k], v.numpy())


def test_bundle_holds_the_encoders_and_old_full_bundles_still_load(case, tmp_path):
    """A bundle needs the encoders only (pretraining heads, decoders and prototypes stay in the
    run folder); a bundle holding the whole pretraining model (as written before) loads to the
    same inference model, and both predict identically."""
    lean = save_bundle(case.document, tmp_path / "lean.mirror", inference_state_dict(case.state))
    assert lean.stat().st_size < 0.9 * case.path.stat().st_size
    full, small = load_bundle(case.path), load_bundle(lean)
    assert set(small.model_state) == set(inference_state_dict(case.state))
    assert all(k.startswith(INFERENCE_PREFIXES) for k in small.model.state_dict())
    for m in (full.model, small.model):
        assert m.training_parts is False and m.style is None and m.slide_retention is None
    _assert_same(_predict_all(full, case), _predict_all(small, case))
    with pytest.raises(RuntimeError, match="inference model"):
        small.model(features=torch.zeros(1, 4, small.config.patch_dim),
                    rna=torch.zeros(1, small.config.n_genes))  # fmt: skip


def test_round_trip_folder_and_resave(case, tmp_path):
    folder = save_bundle(load_bundle(case.path), tmp_path / "as_folder")
    assert (folder / "bundle.json").is_file() and (folder / "model.safetensors").is_file()
    again = save_bundle(load_bundle(folder), tmp_path / "again.mirror")
    _assert_same(_predict_all(load_bundle(folder), case), _predict_all(load_bundle(again), case))


def test_summary_and_views(case):
    b = load_bundle(case.path)
    text = b.summary()
    for c in case.classes:
        assert c in text
    assert f"genes         {len(case.genes)}" in text
    assert "stain-texture" in text and "64 px at 1 µm/px" in text
    assert b.risk_cutoff("slide") == pytest.approx(case.document["risk"]["slide"]["cutoff"])
    km = b.reference_km_for("both")
    assert set(km) <= {"low", "high"} and km
    for curve in km.values():
        s = np.asarray(curve["survival"])
        assert s[0] <= 1.0 and np.all(np.diff(s) <= 1e-12)  # a survival curve never rises
    assert b.reference_km == km  # "both" is the richest input kind
    assert b.metrics["subtype_linear"]["both"]["auroc_macro"]["mean"] == 0.9


def test_headline_prefers_both_then_slide():
    m = {
        "subtype_linear": {
            "slide": {"auroc_macro": {"mean": 0.8, "sd": 0.1}},
            "both": {"auroc_macro": {"mean": None, "sd": None}},
        },
        "survival_cox": {"rna": {"c_index": {"mean": 0.6, "sd": None}}},
    }
    h = headline_metrics(m)
    assert h["auroc_macro"] == {"mean": 0.8, "sd": 0.1, "input": "slide"}
    assert h["c_index"] == {"mean": 0.6, "sd": None, "input": "rna"}


# ------------------------------------------------------------------------------ bad bundles
def _write(tmp_path: Path, data: bytes, name: str = "bad.mirror") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _header(data: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n])


def _rewrite_header(data: bytes, header: dict) -> bytes:
    n, _ = _header(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


@pytest.mark.parametrize("cut", ["4", "header", "data", "last"])
def test_truncated_file_is_refused(case, tmp_path, cut):
    data = case.path.read_bytes()
    n, _ = _header(data)
    at = {"4": 4, "header": 8 + n // 2, "data": 8 + n + 100, "last": len(data) - 1}[cut]
    p = _write(tmp_path, data[:at])
    with pytest.raises(BundleError) as ei:
        load_bundle(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert any(w in msg for w in ("truncated", "too short", "bad header")), msg


def test_garbled_header_json_is_refused(case, tmp_path):
    data = bytearray(case.path.read_bytes())
    data[8] = ord("#")  # the opening brace of the JSON header
    p = _write(tmp_path, bytes(data))
    with pytest.raises(BundleError, match="garbled header"):
        load_bundle(p)


def test_flipped_weight_byte_fails_checksum(case, tmp_path):
    data = bytearray(case.path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's data
    p = _write(tmp_path, bytes(data))
    with pytest.raises(BundleError, match="does not match its checksum"):
        load_bundle(p)


def test_garbled_document_json_is_refused(case, tmp_path):
    data = case.path.read_bytes()
    _, header = _header(data)
    header["__metadata__"]["mirror_bundle"] = header["__metadata__"]["mirror_bundle"][:-20]
    p = _write(tmp_path, _rewrite_header(data, header))
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(p)


def _edit_document(case, tmp_path, edit) -> Path:
    data = case.path.read_bytes()
    _, header = _header(data)
    doc = json.loads(header["__metadata__"]["mirror_bundle"])
    edit(doc)
    header["__metadata__"]["mirror_bundle"] = json.dumps(doc)
    return _write(tmp_path, _rewrite_header(data, header))


def test_newer_format_version_is_refused(case, tmp_path):
    p = _edit_document(case, tmp_path, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BundleError) as ei:
        load_bundle(p)
    msg = str(ei.value)
    assert f"format version {FORMAT_VERSION + 1}" in msg and "upgrade" in msg and str(p) in msg
    assert "made by a newer napari-mirror" in msg


def test_trailing_bytes_are_refused(case, tmp_path):
    p = _write(tmp_path, case.path.read_bytes() + b"\0" * 24)
    with pytest.raises(BundleError, match="24 unexpected bytes after the tensor data"):
        load_bundle(p)


def test_huge_header_length_is_refused(case, tmp_path):
    data = case.path.read_bytes()
    p = _write(tmp_path, struct.pack("<Q", 2**40) + data[8:])
    with pytest.raises(BundleError, match=r"bad header \(declares 1099511627776 header bytes"):
        load_bundle(p)


def test_truncated_data_names_the_sizes(case, tmp_path):
    data = case.path.read_bytes()
    n, _ = _header(data)
    p = _write(tmp_path, data[:-100])
    with pytest.raises(BundleError) as ei:
        load_bundle(p)
    held = len(data) - 8 - n - 100
    assert f"is truncated: its tensors need {held + 100} bytes of data" in str(ei.value)
    assert f"holds only {held}" in str(ei.value)


def test_unsupported_tensor_dtype_is_named(case, tmp_path):
    data = case.path.read_bytes()
    _, header = _header(data)
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    info = header[name]
    b, e = info["data_offsets"]
    info["dtype"], info["shape"] = "BF16", [(e - b) // 2]  # same bytes, a dtype numpy lacks
    p = _write(tmp_path, _rewrite_header(data, header))
    with pytest.raises(BundleError, match="unsupported dtype 'BF16'"):
        load_bundle(p)


def test_invalid_format_version_is_refused(case, tmp_path):
    p = _edit_document(case, tmp_path, lambda d: d.update(format_version="1"))
    with pytest.raises(BundleError, match="invalid format_version '1'"):
        load_bundle(p)


def test_not_a_bundle_document_is_refused(case, tmp_path):
    p = _edit_document(case, tmp_path, lambda d: d.update(format="something-else"))
    with pytest.raises(BundleError, match="is not a napari-mirror model bundle"):
        load_bundle(p)


@pytest.mark.parametrize(
    ("part", "words"),
    [
        ("patch_encoder", "patch-encoder spec"),
        ("tiling", "tiling"),
        ("heads", "prediction heads"),
        ("tensor_sha256", "tensor checksums"),
    ],
)
def test_missing_document_part_is_named(case, tmp_path, part, words):
    p = _edit_document(case, tmp_path, lambda d: d.pop(part))
    with pytest.raises(BundleError, match=words):
        load_bundle(p)


def test_missing_preprocessing_is_refused(case, tmp_path):
    p = _edit_document(case, tmp_path, lambda d: d.update(preprocessing=None))
    with pytest.raises(BundleError, match="no expression preprocessing"):
        load_bundle(p)


def test_missing_model_tensor_is_refused(case, tmp_path):
    missing = next(k for k in case.state if k.startswith(INFERENCE_PREFIXES))
    state = {k: v for k, v in case.state.items() if k != missing}
    p = save_bundle(case.document, tmp_path / "partial.mirror", state)
    with pytest.raises(BundleError) as ei:
        load_bundle(p)
    assert "missing weights" in str(ei.value) and missing in str(ei.value)


def test_removed_tensor_is_named(case, tmp_path):
    data = case.path.read_bytes()
    _, header = _header(data)
    name = next(k for k in header if k.startswith("doc.heads"))
    del header[name]  # its bytes become unexplained trailing data
    p = _write(tmp_path, _rewrite_header(data, header))
    with pytest.raises(BundleError) as ei:
        load_bundle(p)
    assert "corrupted" in str(ei.value) or name in str(ei.value)


def test_plain_safetensors_file_is_not_a_bundle(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(p))
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(p)


def test_missing_path_and_folder_parts(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope.mirror")
    (tmp_path / "folder").mkdir()
    with pytest.raises(BundleError, match="bundle.json"):
        load_bundle(tmp_path / "folder")


def test_loading_never_unpickles(case, tmp_path, monkeypatch):
    import pickle

    import torch

    def boom(*a, **k):
        raise AssertionError("a bundle must never be unpickled")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    b = load_bundle(case.path)
    assert isinstance(b, Bundle)
