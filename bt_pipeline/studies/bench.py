"""Speed measurements that anyone can re-run: ``make bench`` (everything, against the
machine's own matrix-multiply peak), ``make bench-loader``, ``make bench-infer``,
``make bench-widths``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.config import SHIPPED_UNET, DataConfig, GateConfig, UNetConfig, load_json
from bt_pipeline.data.loader import classifier_dataset, load_split, unet_dataset
from bt_pipeline.data.manifest import read_manifest
from bt_pipeline.data.preprocess import read_image
from bt_pipeline.evaluation.metrics import dice_score
from bt_pipeline.inference.predictor import TwoStagePredictor, graph_forward, to_bfloat16
from bt_pipeline.models.batch_norm import with_fused_batch_norm
from bt_pipeline.models.losses import LOSSES
from bt_pipeline.models.precision import cpu_has_bfloat16, with_dtype_policy
from bt_pipeline.models.unet import build_unet_from_config
from bt_pipeline.runtime import quiet_tensorflow
from bt_pipeline.studies.flops import TRAINING_STEP_FORWARD_PASSES, forward_flops


def _drain(dataset) -> tuple[int, float]:
    started, count = time.perf_counter(), 0
    for images, _ in dataset:
        count += int(images.shape[0])
    return count, time.perf_counter() - started


def loader_throughput(manifest_path: str | os.PathLike, data_root: str | os.PathLike,
                      epochs: int = 3) -> dict[str, float]:
    """Slices/s of the training loader on the train split.

    ``first_epoch``: from TIFF files on disk with an empty cache (decode + batching +
    augmentation); ``cached``: later epochs from the in-memory cache, augmentation on;
    ``disk_cache_load``: a new process's first epoch when the ``.npy`` cache exists.
    """
    manifest = read_manifest(manifest_path)
    with tempfile.TemporaryDirectory() as cache_dir:
        config = DataConfig(data_root=str(data_root), cache_dir=cache_dir)
        started = time.perf_counter()
        arrays = load_split(manifest, "train", config)
        decode_seconds = time.perf_counter() - started
        count, seconds = _drain(classifier_dataset(arrays, config, training=True))
        first = count / (decode_seconds + seconds)
        started = time.perf_counter()
        load_split(manifest, "train", config)
        disk_seconds = time.perf_counter() - started
    results = {"slices": float(count), "first_epoch_slices_per_s": first,
               "disk_cache_load_slices_per_s": count / disk_seconds}
    for name, make in (("classifier", classifier_dataset), ("unet", unet_dataset)):
        dataset = make(arrays, config, training=True)
        _drain(dataset)  # warm up the pipeline once
        totals = [_drain(dataset) for _ in range(epochs)]
        results[f"{name}_cached_slices_per_s"] = (sum(c for c, _ in totals)
                                                  / sum(s for _, s in totals))
        plain = dataclasses.replace(config, augment=False)
        totals = [_drain(make(arrays, plain, training=True)) for _ in range(epochs)]
        results[f"{name}_cached_no_augment_slices_per_s"] = (sum(c for c, _ in totals)
                                                             / sum(s for _, s in totals))
    return results


def infer_throughput(scan_dirs: list[str], out_dir: str | os.PathLike,
                     extra_args: tuple[str, ...] = ()) -> dict[str, float]:
    """End-to-end ``python -m bt_pipeline.infer`` in a fresh process: slices/s over the whole
    run (start-up, reading, both stages, writing) and seconds from process start to the first
    patient's outputs on disk."""
    timing_file = Path(out_dir).with_name(Path(out_dir).name + ".timing.json")
    started = time.time()
    subprocess.run([sys.executable, "-m", "bt_pipeline.infer", *scan_dirs, "--out", str(out_dir),
                    "--quiet", "--timing", str(timing_file), *extra_args], check=False,
                   stdout=subprocess.DEVNULL)
    timing = json.loads(timing_file.read_text(encoding="utf-8"))
    total = timing["end_unix"] - started
    return {"infer_patients": float(timing["patients"]), "infer_slices": float(timing["slices"]),
            "infer_seconds": total, "infer_slices_per_s": timing["slices"] / total,
            "infer_first_patient_s": timing["first_patient_unix"] - started}


def _best_rate(run, work: float, seconds: float, repeats: int = 3) -> float:
    """``work`` units per second of ``run()``: best of ``repeats`` timed windows of about
    ``seconds`` each, after one untimed warm-up call (tracing, allocation)."""
    run()
    best = 0.0
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while True:
            run()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds / repeats:
                break
        best = max(best, calls * work / elapsed)
    return best


def matmul_peak_gflops(size: int = 2048, seconds: float = 6.0) -> float:
    """The machine's float32 matrix-multiply rate (GFLOP/s) through TensorFlow's own kernels,
    the ceiling for the convolutions and dense layers of the models."""
    rng = np.random.default_rng(0)
    a = tf.constant(rng.standard_normal((size, size), np.float32))
    b = tf.constant(rng.standard_normal((size, size), np.float32))
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    return _best_rate(lambda: matmul().numpy(), 2.0 * size ** 3, seconds) / 1e9


def inference_variants(model) -> dict[str, object]:
    """Ways of running ``model`` forward that the bench compares; each maps a batch to an array.

    ``eager``: ``model(x)`` as a plain call; ``graph``: the traced graph inference runs
    (:func:`graph_forward`); ``xla``: the same compiled by XLA; ``bf16``: that graph with
    bfloat16 compute (``--precision bfloat16``); ``onnxruntime``: ONNX Runtime, where the
    optional ``onnx`` extra is installed."""
    graph = graph_forward(model)
    xla = tf.function(lambda x: model(x, training=False), jit_compile=True)
    bf16 = graph_forward(to_bfloat16(model))
    variants = {"eager": lambda x: model(x, training=False).numpy(),
                "graph": lambda x: graph(x).numpy(), "xla": lambda x: xla(x).numpy(),
                "bf16": lambda x: bf16(x).numpy()}
    onnx = onnx_runtime_variant(model)
    if onnx is not None:
        variants["onnxruntime"] = onnx
    return variants


def inference_rate(run, batch: np.ndarray, seconds: float) -> float:
    """Slices/s of ``run`` on ``batch``."""
    return _best_rate(lambda: run(batch), float(len(batch)), seconds)


def training_rate(model, loss, batch: np.ndarray, targets: np.ndarray, seconds: float,
                  jit_compile: bool = False, precision: str = "float32") -> float:
    """Images/s of full training steps (forward, backward, Adam update) on one batch, with
    ``precision`` "float32" or "mixed_bfloat16" (as ``train-unet --precision``)."""
    clone = keras.Model.from_config(with_dtype_policy(model, precision).get_config())
    clone.set_weights(model.get_weights())
    clone.compile(optimizer=keras.optimizers.Adam(1e-4), loss=loss, jit_compile=jit_compile)
    return _best_rate(lambda: clone.train_on_batch(batch, targets), float(len(batch)), seconds)


def bf16_agreement(predictor, images: list[np.ndarray]) -> dict[str, float]:
    """What bfloat16 costs in accuracy on real slices. Classifier: the largest change of the
    tumour probability and the share of decisions that flip at its threshold. U-Net (what
    ``--precision bfloat16`` changes): the largest change of a pixel's probability and the
    mean Dice between the float32 and bfloat16 masks (1.0 = identical)."""
    threshold = predictor.classifier_config.threshold
    classifier16 = dataclasses.replace(predictor, classifier=to_bfloat16(predictor.classifier))
    p32, p16 = predictor.tumour_probabilities(images), classifier16.tumour_probabilities(images)
    unet16 = dataclasses.replace(predictor, bfloat16=True)
    maps32, maps16 = predictor.mask_probabilities(images), unet16.mask_probabilities(images)
    dice = [dice_score(a, b) for a, b in zip(predictor.masks(maps32), unet16.masks(maps16),
                                             strict=True)]
    return {"bf16_classifier_max_probability_change": float(np.abs(p32 - p16).max()),
            "bf16_classifier_decisions_flipped_share": float(np.mean((p32 >= threshold)
                                                                     != (p16 >= threshold))),
            "bf16_unet_max_probability_change": float(max(np.abs(a - b).max()
                                                          for a, b in zip(maps32, maps16,
                                                                          strict=True))),
            "bf16_unet_mask_dice_vs_float32": float(np.mean(dice))}


OTHER_BATCH_SIZES = (1, 8, 64)


def run_bench(manifest_path: str | os.PathLike, data_root: str | os.PathLike,
              seconds: float = 4.0, batch_size: int = 32) -> dict[str, float]:
    """Everything ``make bench`` reports, as ``name -> value``; see docs/speed.md."""
    # every bf16 figure below is emulated, and slower than float32, where this is 0
    results: dict[str, float] = {"cpu_native_bfloat16": float(cpu_has_bfloat16()),
                                 "matmul_peak_gflops": matmul_peak_gflops()}
    peak = results["matmul_peak_gflops"] * 1e9
    predictor = TwoStagePredictor.load()
    rng = np.random.default_rng(0)
    models = {"classifier": (predictor.classifier, "binary_crossentropy", False),
              "unet": (predictor.unet, LOSSES[predictor.unet_config.loss], True)}
    # a gate trains only its head, on trunk features computed once (training/tune_gate.py): a
    # training step on images is not how it trains, and its frozen trunk would inflate the
    # efficiency counted from the whole model's FLOPs
    gate = isinstance(predictor.classifier_config, GateConfig)
    for name, (model, loss, per_pixel_targets) in models.items():
        flops = forward_flops(model)
        size, channels = int(model.inputs[0].shape[1]), int(model.inputs[0].shape[-1])
        batch = rng.random((batch_size, size, size, channels), np.float32)
        results[f"{name}_forward_mflops"] = flops / 1e6
        variants = inference_variants(model)
        for variant, run in variants.items():
            rate = inference_rate(run, batch, seconds)
            results[f"{name}_infer_{variant}_slices_per_s"] = rate
            results[f"{name}_infer_{variant}_efficiency"] = rate * flops / peak
        for other in OTHER_BATCH_SIZES:  # graph mode at other batch sizes than the default
            results[f"{name}_infer_graph_batch{other}_slices_per_s"] = inference_rate(
                variants["graph"], batch[:other] if other <= len(batch)
                else np.concatenate([batch] * (other // len(batch))), seconds)
        if name == "classifier" and gate:
            continue
        shape = (batch_size, size, size, 1) if per_pixel_targets else (batch_size, 1)
        targets = (rng.random(shape) > 0.5).astype(np.float32)
        for variant, jit, precision in (("graph", False, "float32"), ("xla", True, "float32"),
                                        ("bf16", False, "mixed_bfloat16")):
            rate = training_rate(model, loss, batch, targets, seconds, jit, precision)
            results[f"{name}_train_{variant}_images_per_s"] = rate
            results[f"{name}_train_{variant}_efficiency"] = (
                rate * TRAINING_STEP_FORWARD_PASSES * flops / peak)
        results[f"{name}_train_bf16_speedup"] = (results[f"{name}_train_bf16_images_per_s"]
                                                 / results[f"{name}_train_graph_images_per_s"])
    manifest = read_manifest(manifest_path)
    val = manifest[manifest["split"] == "val"]
    tumour = val["has_tumor"] == 1
    sample = pd.concat([val[tumour].head(48), val[~tumour].head(16)])
    # Passed as one stack: for a 2.5D model the neighbours are then not anatomical, which
    # does not matter here (both precisions see the same input).
    images = [read_image(os.path.join(str(data_root), path)) for path in sample["image"]]
    results.update(bf16_agreement(predictor, images))
    results.update({f"loader_{k}": v for k, v in loader_throughput(manifest_path, data_root,
                                                                   epochs=1).items()})
    chosen = manifest[manifest["split"].isin(["val", "test"])]["patient_id"].unique()
    folders = [os.path.join(str(data_root), p) for p in sorted(chosen)]
    # Two runs each, alternating, best kept: a single run of ~15 s swings by 20 % with what
    # ran just before it (page cache, CPU clocks), enough to invert a float32/bf16 ranking.
    runs = {"": [], "bf16_": []}
    for _ in range(2):
        for prefix, extra in (("", ("--precision", "float32")),
                              ("bf16_", ("--precision", "bfloat16"))):
            with tempfile.TemporaryDirectory() as out:
                runs[prefix].append(infer_throughput(folders, out, extra))
    for prefix, measured in runs.items():
        best = max(measured, key=lambda r: r["infer_slices_per_s"])
        results.update({f"{prefix}{k}": v for k, v in best.items()
                        if not prefix or k.endswith("_s")})
    return results


def onnx_runtime_variant(model):
    """``model`` converted to ONNX (tf2onnx) and run by ONNX Runtime on the CPU, as one more
    inference variant; None when the optional ``onnx`` extra is not installed."""
    try:
        import onnxruntime
        import tf2onnx
    except ImportError:
        return None
    forward = graph_forward(model)
    proto, _ = tf2onnx.convert.from_function(forward, input_signature=forward.input_signature,
                                             opset=17)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--out", default="reports/bench.json")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="timed seconds per model measurement")


def run(args: argparse.Namespace) -> int:
    quiet_tensorflow()
    results = run_bench(args.manifest, args.data_dir, args.seconds)
    for name, value in results.items():
        print(f"{name}={value:.4g}", flush=True)
    write_text_atomic(Path(args.out), json.dumps(results, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


def add_arguments_loader(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--epochs", type=int, default=3)


def run_loader(args: argparse.Namespace) -> int:
    for name, value in loader_throughput(args.manifest, args.data_dir, args.epochs).items():
        print(f"{name}={value:.1f}")
    return 0


def _split_folders(args: argparse.Namespace) -> list[str]:
    """The patient folders of ``args.splits`` (the manifest's split), sorted."""
    table = read_manifest(args.manifest)
    chosen = table[table["split"].isin(args.splits)]["patient_id"].unique()
    return [f"{args.data_dir}/{patient}" for patient in sorted(chosen)]


def add_arguments_infer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--tta-flips", action=argparse.BooleanOptionalAction, default=None,
                        help="passed on to infer (default: as the shipped U-Net's JSON says)")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "auto"], default=None,
                        help="passed on to infer (default: infer's)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench_infer.json"),
                        help="the runs' figures, with and without the quality estimate")


def run_infer(args: argparse.Namespace) -> int:
    """infer end to end on the chosen patients, the shipped models as they are and once more
    without their quality estimate (what it costs), each in a fresh process."""
    import shutil

    from bt_pipeline.config import SHIPPED_CLASSIFIER, SHIPPED_UNET
    from bt_pipeline.inference.quality import QUALITY_FILE

    folders = _split_folders(args)
    passed = []
    if args.tta_flips is not None:
        passed.append("--tta-flips" if args.tta_flips else "--no-tta-flips")
    if args.precision is not None:
        passed += ["--precision", args.precision]
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        bare = Path(scratch) / "without_quality"
        bare.mkdir()
        for path in SHIPPED_UNET.parent.iterdir():
            if path.is_file() and path.name != QUALITY_FILE:
                shutil.copyfile(path, bare / path.name)
        models = {"shipped (with the quality estimate)": (),
                  "without the quality estimate": (
                      "--classifier", str(bare / SHIPPED_CLASSIFIER.name),
                      "--unet", str(bare / SHIPPED_UNET.name))}
        for name, extra in models.items():
            result = infer_throughput(folders, Path(scratch) / f"out{len(runs)}",
                                      (*passed, *extra))
            runs[name] = result
            print(f"{name}: " + ", ".join(f"{k}={v:.2f}" for k, v in result.items()),
                  flush=True)
    write_text_atomic(args.out, json.dumps({
        "what": f"bt infer end to end on the {', '.join(args.splits)} patients, a fresh "
                "process each, start-up included, every output written",
        "options": passed, "cpu_threads": os.cpu_count(), "runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


#: The ways ``make bench-cluster`` runs infer on the same patients: plain, then Ray with the
#: same two threads as one actor of two or two actors of one.
CLUSTER_RUNS = {"plain infer (2 threads)": (),
                "ray: 1 actor x 2 threads": ("--ray", "local", "--workers", "1",
                                             "--worker-threads", "2"),
                "ray: 2 actors x 1 thread": ("--ray", "local", "--workers", "2",
                                             "--worker-threads", "1")}


def add_arguments_cluster(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--splits", nargs="+", default=["test"])
    parser.add_argument("--out", type=Path, default=Path("reports/bench_cluster.json"))


def run_cluster(args: argparse.Namespace) -> int:
    """Plain infer against infer on a local Ray runtime, same patients, same threads: slices/s
    over each whole run and after its first patient (start-up excluded), and Ray's overhead."""
    folders = _split_folders(args)
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, extra in CLUSTER_RUNS.items():
            result = infer_throughput(folders, Path(scratch) / str(len(rows)), extra)
            after_first = result["infer_slices"] / max(
                result["infer_seconds"] - result["infer_first_patient_s"], 1e-9)
            rows[name] = {**result, "slices_per_s_after_first_patient": after_first}
            print(f"{name}: {result['infer_slices_per_s']:.1f} slices/s whole run, "
                  f"{after_first:.1f} after the first patient", flush=True)
    plain = rows["plain infer (2 threads)"]
    for row in rows.values():
        row["overhead_vs_plain"] = 1 - row["infer_slices_per_s"] / plain["infer_slices_per_s"]
    write_text_atomic(args.out, json.dumps({
        "what": "bt infer on the patients of splits " + ", ".join(args.splits) +
                ", in a fresh process each, outputs written; overhead = 1 - rate / plain rate",
        "cpu_threads": os.cpu_count(), "runs": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


#: Base widths ``make bench-widths`` times: the shipped 16 and the wider U-Nets that would fit
#: the development patients better at more compute.
BENCH_WIDTHS = (16, 20, 24, 32)


def width_rates(config: UNetConfig, widths=BENCH_WIDTHS, seconds: float = 4.0,
                batch_size: int = 32) -> list[dict[str, float]]:
    """U-Net forward rates at each base width, the rest of ``config``'s design kept: random
    weights, graph mode as inference runs it (fused batch norm), float32 and bfloat16, with the
    FLOPs per slice and the bfloat16 rate relative to the first width's."""
    rng = np.random.default_rng(0)
    batch = rng.random((batch_size, config.image_size, config.image_size,
                        config.preprocessing.channels), np.float32)
    rows = []
    for width in widths:
        keras.utils.set_random_seed(0)
        model = with_fused_batch_norm(build_unet_from_config(
            dataclasses.replace(config, base_filters=width, init_from="")))
        row = {"base_width": width, "parameters": model.count_params(),
               "gflop_per_slice": forward_flops(model) / 1e9}
        for name, forward in (("float32", graph_forward(model)),
                              ("bfloat16", graph_forward(to_bfloat16(model)))):
            row[f"{name}_slices_per_s"] = inference_rate(lambda x, f=forward: f(x).numpy(),
                                                         batch, seconds)
        rows.append(row)
    for row in rows:
        row["bfloat16_time_vs_first"] = rows[0]["bfloat16_slices_per_s"] / row[
            "bfloat16_slices_per_s"]
    return rows


def add_arguments_widths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unet", type=Path, default=SHIPPED_UNET,
                        help="the U-Net whose design (depth, batch norm, input) is kept")
    parser.add_argument("--widths", type=int, nargs="+", default=list(BENCH_WIDTHS))
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="timed seconds per measurement")


def run_widths(args: argparse.Namespace) -> int:
    quiet_tensorflow()
    config = load_json(args.unet.with_suffix(".json"), UNetConfig)
    table = pd.DataFrame(width_rates(config, args.widths, args.seconds))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0
