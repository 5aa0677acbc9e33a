"""A bundle says where its model comes from (name, training data, date, intended use), every
prediction carries that, and a freshly exported bundle records no path of the machine that
built it."""

from __future__ import annotations

import json

import pytest
from _bundle_helpers import absolute_paths
from _train_helpers import TINY_MODEL, make_toy, one_thread  # noqa: F401

from mirror_model.bundle import (
    SYNTHETIC_INTENDED_USE,
    SYNTHETIC_WARNING,
    build_document,
    load_bundle,
    save_bundle,
)
from mirror_model.errors import BundleError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from mirror_model.train import TrainConfig, pretrain

    root = tmp_path_factory.mktemp("provenance")
    toy = make_toy(root / "toy", n_patients=18, multi_slide_every=0)
    import h5py

    for f in toy.features.glob("*.h5"):  # the tiling an exported bundle must record
        with h5py.File(f, "a") as fh:
            fh.attrs["tile_px"] = 256
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, tiles_per_slide=16, folds=3,
                      precision="fp32", device="cpu", seed=0)  # fmt: skip
    pretrain(toy.cohort, toy.expression, toy.features, root / "run", config=cfg,
             model_overrides=TINY_MODEL)  # fmt: skip
    return root, toy


def test_exported_bundle_records_no_machine_path_and_states_its_provenance(toy_run, tmp_path):
    from mirror_model.evaluation.export import export_bundle

    root, toy = toy_run
    out = export_bundle(root / "run", tmp_path / "toy-model.mirror")
    doc = out.bundle.document
    assert absolute_paths(doc) == []
    assert str(root) not in json.dumps(doc, default=str)
    assert doc["training"]["run"] == doc["source"]["run"] == "run"  # the folder's name only
    prov = out.bundle.provenance
    assert prov.name == "toy-model" and not prov.synthetic
    assert prov.training_data.startswith("18 patients, 18 slides; subtypes A ")
    assert prov.intended_use == "" and prov.survival_time_unit is None
    assert "does not state its intended use" in prov.warning
    assert prov.created == doc["created"] and prov.package_version == doc["package_version"]

    given = {"name": "Lung model v2", "training_data": "TCGA-LUAD, 480 patients",
             "intended_use": "research use only", "survival_time_unit": "days"}  # fmt: skip
    b = export_bundle(root / "run", tmp_path / "named.mirror", provenance=given).bundle
    b = load_bundle(b.path)  # as a user loads it
    assert {k: getattr(b.provenance, k) for k in given} == given
    assert b.provenance.warning is None and not b.provenance.synthetic
    assert "intended use  research use only" in b.summary()
    with pytest.raises(BundleError, match="unknown field.*'licence'"):
        export_bundle(root / "run", tmp_path / "bad.mirror", provenance={"licence": "x"})
    with pytest.raises(BundleError, match="synthetic must be bool"):
        export_bundle(root / "run", tmp_path / "bad.mirror", provenance={"synthetic": "yes"})
    assert not (tmp_path / "bad.mirror").exists()


def test_export_cli_takes_provenance(toy_run, tmp_path, capsys):
    from mirror_model.cli import main

    root, _ = toy_run
    out = tmp_path / "cli.mirror"
    rc = main(["export", "--run", str(root / "run"), "--out", str(out), "--quiet",
               "--name", "Toy", "--intended-use", "testing", "--time-unit", "months",
               "--synthetic"])  # fmt: skip
    assert rc == 0
    p = load_bundle(out).provenance
    assert (p.name, p.intended_use, p.survival_time_unit, p.synthetic) == ("Toy", "testing", "months", True)
    assert p.training_data.startswith("synthetic cohort: 18 patients")
    assert p.warning == SYNTHETIC_WARNING


def test_predictions_carry_the_provenance_and_the_synthetic_warning(toy_run, tmp_path):
    from mirror_model.evaluation.export import export_bundle
    from mirror_model.inference import predict

    root, toy = toy_run
    b = export_bundle(root / "run", tmp_path / "s.mirror", provenance={"synthetic": True}).bundle
    pid = toy.patients[0]
    pred = predict(b, features_path=toy.features / f"{toy.slides[pid][0]}.h5",
                   expression_path=toy.expression, sample_id=pid, device="cpu")  # fmt: skip
    assert pred.warnings[0] == SYNTHETIC_WARNING
    assert pred.provenance == b.provenance.to_dict() and pred.provenance["synthetic"] is True
    d = pred.to_dict()
    assert d["model"]["provenance"]["intended_use"] == SYNTHETIC_INTENDED_USE
    assert d["warnings"][0] == SYNTHETIC_WARNING
    fc = pred.to_geojson()
    assert fc["properties"]["model"]["synthetic"] is True
    assert fc["properties"]["model"]["bundle_sha256"] == b.sha256


def _minimal_document(**extra):
    from mirror_model.config import get_preset

    cfg = get_preset("mirror").replace(patch_dim=8, n_genes=4, embed_dim=16, n_prototypes=4)
    return build_document(
        config=cfg, preset="mirror", patch_encoder={"name": "stain-texture", "dim": 8},
        target_mpp=1.0, tile_px=64, class_names=[], heads={}, **extra,
    )  # fmt: skip


def test_bundles_without_recorded_provenance_say_what_their_document_implies(tmp_path):
    from mirror_model.config import get_preset
    from mirror_model.models import create_model

    cfg = get_preset("mirror").replace(patch_dim=8, n_genes=4, embed_dim=16, n_prototypes=4)
    state = create_model(cfg).state_dict()
    old = _minimal_document(training={"n_patients": 90, "n_slides": 90})
    del old["provenance"]  # written before provenance was recorded
    p = load_bundle(save_bundle(old, tmp_path / "old.mirror", state)).provenance
    assert (p.name, p.synthetic, p.intended_use) == ("old.mirror", False, "")
    assert p.training_data == "90 patients, 90 slides"
    old_demo = dict(old, metrics={"demo": {"settings": {}}})  # the old demo's only mark
    p = load_bundle(save_bundle(old_demo, tmp_path / "demo.mirror", state)).provenance
    assert p.synthetic and p.intended_use == SYNTHETIC_INTENDED_USE
    assert p.survival_time_unit == "months" and p.warning == SYNTHETIC_WARNING
    assert p.training_data.startswith("synthetic cohort: 90 patients")
    # a damaged provenance part is refused at load time, with the file named
    bad = _minimal_document()
    bad["provenance"] = {"synthetic": "no"}
    path = tmp_path / "bad.mirror"
    from mirror_model.bundle._format import write_bundle_file

    write_bundle_file(bad, {k: v.numpy() for k, v in state.items()}, path, as_folder=False)
    with pytest.raises(BundleError, match=r"bad\.mirror.*provenance.*synthetic must be bool"):
        load_bundle(path)


def test_demo_bundle_provenance_is_synthetic_not_for_patients():
    from mirror_model.demo import DemoSettings, demo_provenance

    p = demo_provenance(DemoSettings.full())
    assert p["synthetic"] is True and p["intended_use"] == SYNTHETIC_INTENDED_USE
    assert "not for patient material" in p["intended_use"]
    assert "seed 2024" in p["training_data"] and "90 generated patients" in p["training_data"]
    assert p["survival_time_unit"] == "months"
    assert absolute_paths(p) == []
