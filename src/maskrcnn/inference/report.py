"""``maskrcnn eval --report``: one self-contained ``report.html`` (no network needed to open
it) with the AP table, per-class AP, per-class precision / recall / F1, a confusion matrix
with background, the PR curves and a gallery of the worst images, filterable by class.

Matching (mask IoU >= 0.5, as COCO's AP50; crowd regions neither count as misses nor make a
prediction on them a false positive): per class, predictions in order of score take the
unmatched ground truth they overlap most. The confusion matrix matches regardless of class, so
that a right mask with the wrong class shows as a confusion, not as a miss plus a false alarm.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.data.coco import CocoDataset
from maskrcnn.engine.coco_metrics import CocoEvaluator, category_names, to_rle
from maskrcnn.structures.local_masks import LocalMasks
from maskrcnn.utils.atomic import write_text_atomic
from maskrcnn.utils.visualize import draw_instances, side_by_side

IOU = 0.5
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
BACKGROUND = "background"


@dataclass
class ImageMatches:
    """One image: ground truth and predictions (category ids, scores, RLE masks) and the
    IoU of every prediction with every ground-truth mask."""

    image_id: int
    gt_cats: list[int]
    gt_crowd: list[bool]
    gt_rles: list[Any]
    pred_cats: list[int]
    pred_scores: list[float]
    pred_rles: list[Any]
    iou: np.ndarray  # (predictions, ground truth)


@dataclass
class ClassScores:
    """Precision, recall and F1 of one class at a score threshold."""

    name: str
    ground_truth: int
    best_thresh: float
    best: tuple[float, float, float]  # precision, recall, F1 at best_thresh
    at_thresh: tuple[float, float, float]


@dataclass
class Report:
    """Everything the HTML shows, also for tests."""

    metrics: dict[str, Any]
    classes: list[ClassScores]
    confusion: np.ndarray  # (K+1, K+1): rows ground truth, columns prediction; last: background
    names: list[str]  # K class names, in category id order
    thresh: float
    worst: list[tuple[int, int, set[str]]] = field(default_factory=list)  # id, errors, classes


def by_image(items: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Annotations or results grouped by their ``image_id``."""
    grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        grouped[item["image_id"]].append(item)
    return grouped


def image_matches(evaluator: CocoEvaluator) -> list[ImageMatches]:
    """The evaluated images with their ground truth, predictions and IoUs."""
    gt_by_image = by_image(evaluator.gt["annotations"])
    pred_by_image = by_image(evaluator.results_json())
    sizes = {img["id"]: (img["height"], img["width"]) for img in evaluator.gt["images"]}
    out = []
    for image_id in evaluator.evaluated_image_ids():
        height, width = sizes[image_id]
        gts = gt_by_image.get(image_id, [])
        preds = sorted(pred_by_image.get(image_id, []), key=lambda r: -r["score"])
        gt_rles = [to_rle(a["segmentation"], height, width) for a in gts]
        pred_rles = [r["segmentation"] for r in preds]
        crowd = [bool(a.get("iscrowd", 0)) for a in gts]
        iou = (
            np.asarray(mask_utils.iou(pred_rles, gt_rles, [int(c) for c in crowd]))
            if pred_rles and gt_rles
            else np.zeros((len(pred_rles), len(gt_rles)))
        )
        out.append(ImageMatches(image_id, [a["category_id"] for a in gts], crowd, gt_rles,
                                [r["category_id"] for r in preds],
                                [float(r["score"]) for r in preds], pred_rles, iou))
    return out


def match_by_class(m: ImageMatches) -> list[tuple[int, float, bool | None]]:
    """Per prediction (category, score, true positive?); None for one on a crowd region."""
    taken: set[int] = set()
    out: list[tuple[int, float, bool | None]] = []
    for p, (cat, score) in enumerate(zip(m.pred_cats, m.pred_scores, strict=True)):
        best, best_iou = -1, IOU
        for g, gt_cat in enumerate(m.gt_cats):
            if gt_cat == cat and not m.gt_crowd[g] and g not in taken and m.iou[p, g] >= best_iou:
                best, best_iou = g, float(m.iou[p, g])
        if best >= 0:
            taken.add(best)
            out.append((cat, score, True))
        else:
            on_crowd = any(
                m.gt_crowd[g] and gt_cat == cat and m.iou[p, g] >= IOU
                for g, gt_cat in enumerate(m.gt_cats)
            )
            out.append((cat, score, None if on_crowd else False))
    return out


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def class_scores(
    matches: Sequence[ImageMatches], cat_ids: Sequence[int], names: Sequence[str], thresh: float
) -> list[ClassScores]:
    """Per class: the threshold of the best F1, the scores there, and at ``thresh``."""
    found: dict[int, list[tuple[float, bool]]] = defaultdict(list)
    totals: dict[int, int] = defaultdict(int)
    for m in matches:
        for cat, crowd in zip(m.gt_cats, m.gt_crowd, strict=True):
            totals[cat] += 0 if crowd else 1
        for cat, score, hit in match_by_class(m):
            if hit is not None:
                found[cat].append((score, hit))
    out = []
    for cat, name in zip(cat_ids, names, strict=True):
        ranked = sorted(found[cat], key=lambda x: -x[0])
        hits = np.cumsum([h for _, h in ranked]) if ranked else np.zeros(0)
        best = (0.0, 0.0, 0.0)
        best_thresh = 1.0
        for k, (score, _) in enumerate(ranked):
            if k + 1 < len(ranked) and ranked[k + 1][0] == score:
                continue  # a threshold keeps every prediction of that score
            tp = int(hits[k])
            scores = _prf(tp, k + 1 - tp, totals[cat] - tp)
            if scores[2] > best[2]:
                best, best_thresh = scores, score
        kept = [h for s, h in ranked if s >= thresh]
        at = _prf(sum(kept), len(kept) - sum(kept), totals[cat] - sum(kept))
        out.append(ClassScores(name, totals[cat], best_thresh, best, at))
    return out


def confusion_matrix(
    matches: Sequence[ImageMatches], cat_ids: Sequence[int], thresh: float
) -> np.ndarray:
    """(K+1, K+1) counts: rows the ground truth's class, columns the prediction's; the last
    row holds predictions matching no object, the last column objects nothing matched."""
    index = {c: k for k, c in enumerate(cat_ids)}
    k = len(cat_ids)
    counts = np.zeros((k + 1, k + 1), dtype=np.int64)
    for m in matches:
        taken: set[int] = set()
        for p, (cat, score) in enumerate(zip(m.pred_cats, m.pred_scores, strict=True)):
            if score < thresh:
                continue
            objects = [g for g in range(len(m.gt_cats))
                       if not m.gt_crowd[g] and g not in taken and m.iou[p, g] >= IOU]
            if objects:  # the object it overlaps most; crowd regions only when none is left
                g = max(objects, key=lambda j: m.iou[p, j])
                taken.add(g)
                counts[index[m.gt_cats[g]], index[cat]] += 1
            elif not any(m.gt_crowd[g] and m.iou[p, g] >= IOU for g in range(len(m.gt_cats))):
                counts[k, index[cat]] += 1  # on nothing: a false alarm (on a crowd: neither)
        for g, cat in enumerate(m.gt_cats):
            if g not in taken and not m.gt_crowd[g]:
                counts[index[cat], k] += 1
    return counts


def worst_images(
    matches: Sequence[ImageMatches], names: dict[int, str], thresh: float, count: int
) -> list[tuple[int, int, set[str]]]:
    """The ``count`` images with the most errors at ``thresh`` (false positives + misses):
    (image id, errors, the classes involved)."""
    ranked = []
    for m in matches:
        decided = [(c, s, h) for c, s, h in match_by_class(m) if h is not None and s >= thresh]
        false_pos = sum(1 for _, _, h in decided if not h)
        found = sum(1 for _, _, h in decided if h)
        misses = sum(1 for crowd in m.gt_crowd if not crowd) - found
        classes = {names[c] for c in m.gt_cats} | {names[c] for c, _, _ in decided}
        if false_pos + misses:
            ranked.append((m.image_id, false_pos + misses, classes))
    ranked.sort(key=lambda x: (-x[1], x[0]))
    return ranked[:count]


def build_report(
    evaluator: CocoEvaluator, metrics: dict[str, Any], thresh: float, gallery: int = 12
) -> Report:
    by_id = category_names(evaluator.gt["categories"])  # the names of metrics["per_class"]
    cat_ids = sorted(by_id)
    names = [by_id[c] for c in cat_ids]
    matches = image_matches(evaluator)
    return Report(
        metrics=metrics,
        classes=class_scores(matches, cat_ids, names, thresh),
        confusion=confusion_matrix(matches, cat_ids, thresh),
        names=names,
        thresh=thresh,
        worst=worst_images(matches, dict(zip(cat_ids, names, strict=True)), thresh, gallery),
    )


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _confusion_figure(report: Report, path: Path) -> None:
    labels = [*report.names, BACKGROUND]
    size = 2.5 + 0.45 * len(labels)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(np.log1p(report.confusion), cmap="Blues")
    for (row, col), value in np.ndenumerate(report.confusion):
        ax.text(col, row, str(value), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(f"score >= {report.thresh:g}, IoU >= {IOU:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _gallery_picture(
    dataset: CocoDataset, image_id: int, gts: list[dict[str, Any]],
    results: list[dict[str, Any]], names: list[str], cat_index: dict[int, int], thresh: float,
) -> Image.Image:
    index = dataset.image_ids.index(image_id)
    image = dataset.read_image(index)
    height, width = image.shape[-2:]
    preds = [r for r in results if r["score"] >= thresh]

    def draw(items: list[dict[str, Any]], scores: bool) -> Image.Image:
        if not items:
            return Image.fromarray(image.permute(1, 2, 0).numpy())
        # One mask decoded at a time and kept over its box: the gallery of a large image
        # never holds N image-sized masks.
        masks = LocalMasks.cat([
            LocalMasks.from_dense(torch.from_numpy(
                mask_utils.decode(to_rle(i["segmentation"], height, width)).astype(bool)
            )[None]) for i in items
        ], (height, width))
        labels = torch.tensor([cat_index[i["category_id"]] for i in items])
        score = torch.tensor([i["score"] for i in items]) if scores else None
        boxes = torch.tensor([i["bbox"] for i in items], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        return draw_instances(image, boxes, labels, score, masks, ["", *names])

    return side_by_side(draw(gts, False), draw(preds, True))


def write_report(
    out: Path, evaluator: CocoEvaluator, dataset: CocoDataset, metrics: dict[str, Any],
    thresh: float = 0.5, gallery: int = 12,
) -> Path:
    """``out/report.html``, with ``out/confusion.png`` and ``out/confusion.csv``; returns the
    HTML's path."""
    report = build_report(evaluator, metrics, thresh, gallery)
    out.mkdir(parents=True, exist_ok=True)
    labels = [*report.names, BACKGROUND]
    with (out / "confusion.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ground truth \\ prediction", *labels])
        for name, row in zip(labels, report.confusion.tolist(), strict=True):
            writer.writerow([name, *row])
    _confusion_figure(report, out / "confusion.png")
    cat_index = {c: k + 1 for k, c in enumerate(sorted(category_names(
        evaluator.gt["categories"])))}
    gts, results = by_image(evaluator.gt["annotations"]), by_image(evaluator.results_json())
    pictures = [
        (image_id, errors, classes,
         _png(_gallery_picture(dataset, image_id, gts[image_id], results[image_id],
                               report.names, cat_index, thresh)))
        for image_id, errors, classes in report.worst
    ]
    curves = {t: out / f"pr_curve_{t}.png" for t in ("bbox", "segm")}
    page = render_html(report, pictures, {
        "confusion": _png(Image.open(out / "confusion.png")),
        **{t: _png(Image.open(p)) for t, p in curves.items() if p.is_file()},
    })
    return write_text_atomic(out / "report.html", page)


def _fmt(value: float) -> str:
    return "–" if value < 0 else f"{value:.3f}"


def render_html(
    report: Report, pictures: list[tuple[int, int, set[str], str]], images: dict[str, str]
) -> str:
    """The page: inline CSS and script, pictures as data URLs."""
    esc = html.escape
    ap_rows = "".join(
        f"<tr><th>{t}</th>" + "".join(
            f'<td data-key="{t}/{k}">{_fmt(report.metrics[t][k])}</td>' for k in KEYS
        ) + "</tr>"
        for t in ("bbox", "segm") if t in report.metrics
    )
    per_class_ap = report.metrics.get("segm", {}).get("per_class", {})
    box_ap = report.metrics.get("bbox", {}).get("per_class", {})
    class_rows = "".join(
        f'<tr data-class="{esc(c.name)}"><th>{esc(c.name)}</th><td>{c.ground_truth}</td>'
        f'<td data-key="segm/{esc(c.name)}">{_fmt(per_class_ap.get(c.name, -1))}</td>'
        f'<td>{_fmt(box_ap.get(c.name, -1))}</td>'
        f"<td>{c.best_thresh:.2f}</td>" + "".join(f"<td>{v:.3f}</td>" for v in c.best)
        + "".join(f"<td>{v:.3f}</td>" for v in c.at_thresh) + "</tr>"
        for c in report.classes
    )
    labels = [*report.names, BACKGROUND]
    confusion_rows = "".join(
        f"<tr><th>{esc(name)}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
        for name, row in zip(labels, report.confusion.tolist(), strict=True)
    )
    cards = "".join(
        f'<figure class="card" data-classes="{esc(json.dumps(sorted(classes)))}">'
        f'<img alt="image {image_id}" src="data:image/png;base64,{data}">'
        f"<figcaption>image id {image_id}: {errors} error{'s' if errors != 1 else ''} "
        f"({esc(', '.join(sorted(classes)))})</figcaption></figure>"
        for image_id, errors, classes, data in pictures
    )
    options = "".join(f'<option value="{esc(n)}">{esc(n)}</option>' for n in report.names)
    curves = "".join(
        f'<img alt="PR curves {t}" src="data:image/png;base64,{images[t]}">'
        for t in ("bbox", "segm") if t in images
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>maskrcnn evaluation report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:right}}th{{background:#f4f4f4}}figure.card{{display:inline-block;margin:6px;
vertical-align:top;max-width:48%}}figure.card img{{max-width:100%}}img{{max-width:100%}}
.hidden{{display:none !important}}
</style></head><body>
<h1>Evaluation report</h1>
<p>Matching: mask IoU ≥ {IOU:g}; operating threshold for the confusion matrix, the
precision / recall / F1 columns “at {report.thresh:g}” and the gallery: score ≥
{report.thresh:g}.</p>
<label>Show class: <select id="class-filter"><option value="">all classes</option>{options}
</select></label>
<h2>COCO AP</h2><table id="ap"><tr><th></th>{"".join(f"<th>{k}</th>" for k in KEYS)}</tr>
{ap_rows}</table>
<h2>Per class</h2><table id="per-class"><tr><th>class</th><th>objects</th><th>mask AP</th>
<th>box AP</th><th>best-F1 score threshold</th><th>precision</th><th>recall</th><th>F1</th>
<th>precision at {report.thresh:g}</th><th>recall at {report.thresh:g}</th>
<th>F1 at {report.thresh:g}</th></tr>{class_rows}</table>
<h2>Confusion matrix (rows: ground truth, columns: prediction)</h2>
<table id="confusion"><tr><th></th>{"".join(f"<th>{esc(n)}</th>" for n in labels)}</tr>
{confusion_rows}</table>
<img alt="confusion matrix" src="data:image/png;base64,{images["confusion"]}">
<h2>Precision–recall</h2>{curves}
<h2>Worst images (ground truth left, prediction right)</h2><div id="gallery">{cards}</div>
<script>
document.getElementById("class-filter").addEventListener("change", (event) => {{
  const wanted = event.target.value;
  for (const row of document.querySelectorAll("#per-class tr[data-class]")) {{
    row.classList.toggle("hidden", wanted !== "" && row.dataset.class !== wanted);
  }}
  for (const card of document.querySelectorAll("#gallery .card")) {{
    const classes = JSON.parse(card.dataset.classes);
    card.classList.toggle("hidden", wanted !== "" && !classes.includes(wanted));
  }}
}});
</script></body></html>
"""
