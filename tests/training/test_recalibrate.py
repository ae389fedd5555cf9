"""Recalibrating a tiny bundle for a "site" without retraining. All notes are SYNTHETIC (tests/conftest.py); the
site's notes are rescored by a shifted prevalence, so that the bundle's calibration no longer fits them."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from app.bundle import load_bundle, sha256_file
from app.inference import NoteClassifier
from app.manifest import Manifest
from tests.conftest import synthetic_notes
from training.cli import app
from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.export import export_bundle
from training.fit import fit
from training.recalibrate import RecalibrationError, RecalibrationOptions, recalibrate_bundle

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def source_bundle(tmp_path_factory, notes_csv, tiny_bert_dir):
    root = tmp_path_factory.mktemp("recalibrate")
    run = fit(
        DataArguments(data=str(notes_csv)),
        ModelArguments(student=str(tiny_bert_dir), max_length=64),
        TrainingArguments(out=str(root / "run"), epochs=3, batch_size=16, encoder_lr=2e-3, head_lr=5e-3, seed=1),
        DistillArguments(),
        EvalArguments(bootstrap=20),
    )
    return export_bundle(run, root / "bundle", version="1.0.0", tolerance=1.0)


@pytest.fixture(scope="module")
def site_csv(tmp_path_factory):
    """A SYNTHETIC site: other notes than training's, a quarter of them emergencies, in its own column names."""
    notes = synthetic_notes(400, seed=99)
    emergencies = [t for t, y in notes if y == 1][:60]
    others = [t for t, y in notes if y == 0][:180]
    frame = pd.DataFrame({"note": emergencies + others, "acuity": ["high"] * 60 + ["low"] * 180})
    path = tmp_path_factory.mktemp("site") / "site_notes.csv"
    frame.sample(frac=1, random_state=0).to_csv(path, index=False)
    return path


def site_data(path):
    return DataArguments(data=str(path), text_columns=["note"], label_column="acuity", label_map="high=1,low=0")


@pytest.fixture(scope="module")
def recalibrated(source_bundle, site_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "site-bundle"
    return recalibrate_bundle(source_bundle, site_data(site_csv), out, RecalibrationOptions(bootstrap=50))


def test_the_recalibrated_bundle_serves_its_new_calibration(recalibrated, site_csv):
    loaded = load_bundle(recalibrated, variant="fp32", providers=CPU)  # verifies every file's sha256
    manifest = loaded.manifest
    texts = pd.read_csv(site_csv)["note"].tolist()
    classifier = NoteClassifier.from_bundle(loaded)
    margins = classifier.predict_margins(texts)
    c = manifest.calibration
    np.testing.assert_allclose(
        classifier.predict_proba(texts), 1 / (1 + np.exp(-(c.scale * margins + c.bias))), atol=1e-6
    )
    assert load_bundle(recalibrated, providers=CPU).variant in ("int8", "fp32")  # the service's own choice


def test_the_manifest_records_the_site_and_the_before_after_metrics(recalibrated, source_bundle, site_csv):
    old = Manifest.model_validate_json((source_bundle / "manifest.json").read_text())
    new = Manifest.model_validate_json((recalibrated / "manifest.json").read_text())
    digest = sha256_file(site_csv)
    assert new.version == f"1.0.0+site.{digest[:8]}" and old.recalibration is None
    r = new.recalibration
    assert (r.source_version, r.data_file, r.data_sha256) == ("1.0.0", "site_notes.csv", digest)
    assert (r.notes, r.fit_notes, r.check_notes) == (240, 144, 96)
    assert r.prevalence == pytest.approx(0.25)
    assert new.calibration.method in ("temperature", "platt") and new.calibration.notes == 144
    assert new.decision.policy == "target-sensitivity" and new.decision.target_sensitivity == 0.95
    for side in (r.before, r.after):
        for name in (
            "auroc",
            "sensitivity",
            "specificity",
            "ece",
            "brier",
            "calibration_slope",
            "calibration_in_the_large",
        ):
            assert set(side["metrics"][name]) >= {"value", "low", "high"}, name
    assert r.before["threshold"] == old.decision.threshold and r.after["threshold"] == new.decision.threshold
    assert r.before["calibration"] == old.calibration.model_dump(mode="json")
    assert set(r.after["policies"]) == {"prevalence", "fixed-0.5", "target-sensitivity"}
    # The model is unchanged: same files, same digests; only the manifest and the card differ.
    assert new.variants == old.variants and new.tokenizer_files == old.tokenizer_files
    for variant in new.variants.values():
        if variant.kept:
            assert sha256_file(recalibrated / variant.file) == variant.sha256
    card = (recalibrated / "MODEL_CARD.md").read_text()
    assert "## Site recalibration" in card and "> Recalibrated for a site" in card and "site_notes.csv" in card


def test_the_site_prevalence_is_what_the_new_probabilities_average_to(recalibrated):
    after = Manifest.model_validate_json((recalibrated / "manifest.json").read_text()).recalibration.after
    # The check part's mean P is near its prevalence (0.25) after calibration on the fit part.
    assert abs(after["metrics"]["mean_minus_prevalence"]["value"]) < 0.1


def test_recalibrating_again_keeps_one_note_and_one_section(recalibrated, site_csv, tmp_path):
    again = recalibrate_bundle(
        recalibrated, site_data(site_csv), tmp_path / "again", RecalibrationOptions(bootstrap=20)
    )
    manifest = Manifest.model_validate_json((again / "manifest.json").read_text())
    assert manifest.version.endswith(".site." + manifest.recalibration.data_sha256[:8])
    card = (again / "MODEL_CARD.md").read_text()
    assert card.count("## Site recalibration") == 1 and card.count("> Recalibrated for a site") == 1


def test_an_existing_out_is_refused_unless_overwrite(recalibrated, source_bundle, site_csv, tmp_path):
    with pytest.raises(RecalibrationError, match="already exists"):
        recalibrate_bundle(source_bundle, site_data(site_csv), recalibrated)
    with pytest.raises(RecalibrationError, match="source bundle"):
        recalibrate_bundle(source_bundle, site_data(site_csv), source_bundle, overwrite=True)
    target = tmp_path / "target"
    shutil.copytree(recalibrated, target)
    recalibrate_bundle(
        source_bundle,
        site_data(site_csv),
        target,
        RecalibrationOptions(bootstrap=20, threshold_policy="prevalence"),
        overwrite=True,
    )
    manifest = Manifest.model_validate_json((target / "manifest.json").read_text())
    assert manifest.decision.policy == "prevalence" and manifest.decision.threshold == pytest.approx(0.25, abs=0.01)
    assert [p.name for p in tmp_path.iterdir()] == ["target"]  # no staging directory left behind


def test_too_few_notes_of_a_class_is_a_clear_error(source_bundle, site_csv, tmp_path):
    frame = pd.read_csv(site_csv)
    small = tmp_path / "small.csv"
    pd.concat([frame[frame.acuity == "high"].head(5), frame[frame.acuity == "low"].head(50)]).to_csv(small, index=False)
    with pytest.raises(RecalibrationError, match=r"5 emergency; at least 20 of each class"):
        recalibrate_bundle(source_bundle, site_data(small), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_recalibrate(source_bundle, site_csv, tmp_path):
    out = tmp_path / "cli-bundle"
    args = ["recalibrate", "--bundle", str(source_bundle), "--data", str(site_csv), "--out", str(out)]
    args += ["--text-columns", "note", "--label-column", "acuity", "--label-map", "high=1,low=0"]
    result = CliRunner().invoke(app, [*args, "--bootstrap", "20", "--calibration", "platt", "--version", "2.0.0"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == "2.0.0" and manifest["calibration"]["method"] == "platt"
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    typo = CliRunner().invoke(app, [*args, "--calibration", "isotonic"])
    assert typo.exit_code == 2
