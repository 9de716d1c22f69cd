"""Cross-validation folds: who trains and who is held out, finished folds kept, bf16 training
shipping a float32 model, a fixed schedule without validation."""

import dataclasses
import json
import re
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from bt_pipeline.config import SHIPPED_UNET, DataConfig, UNetConfig
from bt_pipeline.data.manifest import NO_FOLD, read_manifest
from bt_pipeline.training.cross_validation import (
    ALL,
    SHIPPED_RECIPE,
    Recipe,
    fold_dir,
    fold_model,
    fold_patients,
    inner_split,
    train_fold,
)


def test_each_fold_holds_out_its_patients_and_never_a_test_patient(synthetic_manifest):
    manifest = read_manifest(synthetic_manifest)
    per_patient = manifest.drop_duplicates("patient_id").set_index("patient_id")
    development = set(per_patient.index[per_patient["fold"] != NO_FOLD])
    held_out_once = []
    for fold in range(5):
        train, held_out = fold_patients(manifest, fold)
        assert not set(train) & set(held_out)
        assert set(train) | set(held_out) == development
        held_out_once += held_out
    assert sorted(held_out_once) == sorted(development)
    train, _ = fold_patients(manifest, 0)
    fit, val = inner_split(manifest, train, 0.25, seed=1)
    assert sorted(fit + val) == sorted(train) and val and not set(fit) & set(val)
    assert inner_split(manifest, train, 0.0, seed=1) == (sorted(train), [])


def test_finished_folds_are_kept_and_bf16_training_ships_float32(synthetic_root,
                                                                 synthetic_manifest, tmp_path):
    recipe = Recipe("tiny", UNetConfig(image_size=32, depth=2, base_filters=4, epochs=1, seed=1,
                                       precision="mixed_bfloat16"),
                    DataConfig(image_size=32, batch_size=8, cache_dir="", seed=1), 0.25)
    runs, models = tmp_path / "runs", tmp_path / "reports"
    first = train_fold(recipe, 0, str(synthetic_root), str(synthetic_manifest), runs, models,
                       verbose=0)
    assert first == models / "tiny" / "models" / "fold0.keras"
    stamp = first.stat().st_mtime_ns
    # a fold killed before it shipped leaves a run folder and no model: it is trained on rerun
    fold_dir(runs, "tiny", 1).mkdir(parents=True)
    for fold in (0, 1):
        train_fold(recipe, fold, str(synthetic_root), str(synthetic_manifest), runs, models,
                   verbose=0)
    assert first.stat().st_mtime_ns == stamp  # fold 0 was not trained again
    assert (models / "tiny" / "models" / "fold1.keras").is_file()
    log = pd.read_csv(fold_dir(runs, "tiny", 0) / "log.csv")
    assert len(log) == 1
    # the shipped JSON names the patients the weights learnt from: the fold's training
    # patients less its inner validation set, never a held-out one
    training, held_out = fold_patients(read_manifest(synthetic_manifest), 0)
    learnt = json.loads(first.with_suffix(".json").read_text())["extra"]["trained_on_patients"]
    assert learnt == sorted(learnt) and 0 < len(learnt) < len(training)
    assert set(learnt) <= set(training) and not set(learnt) & set(held_out)

    model = keras.saving.load_model(first, compile=False)
    assert {layer.dtype_policy.name for layer in model.layers[1:]} == {"float32"}
    batch = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    out = model.predict(batch, verbose=0)
    assert out.dtype == np.float32 and out.shape == (2, 32, 32, 1)
    trained = keras.saving.load_model(fold_dir(runs, "tiny", 0) / "best.keras", compile=False)
    assert trained.layers[1].dtype_policy.name == "mixed_bfloat16"  # it did train in bf16
    np.testing.assert_allclose(out, trained.predict(batch, verbose=0), atol=0.02)


def test_a_fixed_schedule_trains_without_validation_and_ships_the_last_epoch(
        synthetic_root, synthetic_manifest, tmp_path):
    recipe = Recipe("fixed-tiny", UNetConfig(image_size=32, depth=2, base_filters=4, epochs=2,
                                             seed=1, schedule="cosine", loss="bce_dice"),
                    DataConfig(image_size=32, batch_size=8, cache_dir="", seed=1,
                               missing_sequence_p=0.5, gamma_range=0.3), 0.0)
    runs = tmp_path / "runs"
    shipped = train_fold(recipe, 0, str(synthetic_root), str(synthetic_manifest), runs,
                         tmp_path / "reports", verbose=0)
    run = fold_dir(runs, "fixed-tiny", 0)
    assert shipped.is_file() and not (run / "best.keras").exists()
    log = pd.read_csv(run / "log.csv")
    assert len(log) == 2 and log["val_loss"].isna().all()  # nothing was validated
    written = json.loads(shipped.with_suffix(".json").read_text())
    assert written["schedule"] == "cosine" and "best_val_dice" not in written["extra"]
    assert written["extra"]["data"]["missing_sequence_p"] == 0.5


def test_mean_sem_and_paired_difference_against_hand_computed_values():
    from bt_pipeline.evaluation.cv_report import mean_and_sem, paired_difference

    patients = pd.DataFrame({"patient_id": ["a", "b", "c", "d"],
                             "institution": ["CS", "CS", "DU", "DU"],
                             "dice_unet": [0.8, 0.6, 0.9, 0.7],
                             "dice_pipeline": [0.8, 0.5, 0.9, 0.6]})
    pooled = mean_and_sem(patients).iloc[0]
    assert pooled["dice_unet_mean"] == np.float64(0.75)
    assert np.isclose(pooled["dice_unet_sem"], np.std([0.8, 0.6, 0.9, 0.7], ddof=1) / 2)
    by = mean_and_sem(patients, "institution").set_index("institution")
    assert np.isclose(by.loc["CS", "dice_pipeline_mean"], 0.65) and by.loc["DU", "n"] == 2
    other = patients.assign(dice_unet=[0.7, 0.6, 0.8, 0.5])  # differences 0.1, 0, 0.1, 0.2
    diff = paired_difference(patients, other, "dice_unet")
    assert diff["patients"] == 4 and np.isclose(diff["mean_difference"], 0.1)
    assert np.isclose(diff["sem"], np.std([0.1, 0.0, 0.1, 0.2], ddof=1) / 2)


def test_gate_floors_cut_every_fold_gate_where_the_threshold_rule_would(tiny_models):
    import numpy as np

    from bt_pipeline.evaluation.cv_report import gate_floors
    from bt_pipeline.evaluation.scoring import PatientPrediction, score_split
    from bt_pipeline.inference.predictor import TwoStagePredictor

    predictor = TwoStagePredictor.load(*tiny_models)
    predictor.classifier_config = dataclasses.replace(predictor.classifier_config,
                                                      threshold=0.6)
    truths = [np.zeros((16, 16), bool) for _ in range(4)]
    maps = [np.zeros((16, 16), np.float32) for _ in range(4)]
    for k in range(3):  # three tumour slices, each found by the U-Net
        truths[k][2:6, 2:6] = maps[k][2:6, 2:6] = True
    maps[3][8:12, 8:12] = 0.9  # a false alarm on the tumour-free slice
    rows = pd.DataFrame({"patient_id": ["p"] * 4, "institution": ["CS"] * 4,
                         "slice": [1, 2, 3, 4], "n_slices": [4] * 4})
    prediction = PatientPrediction(rows=rows, truths=truths, maps=maps,
                                   probabilities=np.array([0.9, 0.5, 0.2, 0.1]))
    own = score_split(predictor, [prediction], "fold0")[0]
    assert own["dice_pipeline"].iloc[0] == pytest.approx(2 * 16 / (16 + 48))
    table = gate_floors([(own, None, [prediction], predictor)], floors=(0.5, 1.0))
    # floor 0.5 may miss one of three: half-way from 0.5 down to 0.2; 1.0 misses none
    assert table["threshold"].tolist() == pytest.approx([0.35, 0.15])
    assert table["slices_passed"].tolist() == pytest.approx([0.5, 0.75])
    assert table["dice_pipeline_mean"].tolist() == pytest.approx([2 * 32 / (32 + 48), 1.0])
    assert table["vs_own_threshold"].iloc[1] == pytest.approx(1.0 - 2 * 16 / (16 + 48))
    assert predictor.classifier_config.threshold == 0.6  # the predictor itself is untouched


def test_cv_report_scores_each_trained_fold_on_its_own_patients(synthetic_root,
                                                                 synthetic_manifest,
                                                                 tiny_models, tmp_path):
    from bt_pipeline.cli import main

    recipe = Recipe("tiny", UNetConfig(image_size=32, depth=2, base_filters=4, epochs=1, seed=1),
                    DataConfig(image_size=32, batch_size=8, cache_dir="", seed=1), 0.25)
    runs, out = tmp_path / "runs", tmp_path / "cv"
    train_fold(recipe, 0, str(synthetic_root), str(synthetic_manifest), runs, out, verbose=0)
    (out / "baseline").mkdir()
    (out / "baseline" / "models").symlink_to(out / "tiny" / "models", target_is_directory=True)
    assert main(["cv", "--no-train", "--data-dir", str(synthetic_root), "--manifest",
                 str(synthetic_manifest), "--runs-dir", str(runs), "--classifier",
                 str(tiny_models[0]), "--rule-from", str(tiny_models[1]), "--out",
                 str(out)]) == 0
    patients = pd.read_csv(out / "baseline" / "patients.csv")
    _, held_out = fold_patients(read_manifest(synthetic_manifest), 0)
    assert sorted(patients["patient_id"]) == held_out and set(patients["split"]) == {"fold0"}
    summary = (out / "baseline" / "summary.md").read_text()
    assert "folds not yet trained: 1, 2, 3, 4" in summary
    assert (out / "baseline" / "dice_per_patient.png").stat().st_size > 0

    # post-processing chosen on the held-out predictions, written into the candidate's JSON,
    # and the report scored under that choice, not under the rule it was run with (37 pixels
    # is no rule the sweep offers); FLAIR-only scoring goes to a report of its own
    candidate = tmp_path / "candidate.keras"
    config = json.loads(tiny_models[1].with_suffix(".json").read_text())
    candidate.with_suffix(".json").write_text(json.dumps({**config, "min_component_pixels": 37}))
    assert main(["cv", "--no-train", "--data-dir", str(synthetic_root), "--manifest",
                 str(synthetic_manifest), "--runs-dir", str(runs), "--classifier",
                 str(tiny_models[0]), "--rule-from", str(candidate), "--out", str(out),
                 "--write-postprocessing", str(candidate)]) == 0
    shipped = json.loads(candidate.with_suffix(".json").read_text())
    written = shipped["extra"]["postprocessing"]
    assert written["chosen_on"] == f"cv:baseline folds 0 ({len(held_out)} held-out patients)"
    assert (f"min_component_pixels={shipped['min_component_pixels']}, "
            f"keep_largest_3d={shipped['keep_largest_3d']} "
            f"(sized by {shipped['largest_3d_by']});") in \
        (out / "baseline" / "summary.md").read_text()
    sweep = pd.read_csv(out / "baseline" / "postprocessing_sweep.csv")
    assert set(sweep["keep_largest_3d"]) == {False, True}
    assert set(sweep.loc[sweep["keep_largest_3d"], "largest_3d_by"]) == {"voxels", "gate"}
    assert main(["cv", "--no-train", "--flair-only", "--data-dir", str(synthetic_root),
                 "--manifest", str(synthetic_manifest), "--runs-dir", str(runs),
                 "--classifier", str(tiny_models[0]), "--rule-from", str(tiny_models[1]),
                 "--out", str(out)]) == 0
    assert "FLAIR-only input" in (out / "baseline" / "flair_only" / "summary.md").read_text()
    # mirrored copies averaged in, where the rule's JSON does not: a report of its own
    before = (out / "baseline" / "patients.csv").read_text()
    assert main(["cv", "--no-train", "--tta-flips", "--data-dir", str(synthetic_root),
                 "--manifest", str(synthetic_manifest), "--runs-dir", str(runs),
                 "--classifier", str(tiny_models[0]), "--rule-from", str(tiny_models[1]),
                 "--out", str(out)]) == 0
    assert "(flip TTA): yes" in (out / "baseline" / "tta_flips" / "summary.md").read_text()
    assert (out / "baseline" / "patients.csv").read_text() == before
    assert main(["cv", "--no-train", "--tta-flips", "--data-dir", str(synthetic_root),
                 "--manifest", str(synthetic_manifest), "--classifier", str(tiny_models[0]),
                 "--rule-from", str(tiny_models[1]), "--out", str(out),
                 "--write-postprocessing", str(candidate)]) == 2

    # a rule taken from --rule-from's JSON files the report where --intensity would, not
    # beside the reports scored on raw intensities
    ruled = tmp_path / "ruled.json"
    config = json.loads(tiny_models[1].with_suffix(".json").read_text())
    ruled.write_text(json.dumps({**config, "intensity": "volume_p99"}))
    raw_summary = (out / "baseline" / "summary.md").read_text()
    assert main(["cv", "--no-train", "--data-dir", str(synthetic_root), "--manifest",
                 str(synthetic_manifest), "--runs-dir", str(runs), "--classifier",
                 str(tiny_models[0]), "--rule-from", str(ruled.with_suffix(".keras")),
                 "--out", str(out)]) == 0
    assert "intensity rule volume_p99" in \
        (out / "baseline" / "intensity_volume_p99" / "summary.md").read_text()
    assert (out / "baseline" / "summary.md").read_text() == raw_summary

    # another run of the same folds, paired patient by patient with this one
    other = tmp_path / "other_run.csv"
    patients.assign(dice_unet=patients["dice_unet"] - 0.25).to_csv(other, index=False)
    assert main(["cv", "--no-train", "--data-dir", str(synthetic_root), "--manifest",
                 str(synthetic_manifest), "--runs-dir", str(runs), "--classifier",
                 str(tiny_models[0]), "--rule-from", str(tiny_models[1]), "--out", str(out),
                 "--against", str(other)]) == 0
    summary = (out / "baseline" / "summary.md").read_text()
    assert f"this run minus `{other}`" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| dice_unet |"))
    assert f"| {len(held_out)} | 0.25 |" in row


def test_the_candidate_to_ship_trains_on_every_development_patient(synthetic_root,
                                                                    synthetic_manifest, tmp_path,
                                                                    monkeypatch):
    from bt_pipeline.cli import main
    from bt_pipeline.data.manifest import read_manifest
    from bt_pipeline.training import cross_validation
    from bt_pipeline.training.cross_validation import development_patients

    manifest = read_manifest(synthetic_manifest)
    everyone = set(development_patients(manifest))
    for fold in range(5):
        training, held_out = fold_patients(manifest, fold)
        assert set(training) | set(held_out) == everyone
    assert not everyone & set(manifest.loc[manifest["fold"] == -1, "patient_id"])
    recipe = Recipe("fixed-tiny", UNetConfig(image_size=32, depth=2, base_filters=4, epochs=1,
                                             seed=1, schedule="cosine"),
                    DataConfig(image_size=32, batch_size=8, cache_dir="", seed=1), 0.0)
    monkeypatch.setitem(cross_validation.RECIPES, "fixed", lambda precision: recipe)
    target = tmp_path / "weights" / "unet.keras"
    assert main(["cv", "--all", "--recipe", "fixed", "--data-dir", str(synthetic_root),
                 "--manifest", str(synthetic_manifest), "--runs-dir", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "reports"), "--ship-to", str(target)]) == 0
    trained = tmp_path / "reports" / "fixed-tiny" / "models" / "all.keras"
    assert (tmp_path / "runs" / "fixed-tiny" / "all" / "log.csv").is_file()
    assert target.read_bytes() == trained.read_bytes()
    assert target.with_suffix(".json").read_text() == trained.with_suffix(".json").read_text()


def test_a_second_run_of_a_recipe_changes_only_its_seeds():
    from bt_pipeline.training.cross_validation import fixed_recipe, with_seed

    recipe, other = fixed_recipe(), with_seed(fixed_recipe(), 7)
    assert (other.unet.seed, other.data.seed) == (7, 7)
    assert dataclasses.replace(other.unet, seed=recipe.unet.seed) == recipe.unet
    assert dataclasses.replace(other.data, seed=recipe.data.seed) == recipe.data
    assert (other.name, other.inner_val_fraction) == (recipe.name, recipe.inner_val_fraction)


def test_a_continuing_recipe_starts_from_the_same_fold_of_the_recipe_it_continues(
        synthetic_root, synthetic_manifest, tmp_path):
    import pytest

    unet = UNetConfig(image_size=32, depth=2, base_filters=4, epochs=1, seed=1,
                      batch_norm=False, schedule="cosine")
    data = DataConfig(image_size=32, batch_size=8, cache_dir="", seed=1)
    first = Recipe("first-tiny", unet, data, 0.0)
    # a rate too small to move a weight: the continued model is the one it started from
    second = Recipe("second-tiny", dataclasses.replace(unet, learning_rate=1e-12, seed=2),
                    data, 0.0, continues="first-tiny")
    runs, models = tmp_path / "runs", tmp_path / "reports"
    args = (str(synthetic_root), str(synthetic_manifest), runs, models)
    with pytest.raises(FileNotFoundError, match="first-tiny"):
        train_fold(second, 0, *args, verbose=0)
    start = train_fold(first, 0, *args, verbose=0)
    continued = train_fold(second, 0, *args, verbose=0)
    written = json.loads(continued.with_suffix(".json").read_text())
    assert written["init_from"] == str(start)
    training, _ = fold_patients(read_manifest(synthetic_manifest), 0)
    assert written["extra"]["trained_on_patients"] == sorted(training)
    for before, after in zip(keras.saving.load_model(start, compile=False).get_weights(),
                             keras.saving.load_model(continued, compile=False).get_weights(),
                             strict=True):
        np.testing.assert_allclose(after, before, atol=1e-6)


def test_a_continued_model_lists_the_patients_of_the_model_it_started_from(tmp_path):
    from types import SimpleNamespace

    from bt_pipeline.training.train_unet import _trained_on

    source = tmp_path / "start.keras"
    source.with_suffix(".json").write_text(json.dumps({"extra": {
        "trained_on_patients": ["TCGA_AA_0001", "TCGA_BB_0002"]}}))
    this_run = SimpleNamespace(rows=pd.DataFrame({"patient_id": ["TCGA_CC_0003"] * 2}))
    assert _trained_on(this_run, str(source)) == ["TCGA_AA_0001", "TCGA_BB_0002",
                                                  "TCGA_CC_0003"]
    assert _trained_on(this_run, "") == ["TCGA_CC_0003"]
    # a start whose JSON predates the list: this run's patients, all that is known
    (tmp_path / "older.json").write_text(json.dumps({"extra": {}}))
    assert _trained_on(this_run, str(tmp_path / "older.keras")) == ["TCGA_CC_0003"]


def test_the_longer_recipe_is_fixed_restarted_at_half_its_rate_with_fresh_draws():
    from bt_pipeline.training.cross_validation import fixed_recipe, longer_recipe

    first, second = fixed_recipe(), longer_recipe()
    assert second.continues == first.name
    assert second.unet.learning_rate == first.unet.learning_rate / 2
    assert dataclasses.replace(second.unet, learning_rate=first.unet.learning_rate) == first.unet
    assert second.data.seed != first.data.seed
    assert dataclasses.replace(second.data, seed=first.data.seed) == first.data


def test_longer_standardised_continues_longer_under_the_intensity_rule_at_half_its_rate():
    from bt_pipeline.training.cross_validation import longer_recipe, longer_standardised_recipe

    second, third = longer_recipe(), longer_standardised_recipe()
    assert third.continues == second.name
    assert third.unet.learning_rate == second.unet.learning_rate / 2
    assert third.unet.intensity == third.data.intensity == "volume_p99"
    assert dataclasses.replace(third.unet, learning_rate=second.unet.learning_rate,
                               intensity=second.unet.intensity) == second.unet
    assert third.data.seed not in (second.data.seed, second.data.seed - 1)
    assert dataclasses.replace(third.data, seed=second.data.seed,
                               intensity=second.data.intensity) == second.data


def test_four_cycles_repeats_the_third_cycle_with_fresh_draws():
    from bt_pipeline.training.cross_validation import (
        four_cycles_recipe,
        longer_standardised_recipe,
    )

    third, fourth = longer_standardised_recipe(), four_cycles_recipe()
    assert fourth.continues == third.name and fourth.unet == third.unet
    assert fourth.data.seed == third.data.seed + 1
    assert dataclasses.replace(fourth.data, seed=third.data.seed) == third.data


def test_five_cycles_repeats_the_fourth_cycle_with_fresh_draws():
    from bt_pipeline.training.cross_validation import five_cycles_recipe, four_cycles_recipe

    fourth, fifth = four_cycles_recipe(), five_cycles_recipe()
    assert fifth.continues == fourth.name and fifth.unet == fourth.unet
    assert fifth.data.seed == fourth.data.seed + 1
    assert dataclasses.replace(fifth.data, seed=fourth.data.seed) == fourth.data


def test_polished_fine_tunes_four_cycles_without_augmentation_at_a_lower_rate():
    from bt_pipeline.training.cross_validation import RECIPES, four_cycles_recipe, polished_recipe

    fourth, polished = four_cycles_recipe(), polished_recipe()
    assert RECIPES["polished"] is polished_recipe and polished.continues == fourth.name
    assert not polished.data.augment and fourth.data.augment
    assert polished.unet.epochs == 12 and polished.unet.schedule == "cosine"
    assert polished.unet.learning_rate == fourth.unet.learning_rate / 8
    assert dataclasses.replace(polished.unet, epochs=fourth.unet.epochs,
                               learning_rate=fourth.unet.learning_rate) == fourth.unet
    assert polished.inner_val_fraction == 0.0


def test_the_shipped_unet_is_the_shipped_recipes_all_patient_model_and_make_agrees():
    """`make train-unet` ships reports/cv/<UNET_RECIPE>/models/all.keras; the CLI defaults name
    the same recipe, so a gate search or study without --recipe reads the shipped U-Net's folds."""
    makefile = Path("Makefile").read_text(encoding="utf-8")
    assert re.search(r"^UNET_RECIPE \?= (\S+)$", makefile, re.M).group(1) == SHIPPED_RECIPE
    all_patients = fold_model(Path("reports/cv"), SHIPPED_RECIPE, ALL)
    assert Path(SHIPPED_UNET).read_bytes() == all_patients.read_bytes()


def test_make_postprocess_pairs_the_shipped_recipe_with_a_report_that_exists():
    """`make postprocess` rewrites the shipped recipe's CV report, paired against the recipe
    shipped before it; a path the reports' layout no longer has would fail after the scoring."""
    import subprocess

    dry_run = subprocess.run(["make", "-n", "postprocess"], capture_output=True, text=True,
                             check=True).stdout
    against = re.search(r"--against (\S+)", dry_run).group(1)
    assert Path(against).is_file(), against
    assert f"/{SHIPPED_RECIPE}/" not in against  # paired with itself, the report says nothing
