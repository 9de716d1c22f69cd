"""`make experiments` code paths on synthetic patients: every run trains, the tables are well
formed, the figures are written, and a second call keeps finished runs instead of retraining."""

import pandas as pd
import pytest

from bt_pipeline.config import DataConfig
from bt_pipeline.studies.experiments import BATCH_SIZES, LR_BN_RATES, Scale, run_experiments


@pytest.mark.integration
def test_experiments_write_tables_figures_and_resume(synthetic_root, synthetic_manifest,
                                                     tiny_models, tmp_path, capsys):
    data = DataConfig(data_root=str(synthetic_root), manifest=str(synthetic_manifest),
                      cache_dir=str(tmp_path / "cache"), batch_size=8)
    scale = Scale(image_size=32, depth=2, base_filters=4)
    out = tmp_path / "experiments"
    kwargs = dict(epochs_lr_bn=1, epochs_batch=1, epochs_options=1, ensemble_size=2,
                  tv_weight=0.1, verbose=0, classifier_path=tiny_models[0])
    tables = run_experiments(data, scale, out, **kwargs)

    lr_bn = tables["lr_bn"]
    assert len(lr_bn) == len(LR_BN_RATES) * 2
    assert set(lr_bn["learning_rate"]) == set(LR_BN_RATES)
    assert set(lr_bn["batch_norm"]) == {True, False}
    assert set(tables["batch_lr"]["batch_size"]) == set(BATCH_SIZES)
    options = tables["options"]
    assert list(options["option"]) == ["baseline", "TV denoising (weight 0.1)", "ensemble of 2",
                                       "flip TTA", "ensemble of 2 + flip TTA"]
    assert options["val_dice_unet_mean"].between(0, 1).all()
    assert options["delta_dice_unet_vs_baseline"].iloc[0] == 0
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == 6 + 6 + 3  # one row per epoch of every run
    for name in ("summary.md", "lr_bn.csv", "batch_lr.csv", "options.csv", "settings.json",
                 "lr_bn_curves.png", "batch_lr_curves.png"):
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    assert "| learning_rate |" in summary and "![lr_bn_curves](lr_bn_curves.png)" in summary

    capsys.readouterr()
    again = run_experiments(data, scale, out, **kwargs)
    assert capsys.readouterr().out.count("done earlier, kept") == 15
    pd.testing.assert_frame_equal(again["lr_bn"], lr_bn)
    pd.testing.assert_frame_equal(again["options"].drop(columns="val_predict_seconds"),
                                  options.drop(columns="val_predict_seconds"))
    # Other epochs: new runs; the report covers them only, curves.csv keeps both
    longer = run_experiments(data, scale, out, **{**kwargs, "epochs_batch": 2})
    assert len(longer["batch_lr"]) == len(BATCH_SIZES) * 2
    assert (longer["batch_lr"]["epochs_run"] == 2).all()
    assert len(pd.read_csv(out / "curves.csv")) == 15 + 6 * 2


@pytest.mark.integration
def test_a_run_is_reproducible(synthetic_root, synthetic_manifest, tmp_path):
    """Same seed, same curves: what `make experiments` reports can be regenerated."""
    from bt_pipeline.data.loader import load_split
    from bt_pipeline.data.manifest import read_manifest
    from bt_pipeline.studies.experiments import Run, train_run

    data = DataConfig(data_root=str(synthetic_root), manifest=str(synthetic_manifest),
                      cache_dir="", batch_size=8, image_size=32)
    manifest = read_manifest(synthetic_manifest)
    splits = {s: load_split(manifest, s, data) for s in ("train", "val")}
    scale = Scale(image_size=32, depth=2, base_filters=4)
    run = Run("lr_bn", 0.01, epochs=2)
    _, first = train_run(run, scale, splits, data, verbose=0)
    _, second = train_run(run, scale, splits, data, verbose=0)
    columns = ["loss", "val_loss", "dice_metric", "val_dice_metric"]
    pd.testing.assert_frame_equal(first[columns], second[columns])


def test_planned_runs_cover_the_reference_grids():
    import pytest

    from bt_pipeline.studies.experiments import planned_runs

    runs = planned_runs(100, 30, 30, ensemble_size=3, tv_weight=0.1, seed=1)
    assert len(runs) == 6 + 6 + 3 + 1 and len({r.name for r in runs}) == len(runs)
    assert {(r.learning_rate, r.batch_norm) for r in runs if r.table == "lr_bn"} == {
        (rate, bn) for rate in (0.1, 0.01, 0.0001) for bn in (True, False)}
    assert all(r.epochs == 100 for r in runs if r.table == "lr_bn")
    with pytest.raises(ValueError, match="tv-weight"):
        planned_runs(1, 1, 1, ensemble_size=3, tv_weight=0.0, seed=1)
