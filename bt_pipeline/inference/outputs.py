"""Per-patient outputs people can read: an overview PNG, a NIfTI mask volume, a slice viewer,
and the run's HTML index page."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic, write_with
from bt_pipeline.data.formats import NIFTI, volume_format
from bt_pipeline.data.preprocess import FLAIR
from bt_pipeline.reports import draw_outline

# Okabe-Ito orange and sky blue: told apart with every common colour-vision deficiency.
PREDICTED_RGB = (230, 159, 0)
#: A slice with a mask and no ground truth, in the viewer's strip (Okabe-Ito vermillion).
FALSE_ALARM_RGB = (213, 94, 0)
TRUTH_RGB = (86, 180, 233)
TILE = 192


def flair_gray(image_rgb: np.ndarray) -> np.ndarray:
    """The FLAIR channel of a uint8 RGB slice as a 3-channel grayscale image."""
    return np.repeat(image_rgb[..., FLAIR:FLAIR + 1], 3, axis=-1)


def _outlined(canvas: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """``canvas`` (RGB, or RGBA drawn opaque) with the truth's outline and, on top, the
    prediction's."""
    opaque = (255,) * (canvas.shape[-1] - 3)
    for mask, colour in ((truth, TRUTH_RGB), (predicted, PREDICTED_RGB)):
        if mask is not None and mask.any():
            canvas = draw_outline(canvas, mask, (*colour, *opaque))
    return canvas


def _tile(image_rgb: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None,
          label: str) -> np.ndarray:
    tile = _outlined(flair_gray(image_rgb), predicted, truth)
    tile = cv2.resize(tile, (TILE, TILE), interpolation=cv2.INTER_AREA)
    cv2.putText(tile, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    return tile


def write_overview(path: str | os.PathLike, images: list[np.ndarray], masks: list[np.ndarray],
                   truths: list[np.ndarray] | None, numbers: list[int],
                   max_tiles: int = 48) -> None:
    """A grid of the slices with a predicted or a true tumour on the FLAIR channel, outlines
    drawn (orange: predicted, blue: ground truth). Beyond ``max_tiles`` slices the first ones
    are shown and the banner says how many of how many; every slice is in the viewer.

    With no tumour anywhere, a few evenly spaced slices are shown under a banner saying so.
    """
    flagged = [i for i in range(len(images))
               if masks[i].any() or (truths is not None and truths[i].any())]
    shown = flagged[:max_tiles]
    if not flagged:
        shown = sorted(set(np.linspace(0, len(images) - 1, num=min(4, len(images))).astype(int)))
        banner = "no tumour detected"
    else:
        banner = "orange: predicted" + ("   blue: ground truth" if truths else "")
        if len(shown) < len(flagged):
            banner += f"   showing {len(shown)} of {len(flagged)} slices (all: viewer.html)"
    tiles = [_tile(images[i], masks[i], truths[i] if truths else None, f"#{numbers[i]}")
             for i in shown]
    columns = min(6, len(tiles))
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[r:r + columns]) for r in range(0, len(tiles), columns)])
    legend = np.zeros((22, grid.shape[1], 3), np.uint8)
    cv2.putText(legend, banner, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
    canvas = np.vstack([legend, grid])
    write_with(path, lambda tmp: _imwrite(tmp, canvas[..., ::-1]), suffix=".png")


def _png_bytes(array: np.ndarray) -> bytes:
    """A uint8 image in OpenCV's channel order (gray, BGR or BGRA) encoded as PNG."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise OSError("could not encode a PNG image")
    return encoded.tobytes()


def _imwrite(path: Path, array: np.ndarray) -> None:
    """Encode in memory, write with Python: OpenCV's own file writer cannot take every path."""
    path.write_bytes(_png_bytes(array))


def write_mask_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """uint8 {0, 255} PNG of a {0, 1} mask, written atomically."""
    write_with(path, lambda tmp: _imwrite(tmp, (mask > 0).astype(np.uint8) * 255), suffix=".png")


def slice_stack_affine(spacing: tuple[float, float, float] | None) -> np.ndarray:
    """NIfTI affine (voxel -> RAS+ mm) of a stack of the dataset's slices, voxel axes i =
    column, j = row, k = slice number. The slices are radiological: the patient's right on the
    image's left (column 0) and anterior at the top (row 0); slice numbers run from inferior
    to superior. So x (towards the right) falls with the column, y (anterior) falls with the
    row, and z (superior) rises with the slice. ``spacing`` (column, row, slice) in mm; 1 mm
    voxels when unknown."""
    sx, sy, sz = spacing if spacing is not None else (1.0, 1.0, 1.0)
    return np.diag([-sx, -sy, sz, 1.0])


def _write_volume(path: str | os.PathLike, slices: list[np.ndarray],
                  spacing: tuple[float, float, float] | None) -> None:
    volume = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (row, column, k) -> (i, j, k)
    image = nib.Nifti1Image(volume, affine=slice_stack_affine(spacing))
    image.header.set_data_dtype(volume.dtype)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    write_with(path, lambda tmp: nib.save(image, str(tmp)), suffix=".nii.gz")


def write_mask_volume(path: str | os.PathLike, masks: list[np.ndarray],
                      spacing: tuple[float, float, float] | None = None) -> None:
    """The patient's masks as a uint8 {0, 1} NIfTI volume oriented as the slices show them
    (:func:`slice_stack_affine`), to overlay on ``image.nii.gz`` in 3D Slicer or ITK-SNAP."""
    _write_volume(path, [(m > 0).astype(np.uint8) for m in masks], spacing)


def write_probability_volume(path: str | os.PathLike, maps: list[np.ndarray],
                             spacing: tuple[float, float, float] | None = None) -> None:
    """The U-Net's probability maps before post-processing as a float32 NIfTI volume on the
    masks' grid."""
    _write_volume(path, [m.astype(np.float32) for m in maps], spacing)


def write_image_volume(path: str | os.PathLike, images: list[np.ndarray],
                       spacing: tuple[float, float, float] | None = None) -> None:
    """The FLAIR channel of the patient's slices as a uint8 NIfTI volume on the masks' grid."""
    _write_volume(path, [np.ascontiguousarray(image[..., FLAIR]) for image in images], spacing)


def write_on_input_grid(folder: Path, masks: list[np.ndarray], case,
                        maps: list[np.ndarray] | None = None, with_image: bool = True):
    """A volume case's outputs on its input's grid, in its FLAIR's format (``mask.nii.gz``,
    ``mask.nrrd``, ``mask.mha``; DICOM: NIfTI): the mask (uint8 {0, 1}) with the input FLAIR's
    exact size, spacing, origin and direction, and ``image``, that FLAIR; given ``maps``, also
    ``probability`` (float32); ``with_image`` False leaves the
    FLAIR's copy out. A NIfTI FLAIR lends its own header
    to all, so any reader finds the same geometry in input and outputs to the last bit; a
    DICOM series becomes NIfTI (as nnU-Net writes it), whose header holds the geometry in
    float32. Returns the mask (a SimpleITK image)."""
    import SimpleITK as sitk

    from bt_pipeline.data.volumes import mask_on_input_grid, probability_on_input_grid

    # a file's own format (DICOM becomes NIfTI, as nnU-Net writes it)
    form = NIFTI if case.flair_file is None else volume_format(case.flair_file)
    outputs = {"mask": mask_on_input_grid(masks, case)}
    if maps is not None:
        outputs["probability"] = probability_on_input_grid(maps, case)
    ending = form.output_suffix
    if form is NIFTI and case.flair_file is not None:  # its own header, field for field
        source = nib.load(case.flair_file)
        for name, image in outputs.items():
            values = sitk.GetArrayFromImage(image)  # (k, j, i)
            out = _on_header_of(source, case.flair_file, values.transpose(2, 1, 0))
            write_with(folder / f"{name}{ending}", lambda tmp, out=out: nib.save(out, str(tmp)),
                       suffix=ending)
        if with_image:
            write_with(folder / f"image{ending}",
                       lambda tmp: _copy_gzipped(case.flair_file, tmp), suffix=ending)
    else:
        if with_image:
            outputs["image"] = case.flair
        for name, image in outputs.items():
            write_with(folder / f"{name}{ending}",
                       lambda tmp, image=image: sitk.WriteImage(image, str(tmp), True),
                       suffix=ending)
    return outputs["mask"]


def _on_header_of(source, path: Path, values: np.ndarray):
    """``values`` (the input's voxel order) as a NIfTI image whose header is ``source``'s
    field for field, but for the data type and scaling. nibabel corrects some fields when it
    loads or builds a header (a negative pixdim becomes positive), and other readers (ITK)
    then see another geometry: the fields are taken from the file as it is."""
    import gzip

    with (gzip.open(path) if path.name.lower().endswith(".gz") else open(path, "rb")) as handle:
        as_stored = type(source.header).from_fileobj(handle, check=False)
    header = source.header.copy()
    header.set_data_dtype(values.dtype)
    header.set_slope_inter(1.0, 0.0)
    image = type(source)(values, None, header)
    image.header["pixdim"] = as_stored["pixdim"]
    return image


def _copy_gzipped(source: Path, target: Path) -> None:
    """The input file's bytes as they are, gzip-compressed unless they already are."""
    import gzip
    import shutil

    with open(source, "rb") as read:
        if source.name.lower().endswith(".gz"):
            with open(target, "wb") as write:
                shutil.copyfileobj(read, write)
        else:
            with gzip.open(target, "wb") as write:
                shutil.copyfileobj(read, write)


#: The report's column headers: plain words and units (the CSV keeps its column names).
REPORT_HEADERS = {
    "patient_id": "patient", "review": "check by eye?", "predicted_dice": "predicted Dice",
    "sequences": "sequences", "n_slices": "slices", "n_tumor_slices": "slices with tumour",
    "tumor_detected": "tumour found", "tumor_pixels": "tumour voxels",
    "tumor_volume_ml": "tumour volume (mL)", "notes": "notes", "dice": "Dice", "iou": "IoU",
    "dice_note": "about the Dice"}


def write_html_report(path: Path, patients: pd.DataFrame, problems: pd.DataFrame,
                      title: str = "bt_pipeline report", run: dict | None = None,
                      pictures: bool = True) -> None:
    """The run's index page: a summary of the run (``run``: its ``run.json``), the
    per-patient table (flagged cases first, each linked to its slice viewer), every overview
    image, and the inputs that were not used."""
    esc = html.escape
    detected = int(patients["tumor_detected"].sum()) if "tumor_detected" in patients else 0
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "img{max-width:100%;margin:.5em 0}</style></head><body>",
             "<p>Research use only: not a medical device and not for clinical decisions.</p>",
             f"<h1>{esc(title)}</h1>",
             f"<p>{len(patients)} patient(s); {detected} with tumour detected. Files: "
             "<a href='patients.csv'>patients.csv</a>, <a href='slices.csv'>slices.csv</a>, "
             "<a href='errors.csv'>errors.csv</a>, <a href='run.json'>run.json</a>.</p>"]
    parts += _run_summary(patients, run)
    if not patients.empty:
        table = patients.copy()
        table["patient_id"] = [f"<a href='{esc(p)}/viewer.html'>{esc(p)}</a>" if pictures
                               else esc(p) for p in table["patient_id"]]
        if "notes" in table:
            table["notes"] = [esc(str(n)) if isinstance(n, str) else "" for n in table["notes"]]
        if "review" in table:  # cases to check by eye first, the flag beside the name
            table = table.sort_values("review", ascending=False, na_position="last",
                                      kind="stable")
            first = ["patient_id", "review", "predicted_dice"]
            table = table[first + [c for c in table.columns if c not in first]]
            table["review"] = ["CHECK" if r == 1 else "" if pd.isna(r) else "ok"
                               for r in table["review"]]
        if "tumor_volume_ml" in table:
            table["tumor_volume_ml"] = ["-- (give --spacing)" if pd.isna(v) else f"{v:.1f}"
                                        for v in table["tumor_volume_ml"]]
        table = table.rename(columns=REPORT_HEADERS)
        parts.append(table.to_html(index=False, escape=False, na_rep="",
                                   float_format=lambda v: f"{v:.3f}"))
    if not problems.empty:
        parts.append(f"<h2>Inputs not used ({len(problems)})</h2>")
        parts.append(problems.to_html(index=False))
    for patient in patients["patient_id"] if pictures and not patients.empty else []:
        pid = esc(patient)
        parts.append(f"<h2 id='{pid}'>{pid}</h2><p><a href='{pid}/viewer.html'>every slice "
                     f"(viewer)</a> · <a href='{pid}/mask.nii.gz'>mask.nii.gz</a></p>"
                     f"<img src='{pid}/overview.png' alt='overview of {pid}'>")
    parts.append("</body></html>")
    write_text_atomic(path, "\n".join(parts) + "\n")


def _run_summary(patients: pd.DataFrame, run: dict | None) -> list[str]:
    """The report's run summary: when, which models at which precision, mean Dice where
    ground truth was given, how many cases are flagged for review."""
    if run is None:
        return []
    esc = html.escape
    models = run.get("models", {})
    files = ", ".join(Path(name).name for name in models.get("files", {}))
    lines = [f"started {run.get('started', '?')}, {run.get('duration_s', '?')} s",
             f"models: {files} ({models.get('precision', '?')}; stage 1 passes P >= "
             f"{models.get('stage1_threshold', float('nan')):.4f})"]
    if "dice" in patients and patients["dice"].notna().any():
        scored = patients["dice"].dropna()
        lines.append(f"mean Dice {scored.mean():.3f} over the {len(scored)} patient(s) with "
                     "ground truth")
    if "review" in patients and patients["review"].notna().any():
        lines.append(f"{int((patients['review'] == 1).sum())} patient(s) flagged to check by "
                     "eye (quality estimate)")
    return ["<ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>"]


def _png_base64(array: np.ndarray) -> str:
    """A uint8 image (gray, RGB or RGBA) as base64 PNG text for a data: URL."""
    if array.ndim == 3:
        order = cv2.COLOR_RGBA2BGRA if array.shape[2] == 4 else cv2.COLOR_RGB2BGR
        array = cv2.cvtColor(array, order)
    return base64.b64encode(_png_bytes(array)).decode("ascii")


def _outline_layer(predicted: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """Transparent RGBA image holding only the outlines (truth below, prediction on top)."""
    return _outlined(np.zeros((*predicted.shape[:2], 4), np.uint8), predicted, truth)


def slice_finding(predicted: bool, truth: bool | None) -> str:
    """What one slice shows against its ground truth: hit, miss, false alarm or ''."""
    if truth is None:
        return ""
    return {(True, True): "hit", (False, True): "miss", (True, False): "false alarm"}.get(
        (predicted, truth), "")


def write_viewer(path: str | os.PathLike, patient: dict, images: list[np.ndarray],
                 masks: list[np.ndarray], truths: list[np.ndarray] | None, numbers: list[int],
                 probabilities: np.ndarray, gate_threshold: float,
                 spacing: tuple[float, float, float] | None = None,
                 spacing_from: str = "--spacing") -> None:
    """One patient's self-contained HTML viewer: every slice on a slider, the FLAIR channel in
    grayscale under the outlines (opacity adjustable), the classifier's probability and gate
    per slice, the tumour volume, and misses and false alarms where ground truth exists;
    ``spacing_from`` says where the voxel size came from. No network access: images and
    script are inside the page."""
    slices = []
    for k, (image, mask) in enumerate(zip(images, masks, strict=True)):
        truth = truths[k] if truths is not None else None
        found = slice_finding(bool(mask.any()), None if truth is None else bool(truth.any()))
        slices.append({
            "n": int(numbers[k]), "p": round(float(probabilities[k]), 4),
            "gate": bool(probabilities[k] >= gate_threshold), "px": int(mask.sum()),
            "truth_px": None if truth is None else int(truth.sum()),
            "finding": found,
            "flair": _png_base64(image[..., FLAIR]),
            "overlay": _png_base64(_outline_layer(mask, truth)),
        })
    volume = patient.get("tumor_volume_ml")
    summary = {
        "patient": patient["patient_id"], "slices": len(slices),
        "tumour_slices": patient["n_tumor_slices"], "pixels": patient["tumor_pixels"],
        "volume_ml": None if volume is None or pd.isna(volume) else round(float(volume), 2),
        "dice": None if pd.isna(patient.get("dice", float("nan"))) else round(patient["dice"], 3),
        "spacing": None if spacing is None else [round(float(v), 2) for v in spacing],
        "spacing_from": spacing_from, "width": int(images[0].shape[1]) if images else 0,
        "sequences": patient.get("sequences", ""), "false_alarm_rgb": FALSE_ALARM_RGB,
        "has_truth": truths is not None, "gate_threshold": round(float(gate_threshold), 4),
        "predicted_rgb": PREDICTED_RGB, "truth_rgb": TRUTH_RGB,
        "notes": [n for n in str(patient.get("notes") or "").split(" | ") if n],
        "review": None if pd.isna(patient.get("review", float("nan"))) else
        int(patient["review"]),
        "predicted_dice": None if pd.isna(patient.get("predicted_dice", float("nan"))) else
        round(float(patient["predicted_dice"]), 2),
    }
    page = (VIEWER_TEMPLATE.replace("{{TITLE}}", html.escape(patient["patient_id"]))
            .replace("{{DATA}}", json.dumps({"summary": summary, "slices": slices})
                     .replace("</", "<\\/")))
    write_text_atomic(path, page)


VIEWER_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}} - bt_pipeline viewer</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.2em;background:#111;color:#eee}
#stage{position:relative;width:512px;height:512px}
#stage img{position:absolute;left:0;top:0;width:512px;height:512px;image-rendering:pixelated}
.row{display:flex;gap:1.5em;align-items:flex-start}
input[type=range]{width:512px}
#strip{display:flex;width:512px;height:10px;margin-top:2px}
.side{position:absolute;color:#f0e442;font-weight:bold;text-shadow:0 0 3px #000}
#scale{position:absolute;left:12px;bottom:12px;height:4px;background:#fff}
#scalelabel{position:absolute;left:12px;bottom:18px;font-size:12px}
#strip div{flex:1;border-right:1px solid #111}
.key{display:inline-block;width:1.6em;height:.35em;vertical-align:middle;margin-right:.3em}
table{border-collapse:collapse}td{padding:2px 8px}
.warn{color:#f0e442}
.flag{color:#111;background:#f0e442;padding:.3em .6em;font-weight:bold;display:inline-block}
</style></head><body>
<h1 id="title"></h1><p id="review"></p><p id="facts"></p><ul id="notes" class="warn"></ul>
<div class="row"><div>
<div id="stage"><img id="flair" alt="FLAIR slice"><img id="overlay" alt="outlines">
<span class="side" style="left:4px;top:246px">R</span>
<span class="side" style="right:4px;top:246px">L</span>
<span class="side" style="left:250px;top:2px">A</span>
<span class="side" style="left:250px;bottom:2px">P</span>
<div id="scale"></div><span id="scalelabel"></span></div>
<input id="slider" type="range" min="0" value="0" aria-label="slice">
<div id="strip"></div><p id="stripkey"></p>
<label>outline opacity <input id="opacity" type="range" min="0" max="100" value="100"></label>
</div><div>
<h2 id="slicetitle"></h2><table id="sliceinfo"></table>
<h3>Legend</h3><p id="legend"></p>
<p>Keys: left/right arrows move one slice. Background: the FLAIR channel in grayscale.</p>
</div></div>
<script>
const DATA = {{DATA}};
const S = DATA.summary, slices = DATA.slices;
const rgb = c => `rgb(${c[0]},${c[1]},${c[2]})`;
document.getElementById("title").textContent = S.patient;
const volume = S.volume_ml === null ? "volume unknown (no voxel spacing given)"
  : `tumour volume ${S.volume_ml} mL (voxels ${S.spacing.join(" x ")} mm, from ` +
    `${S.spacing_from})`;
document.getElementById("facts").textContent = `${S.slices} slices; mask drawn on ` +
  `${S.tumour_slices}; ${S.pixels} px; ${volume}` + (S.dice === null ? "" : `; Dice ${S.dice}`) +
  `; sequences ${S.sequences}` + (S.sequences === "flair" ? " (FLAIR only: the other " +
  "channels filled with FLAIR)" : "") + `; stage 1 (gate) passes P >= ${S.gate_threshold}`;
if (S.spacing !== null) {  // a 10 mm bar at the slice's display scale
  const px = 10 / S.spacing[0] * 512 / S.width;
  document.getElementById("scale").style.width = `${px}px`;
  document.getElementById("scalelabel").textContent = "10 mm";
}
const keys = S.has_truth ? [[S.predicted_rgb, "hit (mask and truth)"],
  [S.false_alarm_rgb, "false alarm (mask, no truth)"], [S.truth_rgb, "miss (truth, no mask)"],
  [[51, 51, 51], "neither"]] : [[S.predicted_rgb, "mask drawn"], [[51, 51, 51], "no mask"]];
document.getElementById("stripkey").innerHTML = "slices: " + keys.map(([c, t]) =>
  `<span class="key" style="background:${rgb(c)}"></span>${t}`).join(" &nbsp; ");
document.getElementById("legend").innerHTML =
  `<span class="key" style="background:${rgb(S.predicted_rgb)}"></span>predicted outline<br>` +
  (S.has_truth ? `<span class="key" style="background:${rgb(S.truth_rgb)}"></span>` +
   "ground-truth outline" : "no ground truth given");
const review = document.getElementById("review");
if (S.review === 1) {
  review.className = "flag";
  review.textContent = `CHECK THIS MASK: predicted Dice ${S.predicted_dice}, in the range ` +
    "where held-out masks were often poor (quality estimate, docs/model-card.md)";
} else if (S.review === 0) {
  review.textContent = `predicted Dice ${S.predicted_dice} (quality estimate)`;
}
for (const note of S.notes) {
  const li = document.createElement("li");
  li.textContent = "note: " + note;
  document.getElementById("notes").appendChild(li);
}
const slider = document.getElementById("slider"), strip = document.getElementById("strip");
slider.max = slices.length - 1;
for (const s of slices) {
  const d = document.createElement("div");
  d.style.background = s.px > 0 ? rgb(s.truth_px === 0 ? S.false_alarm_rgb : S.predicted_rgb)
    : (s.truth_px ? rgb(S.truth_rgb) : "#333");
  d.title = `slice ${s.n}` + (s.finding ? `: ${s.finding}` : "");
  strip.appendChild(d);
}
function show(i) {
  const s = slices[i];
  slider.value = i;
  document.getElementById("flair").src = "data:image/png;base64," + s.flair;
  document.getElementById("overlay").src = "data:image/png;base64," + s.overlay;
  document.getElementById("slicetitle").textContent = `slice ${s.n} (${i + 1} of ${slices.length})`;
  const rows = [["stage 1 (gate) probability", s.p.toFixed(4)],
    ["passed stage 1", s.gate ? "yes" : "no"], ["mask pixels", s.px]];
  if (s.truth_px !== null) rows.push(["ground-truth pixels", s.truth_px]);
  if (s.finding) rows.push(["finding", s.finding]);
  document.getElementById("sliceinfo").innerHTML = rows.map(([k, v]) =>
    `<tr><td>${k}</td><td class="${v === "miss" || v === "false alarm" ? "warn" : ""}">` +
    `${v}</td></tr>`).join("");
}
slider.addEventListener("input", () => show(+slider.value));
document.getElementById("opacity").addEventListener("input", e =>
  document.getElementById("overlay").style.opacity = e.target.value / 100);
document.addEventListener("keydown", e => {
  if (e.key === "ArrowRight") show(Math.min(slices.length - 1, +slider.value + 1));
  if (e.key === "ArrowLeft") show(Math.max(0, +slider.value - 1));
});
const hash = /slice=(\\d+)/.exec(location.hash);
const largest = slices.reduce((b, s, i) => s.px > slices[b].px ? i : b, 0);
const wanted = hash ? slices.findIndex(s => s.n === +hash[1]) : -1;
show(wanted >= 0 ? wanted : largest);
</script></body></html>
"""
