import functools
import shutil

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bt_pipeline.infer import main
from bt_pipeline.inference.pipeline import PATIENT_COLUMNS, SLICE_COLUMNS, TRUTH_COLUMNS


def _tree_snapshot(root):
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


def _links(html):
    from html.parser import HTMLParser

    found = []

    class Collector(HTMLParser):
        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                found.append(("img", attrs["src"]))
            elif tag == "a" and "href" in attrs:
                found.append(("a", attrs["href"]))

    parser = Collector()
    parser.feed(html)
    parser.close()
    return found


def _run(tiny_models, *args):
    classifier, unet = tiny_models
    return main([*map(str, args), "--classifier", str(classifier), "--unet", str(unet),
                 "--quiet"])


def test_full_output_contract(tiny_models, synthetic_root, tmp_path):
    out = tmp_path / "out"
    before = _tree_snapshot(synthetic_root)
    assert _run(tiny_models, synthetic_root, "--out", out) == 0
    assert _tree_snapshot(synthetic_root) == before  # nothing written into SCAN_DIR
    slices = pd.read_csv(out / "slices.csv")
    patients = pd.read_csv(out / "patients.csv")
    assert list(slices.columns) == SLICE_COLUMNS
    assert list(patients.columns) == PATIENT_COLUMNS + TRUTH_COLUMNS
    assert len(patients) == 8 and len(slices) == 8 * 9
    assert set(slices["classifier_positive"]) <= {0, 1}
    assert slices["classifier_probability"].between(0, 1).all()
    # the answer column is the final mask, never the gate
    assert (slices["tumor_detected"] == (slices["mask_pixels"] > 0)).all()
    per_patient = slices.groupby("patient_id")["tumor_detected"].sum()
    assert (patients.set_index("patient_id")["n_tumor_slices"] == per_patient).all()
    assert patients["tumor_volume_ml"].isna().all()  # no spacing given: no volume
    assert patients["dice"].between(0, 1).all() and patients["iou"].between(0, 1).all()
    assert patients["dice"].mean() > 0.5  # the tiny models learnt the synthetic lesions
    for row in slices.itertuples():
        image = cv2.imread(str(synthetic_root / row.image), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / row.patient_id / f"{row.image.split('/')[-1][:-4]}_mask.png"),
                          cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        assert int((mask > 0).sum()) == row.mask_pixels
    for patient in patients["patient_id"]:
        volume = nib.load(out / patient / "mask.nii.gz")
        assert volume.shape == (64, 64, 9)
        assert int(np.asarray(volume.dataobj).sum()) == int(
            patients.set_index("patient_id").loc[patient, "tumor_pixels"])
        assert cv2.imread(str(out / patient / "overview.png")) is not None
    html = (out / "report.html").read_text()
    links = _links(html)
    assert len([src for tag, src in links if tag == "img"]) == 8
    for _, target in links:  # every image and link in the page resolves to a written file
        if not target.startswith("#"):
            assert (out / target).is_file(), target
    assert pd.read_csv(out / "errors.csv").empty
    assert not list(out.rglob(".*tmp*"))  # no temporary leftovers


def test_single_patient_folder_and_no_truth(tiny_models, synthetic_root, tmp_path):
    patient = tmp_path / "TCGA_XX_0001_20200101"
    source = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    patient.mkdir()
    for path in source.glob("*.tif"):
        if not path.stem.endswith("_mask"):
            shutil.copy(path, patient / path.name)
    out = tmp_path / "out"
    assert _run(tiny_models, patient, "--out", out) == 0
    patients = pd.read_csv(out / "patients.csv")
    # the same columns as with truth, the truth's cells empty
    assert list(patients.columns) == PATIENT_COLUMNS + TRUTH_COLUMNS
    assert patients[TRUTH_COLUMNS].isna().all().all()
    assert len(list((out / patient.name).glob("*_mask.png"))) == 9


def test_a_score_on_a_patient_the_unet_learnt_from_says_so(tiny_models, synthetic_root,
                                                          tmp_path, capsys):
    import json

    from bt_pipeline.inference.pipeline import TRAINED_ON_NOTE

    classifier, unet = tiny_models
    listed = tmp_path / "unet.keras"
    shutil.copy(unet, listed)
    config = json.loads(unet.with_suffix(".json").read_text())
    patients = sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())
    config["extra"]["trained_on_patients"] = patients[:1]  # as training writes it
    listed.with_suffix(".json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert _run((classifier, listed), synthetic_root, "--out", out) == 0
    table = pd.read_csv(out / "patients.csv", keep_default_na=False).set_index("patient_id")
    assert table.loc[patients[0], "dice_note"] == TRAINED_ON_NOTE
    assert (table.drop(index=patients[0])["dice_note"] == "").all()
    lines = capsys.readouterr().out.splitlines()
    noted = [line for line in lines if TRAINED_ON_NOTE in line]
    assert len(noted) == 1 and noted[0].startswith(f"{patients[0]}:")


@pytest.fixture()
def messy_dir(synthetic_root, tmp_path):
    root = tmp_path / "scans"
    shutil.copytree(synthetic_root, root)
    patients = sorted(p for p in root.iterdir() if p.is_dir())
    first, second = patients[0], patients[1]
    bad = {}
    bad["truncated"] = first / f"{first.name}_2.tif"
    bad["truncated"].write_bytes(bad["truncated"].read_bytes()[:300])
    bad["not_image"] = first / f"{first.name}_3.tif"
    bad["not_image"].write_text("hello")
    bad["16-bit"] = first / f"{first.name}_4.tif"
    cv2.imwrite(str(bad["16-bit"]), np.full((64, 64, 3), 5000, np.uint16))
    bad["wrong_size"] = second / f"{second.name}_2.tif"
    cv2.imwrite(str(bad["wrong_size"]), np.full((80, 80, 3), 50, np.uint8))
    bad["orphan_mask"] = second / f"{second.name}_99_mask.tif"
    cv2.imwrite(str(bad["orphan_mask"]), np.zeros((64, 64), np.uint8))
    bad["empty_patient"] = root / "TCGA_CS_9999_20000101"
    bad["empty_patient"].mkdir()
    (second / "notes.txt").write_text("stray")
    return root, bad


def test_bad_inputs_are_reported_and_good_slices_still_processed(tiny_models, messy_dir,
                                                                  tmp_path, capsys):
    root, bad = messy_dir
    before = _tree_snapshot(root)
    out = tmp_path / "out"
    assert _run(tiny_models, root, "--out", out) == 1
    assert _tree_snapshot(root) == before
    stderr = capsys.readouterr().err
    errors = pd.read_csv(out / "errors.csv")
    for path in bad.values():
        assert str(path) in stderr
        assert str(path) in set(errors["path"])
    lines = [line for line in stderr.splitlines() if str(root) in line]
    assert all(line.startswith(("skipped: ", "ignored: ")) for line in lines)
    slices = pd.read_csv(out / "slices.csv")
    assert len(slices) == 8 * 9 - 4  # every good slice processed
    assert len(pd.read_csv(out / "patients.csv")) == 8


def test_nothing_processable_exits_2(tiny_models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(tiny_models, empty, "--out", tmp_path / "out") == 2


def test_wrong_calls_exit_2(tiny_models, synthetic_root, tmp_path, capsys):
    assert _run(tiny_models, synthetic_root, "--out", synthetic_root / "preds") == 2
    assert not (synthetic_root / "preds").exists()
    assert main([str(synthetic_root), "--classifier", str(tmp_path / "missing.keras")]) == 2
    assert "missing.keras" in capsys.readouterr().err
    assert main(["--no-such-flag"]) == 2


def test_inference_feeds_the_models_what_training_fed_them(tiny_models, synthetic_root,
                                                          synthetic_manifest):
    from bt_pipeline.config import DataConfig
    from bt_pipeline.data.loader import load_split
    from bt_pipeline.data.manifest import read_manifest
    from bt_pipeline.data.preprocess import read_image
    from bt_pipeline.inference.predictor import TwoStagePredictor, graph_forward

    predictor = TwoStagePredictor.load(*tiny_models)
    size = predictor.classifier_config.image_size
    data = DataConfig(data_root=str(synthetic_root), image_size=size, cache_dir="")
    arrays = load_split(read_manifest(synthetic_manifest), "val", data)
    images = [read_image(synthetic_root / path) for path in arrays.rows["image"]]
    at_inference = predictor.tumour_probabilities(images)
    at_training = graph_forward(predictor.classifier)(arrays.images).numpy().ravel()
    np.testing.assert_array_equal(at_inference, at_training)
    eager = predictor.classifier(arrays.images, training=False).numpy().ravel()
    np.testing.assert_allclose(at_inference, eager, rtol=1e-5, atol=1e-6)


def test_ensemble_flips_and_bfloat16_options(tiny_models, synthetic_root, tmp_path):
    """The measured options of the U-Net stage: masks stay well formed and close to plain."""
    import dataclasses

    from bt_pipeline.data.preprocess import read_image
    from bt_pipeline.inference.predictor import TwoStagePredictor

    classifier, unet = tiny_models
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    images = [read_image(p) for p in sorted(patient.glob("*.tif")) if "_mask" not in p.name]
    plain = TwoStagePredictor.load(classifier, unet)
    reference = plain.mask_probabilities(images)
    # an ensemble of the same model twice is that model; flips average it with its mirror
    twice = TwoStagePredictor.load(classifier, unet, extra_unet_paths=[unet])
    for a, b in zip(twice.mask_probabilities(images), reference, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    flipped = dataclasses.replace(plain, tta_flips=True).mask_probabilities(images)
    mirrored = plain.mask_probabilities([np.ascontiguousarray(i[:, ::-1]) for i in images])
    for f, r, m in zip(flipped, reference, mirrored, strict=True):
        np.testing.assert_allclose(f, (r + m[:, ::-1]) / 2, atol=1e-5)
    low = dataclasses.replace(plain, bfloat16=True).mask_probabilities(images)
    assert max(np.abs(a - b).max() for a, b in zip(low, reference, strict=True)) < 0.05
    out = tmp_path / "out"
    assert _run(tiny_models, patient, "--out", out, "--extra-unet", unet, "--tta-flips",
                "--precision", "bfloat16") == 0
    assert len(list((out / patient.name).glob("*_mask.png"))) == len(images)


def test_options_default_to_what_the_unet_config_says(tiny_models, tmp_path):
    import dataclasses

    from bt_pipeline.config import UNetConfig, load_json, save_json
    from bt_pipeline.inference.predictor import TwoStagePredictor

    classifier, unet = tiny_models
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("unet", "member"):
        shutil.copy(unet, folder / f"{name}.keras")
    config = load_json(unet.with_suffix(".json"), UNetConfig)
    save_json(config, folder / "member.json")
    save_json(dataclasses.replace(config, tta_flips=True, ensemble=("member.keras",)),
              folder / "unet.json")
    chosen = TwoStagePredictor.load(classifier, folder / "unet.keras")
    assert chosen.tta_flips and len(chosen.extra_unets) == 1
    overridden = TwoStagePredictor.load(classifier, folder / "unet.keras", extra_unet_paths=[],
                                        tta_flips=False)
    assert not overridden.tta_flips and overridden.extra_unets == ()


def test_a_25d_model_gets_the_neighbours_training_gave_it(synthetic_root, synthetic_manifest,
                                                         tmp_path):
    """Models with a 2.5D input (context_slices=1): inference stacks each patient's
    neighbouring slices exactly as the loader does, also for a subset of slices."""
    import dataclasses

    from bt_pipeline.config import ClassifierConfig, DataConfig, UNetConfig
    from bt_pipeline.data.loader import load_split
    from bt_pipeline.data.manifest import read_manifest
    from bt_pipeline.data.preprocess import read_image
    from bt_pipeline.inference.predictor import ModelLoadError, TwoStagePredictor, graph_forward
    from bt_pipeline.models.classifier import build_classifier
    from bt_pipeline.models.unet import build_unet
    from bt_pipeline.training.callbacks import ship_model

    data = DataConfig(data_root=str(synthetic_root), image_size=32, cache_dir="",
                      context_slices=1)
    facts = {"data": dataclasses.asdict(data)}
    ship_model(build_classifier(32, (4, 8), (0.0, 0.0), 0.0, 8, channels=9),
               tmp_path / "classifier.keras", ClassifierConfig(image_size=32, filters=(4, 8),
                                                               threshold=0.0, context_slices=1),
               facts)
    unet_config = UNetConfig(image_size=32, depth=2, base_filters=4, context_slices=1)
    ship_model(build_unet(32, 2, 4, channels=9), tmp_path / "unet.keras", unet_config, facts)
    predictor = TwoStagePredictor.load(tmp_path / "classifier.keras", tmp_path / "unet.keras")
    assert predictor.classifier_config.preprocessing.channels == 9
    arrays = load_split(read_manifest(synthetic_manifest), "val", data)
    for _, rows in arrays.rows.groupby("patient_id"):
        rows = rows.sort_values("slice")
        images = [read_image(synthetic_root / path) for path in rows["image"]]
        expected = graph_forward(predictor.classifier)(arrays.images[rows.index]).numpy()
        # to float rounding: oneDNN's AVX2 kernels round a batch of 2 and one of 5 differently
        # (2 ulp seen); a wrong neighbour would move these probabilities by far more
        same = functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-6)
        same(predictor.tumour_probabilities(images), expected.ravel())
        maps = predictor.mask_probabilities(images)
        subset = predictor.mask_probabilities(images, [1, 3])
        same(subset[0], maps[1])
        same(subset[1], maps[3])
        assert np.abs(subset[1] - maps[2]).max() > 1e-5  # the tolerance tells slices apart
        _, masks = predictor.predict(images)  # threshold 0: every slice segmented
        assert len(masks) == len(images) and masks[0].shape == images[0].shape[:2]
    ship_model(build_unet(32, 2, 4, channels=6), tmp_path / "even.keras", unet_config, facts)
    with pytest.raises(ModelLoadError, match="takes input .32, 32, 6. but its config describes"):
        TwoStagePredictor.load(tmp_path / "classifier.keras", tmp_path / "even.keras")


def test_volume_in_ml_is_voxel_count_times_voxel_volume(tiny_models, synthetic_root, tmp_path):
    out = tmp_path / "out"
    assert _run(tiny_models, synthetic_root, "--out", out, "--spacing", "0.5", "0.8", "2.5") == 0
    patients = pd.read_csv(out / "patients.csv")
    expected = patients["tumor_pixels"] * 0.5 * 0.8 * 2.5 / 1000
    assert patients["tumor_volume_ml"].to_numpy() == pytest.approx(  # rounded to 0.01 mL
        expected.to_numpy(), abs=0.0051)
    assert _run(tiny_models, synthetic_root, "--out", out, "--spacing", "0", "1", "1") == 2


def test_viewer_shows_every_slice_with_its_gate_and_findings(tiny_models, synthetic_root,
                                                             tmp_path):
    import json
    import re

    out = tmp_path / "out"
    assert _run(tiny_models, synthetic_root, "--out", out) == 0
    slices = pd.read_csv(out / "slices.csv")
    patient = slices["patient_id"].iloc[0]
    page = (out / patient / "viewer.html").read_text()
    assert "http://" not in page and "https://" not in page  # works with no network
    data = json.loads(re.search(r"const DATA = (.*);\n", page).group(1).replace("<\\/", "</"))
    rows = slices[slices["patient_id"] == patient]
    assert [s["n"] for s in data["slices"]] == list(rows["slice"])  # every slice, in order
    assert [s["gate"] for s in data["slices"]] == list(rows["classifier_positive"].astype(bool))
    assert [s["px"] for s in data["slices"]] == list(rows["mask_pixels"])
    assert data["summary"]["has_truth"] and "ground-truth outline" in page
    for entry in data["slices"]:
        drawn, truth = entry["px"] > 0, entry["truth_px"] > 0
        assert entry["finding"] == {(True, True): "hit", (False, True): "miss",
                                    (True, False): "false alarm"}.get((drawn, truth), "")
    index = (out / "report.html").read_text()
    assert f"{patient}/viewer.html" in index


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium (Debian package)")
def test_viewer_runs_in_a_real_browser(tiny_models, synthetic_root, tmp_path):
    """Headless Chromium loads the viewer with no network and its script fills in the slice."""
    import subprocess

    out = tmp_path / "out"
    assert _run(tiny_models, synthetic_root, "--out", out) == 0
    viewer = next(out.glob("*/viewer.html"))
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"file://{viewer}#slice=3"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert "slice 3 (3 of 9)" in dom and "stage 1 (gate) probability" in dom
    assert "R</span>" in dom and "hit (mask and truth)" in dom


def test_mask_volume_lands_in_the_anatomical_corner_the_slices_show(tmp_path):
    """A blob drawn at the top-left of the top slice (anterior, patient's right, superior in
    the dataset's radiological slices) lies there in world (RAS+) coordinates, in the mask and
    in the FLAIR volume written beside it, with the voxel size given."""
    from bt_pipeline.inference.outputs import write_image_volume, write_mask_volume

    masks = [np.zeros((40, 50), np.uint8) for _ in range(6)]
    masks[-1][2:6, 3:8] = 1
    images = [np.zeros((40, 50, 3), np.uint8) for _ in range(6)]
    images[-1][2:6, 3:8, 1] = 255  # FLAIR channel
    write_mask_volume(tmp_path / "mask.nii.gz", masks, spacing=(0.5, 0.8, 3.0))
    write_image_volume(tmp_path / "image.nii.gz", images, spacing=(0.5, 0.8, 3.0))
    for name in ("mask.nii.gz", "image.nii.gz"):
        volume = nib.load(tmp_path / name)
        assert volume.shape == (50, 40, 6) and volume.header.get_zooms() == (0.5, 0.8, 3.0)
        assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")
        voxels = np.argwhere(np.asarray(volume.dataobj) > 0)
        world = nib.affines.apply_affine(volume.affine, voxels)
        corners = nib.affines.apply_affine(volume.affine, [[0, 0, 0], [49, 39, 5]])
        centre = corners.mean(axis=0)
        assert (world[:, 0] > centre[0]).all()  # +x: the patient's right
        assert (world[:, 1] > centre[1]).all()  # +y: anterior
        assert (world[:, 2] > centre[2]).all()  # +z: superior
        assert len(voxels) == 4 * 5


def test_infer_runs_bfloat16_where_native_by_default_and_evaluate_float32():
    import argparse

    from bt_pipeline.evaluation import evaluate
    from bt_pipeline.inference import infer

    defaults = {}
    for name, module, argv in (("infer", infer, ["scans"]), ("evaluate", evaluate, [])):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        defaults[name] = parser.parse_args(argv).precision
    # README: infer's default is auto (bfloat16 only on CPUs with native support); the
    # reported test figures come from evaluate in float32, the same on every machine
    assert defaults == {"infer": "auto", "evaluate": "float32"}


def test_save_probabilities_writes_the_maps_before_post_processing(tiny_models, synthetic_root,
                                                                   tmp_path):
    """probability.nii.gz: on the mask's grid, 0 on slices stage 1 did not pass, at or above
    the threshold wherever the final mask is set; absent unless asked for."""
    out = tmp_path / "out"
    assert _run(tiny_models, synthetic_root, "--out", out, "--save-probabilities") == 0
    slices = pd.read_csv(out / "slices.csv")
    checked = 0
    for patient, rows in slices.groupby("patient_id"):
        probability = nib.load(out / patient / "probability.nii.gz")
        mask = nib.load(out / patient / "mask.nii.gz")
        assert probability.get_data_dtype() == np.float32
        assert np.array_equal(probability.affine, mask.affine)
        values, final = probability.get_fdata(), mask.get_fdata() > 0
        assert values.shape == final.shape and values.min() >= 0 and values.max() <= 1
        assert (values[final] >= 0.5).all()
        passed = rows.sort_values("slice")["classifier_positive"].to_numpy().astype(bool)
        assert not values[..., ~passed].any()
        checked += int(passed.any() and values[..., passed].any())
    assert checked > 0  # the maps are written where the U-Net ran, not all zeros
    assert _run(tiny_models, synthetic_root, "--out", tmp_path / "plain") == 0
    assert not list((tmp_path / "plain").rglob("probability.nii.gz"))


def test_run_json_says_when_with_what_and_how(run_infer, tiny_models, synthetic_root, tmp_path):
    import hashlib
    import json
    from datetime import datetime

    out = tmp_path / "out"
    assert run_infer(synthetic_root, "--out", out, "--precision", "float32") == 0
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    started, finished = (datetime.fromisoformat(run[k]) for k in ("started", "finished"))
    assert started.tzinfo is not None and started <= finished
    assert 0 < run["duration_s"] < 600
    models = run["models"]
    assert models["precision"] == "float32" and models["tta_flips"] is False
    assert 0 < models["stage1_threshold"] < 1 and models["mask_threshold"] == 0.5
    for model in tiny_models:
        for path in (model, model.with_suffix(".json")):
            assert models["files"][str(path.absolute())] == hashlib.sha256(
                path.read_bytes()).hexdigest()
    assert {"python", "tensorflow", "keras", "numpy", "simpleitk"} <= set(run["versions"])


def test_without_out_each_input_gets_its_own_folder(run_infer, synthetic_root, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    assert run_infer(patient) == 0
    assert run_infer(synthetic_root) == 0  # a second input never meets the first's OUT
    assert (tmp_path / "predictions" / patient.name / "patients.csv").is_file()
    assert (tmp_path / "predictions" / synthetic_root.name / "patients.csv").is_file()


def test_outputs_masks_writes_the_masks_and_tables_alone(run_infer, synthetic_root, tmp_path):
    full, lean = tmp_path / "full", tmp_path / "lean"
    assert run_infer(synthetic_root, "--out", full) == 0
    assert run_infer(synthetic_root, "--out", lean, "--outputs", "masks") == 0
    for patient in (p for p in lean.iterdir() if p.is_dir()):
        assert sorted(f.name for f in patient.iterdir() if not f.name.startswith(".")) == \
            ["mask.nii.gz"]
        assert (patient / "mask.nii.gz").read_bytes() == \
            (full / patient.name / "mask.nii.gz").read_bytes()
    for table in ("patients.csv", "slices.csv"):
        assert (lean / table).read_bytes() == (full / table).read_bytes()
    assert "viewer.html" not in (lean / "report.html").read_text(encoding="utf-8")
