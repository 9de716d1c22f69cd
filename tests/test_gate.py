"""Stage 1 on the U-Net's encoder: trunk weights, frozen blocks, the split U-Net, the tuned
gate, the shared-trunk inference and the refusal of a mismatched pair."""

import dataclasses

import keras
import numpy as np
import pytest

from bt_pipeline.models.gate import (
    build_gate,
    cut_layer_name,
    encoder_blocks,
    fingerprint,
)
from bt_pipeline.models.unet import build_unet, split_unet


@pytest.fixture()
def unet():
    keras.utils.set_random_seed(3)
    return build_unet(32, depth=2, base_filters=4)


def _batch(n=6, seed=0):
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


def _trunk_weights(model, names):
    return [w for name in names for w in model.get_layer(name).get_weights()]


def test_the_trunk_starts_as_the_unets_encoder(unet):
    gate = build_gate(unet, fine_tune_blocks=1)
    names = [layer.name for block in encoder_blocks(unet) for layer in block]
    assert [layer.name for block in encoder_blocks(unet)[:1] for layer in block][-1] == \
        "down0_pool"
    trunk = _trunk_weights(gate.frozen, [n for n in names if n.startswith("down")]) + \
        _trunk_weights(gate.head, [n for n in names if n.startswith("bottleneck")])
    for mine, theirs in zip(trunk, _trunk_weights(unet, names), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    frozen_features = gate.frozen.predict(_batch(), verbose=0)
    cut = keras.Model(unet.inputs, unet.get_layer(cut_layer_name(unet, 1)).output)
    np.testing.assert_allclose(frozen_features, cut.predict(_batch(), verbose=0), atol=1e-6)


@pytest.mark.parametrize("fine_tune", [0, 1])
def test_only_the_fine_tuned_blocks_and_the_head_change_in_a_fit(unet, fine_tune):
    before_unet = fingerprint(unet)
    gate = build_gate(unet, fine_tune_blocks=fine_tune)
    trunk_before = [w.copy() for w in gate.frozen.get_weights()]
    tuned_names = [layer.name for block in encoder_blocks(unet)[len(encoder_blocks(unet))
                                                                  - fine_tune:]
                   for layer in block]
    tuned_before = [w.copy() for w in _trunk_weights(gate.head, tuned_names)]
    gate.full.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    labels = np.array([0, 1, 0, 1, 1, 0], np.float32)[:, None]
    gate.full.fit(_batch(), labels, epochs=2, verbose=0)
    for before, after in zip(trunk_before, gate.frozen.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # batch-norm statistics included
    tuned_after = _trunk_weights(gate.head, tuned_names)
    changed = any(not np.array_equal(a, b) for a, b in zip(tuned_before, tuned_after,
                                                             strict=True))
    assert changed == (fine_tune > 0)
    assert fingerprint(unet) == before_unet  # the U-Net itself never trains


def test_split_unet_is_the_unet(unet):
    encoder, decoder = split_unet(unet, (cut_layer_name(unet, 1),))
    outputs = encoder.predict(_batch(), verbose=0)
    assert len(outputs) == 2 + 1 + 1  # two skips, the bottleneck, the extra output
    np.testing.assert_allclose(decoder.predict(outputs[:3], verbose=0),
                               unet.predict(_batch(), verbose=0), atol=1e-5)


def test_fingerprint_tells_unets_apart(unet):
    other = build_unet(32, depth=2, base_filters=4)
    assert fingerprint(unet) != fingerprint(other)
    other.set_weights(unet.get_weights())
    assert fingerprint(unet) == fingerprint(other)
    with pytest.raises(ValueError, match="fine_tune_blocks"):
        build_gate(unet, fine_tune_blocks=3)


@pytest.fixture(scope="module")
def tiny_gate(tiny_models, synthetic_root, synthetic_manifest, tmp_path_factory):
    """A gate tuned (2 trials x 2 epochs x 2 executions) on two cross-validation folds whose
    U-Nets are copies of the tiny U-Net, then shipped on the tiny U-Net's encoder."""
    import shutil

    from bt_pipeline.cli import main
    from bt_pipeline.training.cross_validation import fold_model

    out = tmp_path_factory.mktemp("gate")
    for fold in TRAINED_FOLDS:
        target = fold_model(out / "cv", "tiny", fold)
        target.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".keras", ".json"):
            shutil.copyfile(tiny_models[1].with_suffix(suffix), target.with_suffix(suffix))
    assert main(["tune", "--gate", "--trunk", str(tiny_models[1]), "--recipe", "tiny",
                 "--cv-dir", str(out / "cv"), "--data-dir", str(synthetic_root),
                 "--manifest", str(synthetic_manifest), "--trials", "2", "--epochs", "2",
                 "--executions", "2", "--out-dir", str(out), "--work-dir", str(out / "work"),
                 "--ship-to", str(out / "gate.keras")]) == 0
    return out


TRAINED_FOLDS = (0, 2)


def test_gate_search_records_its_budget_and_ships_a_gate_for_this_unet(tiny_gate, tiny_models,
                                                                      synthetic_manifest):
    import json

    import pandas as pd

    from bt_pipeline.data.manifest import read_manifest

    trials = pd.read_csv(tiny_gate / "trials.csv")
    assert len(trials) == 2 and set(trials["epochs"]) == {2} and set(trials["executions"]) == {2}
    assert set(trials["folds"]) == {len(TRAINED_FOLDS)}
    assert {"fine_tune_blocks", "dropout_features", "dense_units", "learning_rate",
            "best_epoch"} <= set(trials.columns)
    written = json.loads((tiny_gate / "gate.json").read_text())
    unet = keras.saving.load_model(tiny_models[1], compile=False)
    assert written["type"] == "GateConfig" and written["unet_fingerprint"] == fingerprint(unet)
    assert written["epochs"] in set(trials["best_epoch"])  # trained for the search's best epoch
    assert written["extra"]["trial_seconds_total"] == pytest.approx(trials["seconds"].sum(),
                                                                    abs=0.1)
    metrics = pd.read_csv(tiny_gate / "gate_metrics.csv")
    assert metrics["patients"].str.startswith(("cv held-out", "test")).all()
    # every held-out probability comes from the gate of the patient's own fold
    held_out = pd.read_csv(tiny_gate / "cv" / "tiny" / "gate_heldout.csv")
    manifest = read_manifest(synthetic_manifest)
    expected = manifest[manifest["fold"].isin(TRAINED_FOLDS)]
    assert len(held_out) == len(expected) and set(held_out["fold"]) == set(TRAINED_FOLDS)
    for fold in TRAINED_FOLDS:
        fold_gate = json.loads((tiny_gate / "cv" / "tiny" / "models" /
                                f"gate_fold{fold}.json").read_text())
        assert fold_gate["threshold"] == pytest.approx(written["threshold"])
        assert fold_gate["unet_fingerprint"] == fingerprint(unet)


def test_a_resumed_search_ships_the_seconds_of_every_trial(tiny_gate, tiny_models,
                                                          synthetic_root, synthetic_manifest):
    import json

    from bt_pipeline.cli import main

    first = json.loads((tiny_gate / "gate.json").read_text())["extra"]
    # the same search again: Keras Tuner reruns no finished trial
    assert main(["tune", "--gate", "--trunk", str(tiny_models[1]), "--recipe", "tiny",
                 "--cv-dir", str(tiny_gate / "cv"), "--data-dir", str(synthetic_root),
                 "--manifest", str(synthetic_manifest), "--trials", "2", "--epochs", "2",
                 "--executions", "2", "--out-dir", str(tiny_gate / "again"),
                 "--work-dir", str(tiny_gate / "work"),
                 "--ship-to", str(tiny_gate / "again" / "gate.keras")]) == 0
    resumed = json.loads((tiny_gate / "again" / "gate.json").read_text())["extra"]
    assert resumed["trial_seconds_total"] == pytest.approx(first["trial_seconds_total"])


def test_folds_only_trains_the_fold_gates_and_ships_nothing(tiny_gate, tmp_path,
                                                           synthetic_root, synthetic_manifest):
    import shutil

    import pandas as pd

    from bt_pipeline.cli import main

    cv = tmp_path / "cv"
    shutil.copytree(tiny_gate / "cv" / "tiny" / "models", cv / "tiny" / "models",
                    ignore=shutil.ignore_patterns("gate_*"))
    # no --trunk: a candidate recipe has fold U-Nets and no all-patient one yet
    assert main(["tune", "--gate", "--folds-only", "--recipe", "tiny", "--cv-dir", str(cv),
                 "--data-dir", str(synthetic_root), "--manifest", str(synthetic_manifest),
                 "--trials", "2", "--epochs", "2", "--executions", "2",
                 "--out-dir", str(tmp_path / "out"), "--work-dir", str(tiny_gate / "work"),
                 "--ship-to", str(tmp_path / "gate.keras")]) == 0
    assert not (tmp_path / "gate.keras").exists()
    assert {f"gate_fold{fold}.keras" for fold in TRAINED_FOLDS} <= {
        path.name for path in (cv / "tiny" / "models").iterdir()}
    metrics = pd.read_csv(tmp_path / "out" / "gate_metrics.csv")
    assert list(metrics["patients"].str[:11]) == ["cv held-out"]


def test_retrain_from_an_earlier_gate_trains_its_head_without_a_search(
        tiny_gate, tiny_models, tmp_path, synthetic_root, synthetic_manifest):
    import json
    import shutil

    from bt_pipeline.cli import main

    cv = tmp_path / "cv"
    shutil.copytree(tiny_gate / "cv" / "tiny" / "models", cv / "tiny" / "models",
                    ignore=shutil.ignore_patterns("gate_*"))
    earlier = tiny_gate / "gate.json"
    common = ["tune", "--gate", "--recipe", "tiny", "--cv-dir", str(cv),
              "--data-dir", str(synthetic_root), "--manifest", str(synthetic_manifest),
              "--retrain-from", str(earlier), "--out-dir", str(tmp_path / "out"),
              "--work-dir", str(tmp_path / "no_search"), "--ship-to", str(tmp_path / "g.keras")]
    assert main([*common, "--folds-only"]) == 0
    assert not (tmp_path / "no_search").exists()  # no Keras Tuner project: no search ran
    fold_json = json.loads((cv / "tiny" / "models" / "gate_fold0.json").read_text())
    head = json.loads(earlier.read_text())
    for field in ("dense_units", "dense_activation", "learning_rate", "epochs"):
        assert fold_json[field] == head[field]
    stamp = (cv / "tiny" / "models" / "gate_fold0.keras").stat().st_mtime_ns
    assert main([*common, "--trunk", str(tiny_models[1]), "--shipped-only"]) == 0
    shipped = json.loads((tmp_path / "g.json").read_text())
    assert shipped["threshold"] == pytest.approx(fold_json["threshold"])
    assert (cv / "tiny" / "models" / "gate_fold0.keras").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("tta_flips", [False, True])
def test_shared_trunk_gives_the_masks_of_separate_stages(tiny_gate, tiny_models,
                                                         synthetic_root, tta_flips):
    from bt_pipeline.data.layout import scan_inputs
    from bt_pipeline.data.preprocess import read_image
    from bt_pipeline.inference.predictor import TwoStagePredictor

    shared, separate = (TwoStagePredictor.load(tiny_gate / "gate.keras", tiny_models[1],
                                               tta_flips=tta_flips) for _ in range(2))
    separate._shared = None
    shared.classifier_config = separate.classifier_config = dataclasses.replace(
        shared.classifier_config, threshold=0.3)  # some slices pass, some do not
    assert shared._shared is not None
    scans, _ = scan_inputs([synthetic_root])
    gated = []
    for scan in scans[:4]:
        images = [read_image(path) for _, path, _ in scan.slices]
        p1, m1 = shared.predict(images)
        p2, m2 = separate.predict(images)
        np.testing.assert_allclose(p1, p2, atol=1e-5)
        for a, b in zip(m1, m2, strict=True):
            np.testing.assert_array_equal(a, b)
        gated.extend(p1 >= 0.3)
    assert 0 < sum(gated) < len(gated), "the comparison needs passed and stopped slices"
    # the maps themselves, before thresholding: mirrored copies averaged in, or not
    _, chosen, maps = shared._through_shared_trunk(images)
    assert len(chosen), "the last scan needs passed slices"
    plain = dataclasses.replace(separate, tta_flips=False).mask_probabilities(images, chosen)
    for a, b, c in zip(maps, separate.mask_probabilities(images, chosen), plain, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert (np.abs(a - c).max() > 1e-4) == tta_flips
    # a batch in which the gate passes nothing goes through the same graph
    shared.classifier_config = dataclasses.replace(shared.classifier_config, threshold=1.1)
    _, masks = shared.predict(images)
    assert len(masks) == len(images) and not any(mask.any() for mask in masks)


def test_a_gate_on_another_unet_is_refused(tiny_gate, tiny_models, tmp_path, synthetic_root,
                                          capsys):
    import shutil

    from bt_pipeline.cli import main

    other = build_unet(32, depth=2, base_filters=8)  # the tiny U-Net's design, other weights
    other.save(tmp_path / "other.keras")
    shutil.copy(tiny_models[1].with_suffix(".json"), tmp_path / "other.json")
    code = main(["infer", str(synthetic_root), "--out", str(tmp_path / "out"), "--classifier",
                 str(tiny_gate / "gate.keras"), "--unet", str(tmp_path / "other.keras"),
                 "--quiet"])
    assert code == 2
    assert "built on another U-Net" in capsys.readouterr().err


def test_the_cross_validation_gates_each_fold_with_its_own_gate(tiny_gate, tiny_models,
                                                                synthetic_root,
                                                                synthetic_manifest):
    from bt_pipeline.config import GateConfig, UNetConfig
    from bt_pipeline.data.manifest import read_manifest
    from bt_pipeline.evaluation.cv_report import score_fold

    manifest = read_manifest(synthetic_manifest)
    for fold in TRAINED_FOLDS:
        patients, _, _, predictor = score_fold("tiny", fold, manifest, str(synthetic_root),
                                               tiny_gate / "cv", tiny_models[0], UNetConfig())
        assert isinstance(predictor.classifier_config, GateConfig)
        assert set(patients["split"]) == {f"fold{fold}"}


@pytest.mark.parametrize("choices", [(0,), (1,), (0, 1)])
def test_a_search_may_offer_any_set_of_fine_tune_depths(choices):
    import keras_tuner

    from bt_pipeline.training.tune_gate import gate_kwargs_from_hp

    kwargs = gate_kwargs_from_hp(keras_tuner.HyperParameters(), choices)
    assert kwargs["fine_tune_blocks"] == min(choices)
