"""Post-processing rules, the choice among them, and the choice written into a model's JSON."""

import json

import pandas as pd
import pytest


def test_postprocessing_is_adopted_only_when_it_helps_on_val():
    from bt_pipeline.inference.postprocess import choose_postprocessing

    def sweep(dice_by_setting):
        return pd.DataFrame([{"mask_threshold": 0.5, "classifier_threshold": 0.3,
                              "min_component_pixels": px, "keep_largest_3d": largest,
                              "largest_3d_by": by, "dice_pipeline_mean": d}
                             for (px, largest, *by), d in dice_by_setting.items()
                             for by in (by or ["voxels"])])

    def rule(table):
        choice = choose_postprocessing(table, 0.3, "val")
        return choice.min_component_pixels, choice.keep_largest_3d, choice.gain

    assert rule(sweep({(0, False): 0.80, (50, False): 0.83, (100, False): 0.82,
                       (0, True): 0.81})) == (50, False, pytest.approx(0.03))
    assert rule(sweep({(0, False): 0.80, (50, False): 0.81,
                       (0, True): 0.82})) == (0, True, pytest.approx(0.02))
    assert rule(sweep({(0, False): 0.80, (50, False): 0.802, (0, True): 0.803}))[:2] == (0, False)
    assert rule(sweep({(0, False): 0.80, (50, False): 0.70}))[:2] == (0, False)
    weighted = choose_postprocessing(sweep({(0, False): 0.80, (0, True, "voxels"): 0.82,
                                            (0, True, "gate"): 0.83}), 0.3, "cv")
    assert (weighted.keep_largest_3d, weighted.largest_3d_by) == (True, "gate")
    assert choose_postprocessing(sweep({(0, False): 0.80, (0, True, "gate"): 0.801}), 0.3,
                                 "cv").largest_3d_by == "voxels"  # not adopted: the default


def test_only_the_largest_3d_component_is_kept():
    import numpy as np

    from bt_pipeline.inference.postprocess import keep_largest_component_3d

    volume = np.zeros((4, 10, 10), np.uint8)
    volume[0:2, 1:4, 1:4] = 1  # 18 voxels over two slices
    volume[2, 4, 4] = 1  # touches the block only diagonally across slices: 26-connected
    volume[3, 7:9, 7:9] = 1  # 4 voxels, apart
    kept = keep_largest_component_3d(volume)
    assert kept.dtype == np.uint8 and kept.sum() == 19 and kept[3].sum() == 0
    assert keep_largest_component_3d(np.zeros((2, 5, 5), bool)).sum() == 0
    single = np.zeros((1, 5, 5), bool)
    single[0, 1, 1] = True
    assert keep_largest_component_3d(single).sum() == 1


def test_gate_weighting_keeps_the_component_the_gate_is_sure_of():
    """Sized by voxels the big block on doubtful slices wins; weighted by each slice's gate
    probability the smaller block on slices the gate is sure of wins."""
    import numpy as np

    from bt_pipeline.inference.postprocess import finish_volume, keep_largest_component_3d

    volume = np.zeros((5, 10, 10), np.uint8)
    volume[0:2, 0:5, 0:5] = 1  # 50 voxels on slices 0-1
    volume[3:5, 6:9, 6:9] = 1  # 18 voxels on slices 3-4
    gate = np.array([0.2, 0.3, 0.9, 0.99, 0.98])
    assert keep_largest_component_3d(volume)[0].sum() == 25
    by_gate = keep_largest_component_3d(volume, gate)
    assert by_gate[0:2].sum() == 0 and by_gate[3:5].sum() == 18
    masks = finish_volume(list(volume), True, gate)
    assert [int(m.sum()) for m in masks] == [0, 0, 0, 9, 9]
    with_none = finish_volume([None, *volume[1:]], True, gate)  # slice 0 not let through
    assert with_none[0] is None and int(with_none[1].sum()) == 0



def test_labelling_inside_the_bounding_box_keeps_what_the_whole_volume_would():
    """The rule labels only the masks' bounding box; on random volumes, with and without
    slice weights, components touching the edges and ties, it keeps exactly the component that
    labelling the whole volume keeps."""
    import numpy as np
    from scipy import ndimage

    from bt_pipeline.inference.postprocess import keep_largest_component_3d

    def whole_volume(volume, weights):
        labels, count = ndimage.label(volume, structure=np.ones((3, 3, 3), bool))
        if count <= 1:
            return labels > 0
        per_voxel = None if weights is None else np.broadcast_to(
            np.asarray(weights, np.float64)[:, None, None], labels.shape).ravel()
        sizes = np.bincount(labels.ravel(), weights=per_voxel)[1:]
        return labels == 1 + int(np.argmax(sizes))

    rng = np.random.default_rng(3)
    for case in range(200):
        shape = tuple(int(v) for v in rng.integers(1, (7, 12, 12)))
        volume = rng.random(shape) < rng.uniform(0.0, 0.4)
        if case % 5 == 0:  # all in one corner, away from the others
            volume[:, : shape[1] // 2] = False
        weights = rng.random(shape[0]) if case % 2 else None
        kept = keep_largest_component_3d(volume, weights)
        assert kept.dtype == np.uint8 and kept.shape == shape
        assert np.array_equal(kept.astype(bool), whole_volume(volume, weights)), case

def test_largest_3d_component_rule_applies_to_gated_volumes(tiny_models):
    import dataclasses

    import numpy as np

    from bt_pipeline.inference.predictor import TwoStagePredictor

    predictor = TwoStagePredictor.load(*tiny_models)
    keep = dataclasses.replace(predictor, unet_config=dataclasses.replace(
        predictor.unet_config, keep_largest_3d=True))
    maps = [np.zeros((8, 8), np.float32) for _ in range(3)]
    maps[0][1:4, 1:4] = 0.9  # the big component
    maps[2][6:8, 6:8] = 0.9  # a small one, two slices away
    plain = predictor.volume_masks(maps)
    assert [int(m.sum()) for m in plain] == [9, 0, 4]
    assert [int(m.sum()) for m in keep.volume_masks(maps)] == [9, 0, 0]
    gated = keep.volume_masks([None, maps[1], maps[2]])  # slice 0 not let through
    assert gated[0] is None and int(gated[2].sum()) == 4
    # sized by the gate: slice 2's small component wins where the gate doubted slice 0; the
    # same rule without gate probabilities (no stage 1) counts voxels
    by_gate = dataclasses.replace(predictor, unet_config=dataclasses.replace(
        predictor.unet_config, keep_largest_3d=True, largest_3d_by="gate"))
    doubtful = np.array([0.1, 0.5, 0.95])
    assert [int(m.sum()) for m in by_gate.volume_masks(maps, gate_probabilities=doubtful)] == \
        [0, 0, 4]
    assert [int(m.sum()) for m in by_gate.volume_masks(maps)] == [9, 0, 0]


def test_an_unknown_component_sizing_is_refused_naming_the_file(tiny_models, tmp_path):
    import shutil

    from bt_pipeline.inference.predictor import ModelLoadError, TwoStagePredictor

    unet = tmp_path / "unet.keras"
    shutil.copy(tiny_models[1], unet)
    config = json.loads(tiny_models[1].with_suffix(".json").read_text())
    unet.with_suffix(".json").write_text(json.dumps({**config, "largest_3d_by": "area"}))
    with pytest.raises(ModelLoadError, match=r"unet\.json: .*largest_3d_by.*'area'"):
        TwoStagePredictor.load(tiny_models[0], unet)


def test_small_components_are_removed():
    import numpy as np

    from bt_pipeline.inference.postprocess import remove_small_components

    mask = np.zeros((20, 20), np.uint8)
    mask[2:4, 2:4] = 1  # 4 px
    mask[10:16, 10:16] = 1  # 36 px
    kept = remove_small_components(mask, 10)
    assert kept.sum() == 36 and kept[2, 2] == 0
    assert remove_small_components(mask, 0).sum() == 40



def test_a_trained_unet_gets_its_postprocessing_written_by_code(synthetic_root,
                                                                  synthetic_manifest, tiny_models,
                                                                  tmp_path):
    """train_unet ships a U-Net, `bt evaluate --write-postprocessing` chooses on val and writes
    the rule into its JSON: every key of the JSON is one that code writes, and inference
    applies the rule that was written."""
    from bt_pipeline.cli import main
    from bt_pipeline.config import DataConfig, UNetConfig, to_dict
    from bt_pipeline.inference.predictor import TwoStagePredictor
    from bt_pipeline.training.train_unet import train_unet

    data = DataConfig(data_root=str(synthetic_root), manifest=str(synthetic_manifest),
                      image_size=32, batch_size=8, cache_dir="")
    config = UNetConfig(image_size=32, depth=2, base_filters=4, epochs=1, seed=3)
    unet = tmp_path / "unet.keras"
    train_unet(data, config, tmp_path / "run", unet, verbose=0)
    assert main(["evaluate", "--data-dir", str(synthetic_root), "--manifest",
                 str(synthetic_manifest), "--splits", "val", "--classifier", str(tiny_models[0]),
                 "--unet", str(unet), "--out", str(tmp_path / "report"),
                 "--write-postprocessing"]) == 0
    written = json.loads(unet.with_suffix(".json").read_text())
    config_keys = set(to_dict(config))
    assert set(written) == config_keys | {"extra"}
    assert set(written["extra"]) == {"data", "parameters", "epochs_run_this_call",
                                     "wall_seconds_this_call", "epochs_logged", "best_val_dice",
                                     "trained_on_patients",
                                     "postprocessing"}
    assert set(written["extra"]["postprocessing"]) == {"chosen_on", "mean_dice_gain",
                                                        "min_gain_to_adopt"}
    choice = pd.read_csv(tmp_path / "report" / "threshold_sweep.csv")
    assert not choice.empty
    loaded = TwoStagePredictor.load(tiny_models[0], unet)
    assert loaded.unet_config.keep_largest_3d == written["keep_largest_3d"]
    assert loaded.unet_config.min_component_pixels == written["min_component_pixels"]
    # inference applies the rule that was written: a 144 px blob and a stray 4 px one
    import numpy as np

    maps = [np.zeros((16, 16), np.float32) for _ in range(3)]
    maps[0][1:13, 1:13] = 0.9
    maps[2][14:16, 14:16] = 0.9
    pixels, largest = written["min_component_pixels"], written["keep_largest_3d"]
    stray = 4 if pixels <= 4 and not largest else 0
    assert [int(m.sum()) for m in loaded.volume_masks(maps)] == [144, 0, stray]
