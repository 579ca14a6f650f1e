"""Sliced prediction: a large image cut into overlapping tiles, each run at the model's
size, detections merged back into one instance per object.

Flow, per image::

    windows = tile grid (size, overlap; the last tile of a row or column aligned to the edge)
    for tiles, batch_size at a time: crop (uint8 → float per tile) -> model -> boxes and 28x28
        mask probabilities -> each mask pasted over its own box (box-local, never H x W)
    optional whole-image pass at the model's size (the large objects; SAHI's "standard")
    a detection is *cut* when its box touches a tile edge that is not an image edge
    pairs: same class, different tiles (or tile and whole pass), boxes meeting inside the two
        windows' common area; matched when their masks' IoU *inside that area* >= match_iou
    groups: matched pairs joined, strongest first, never two detections of one tile in a group
    per group: a member seen whole (not cut) gives the mask, box and score, the best-scored
        one, tiles before the whole pass; if every member is cut, the masks are united and
        the best score taken
    pieces (all members cut) go: a piece no other tile matched when another tile holds its
        box away from that tile's inner edges (that tile saw those pixels, with more around
        them, as no such object); a piece (next to) empty; a piece mostly inside a larger
        detection of any class, seen whole or scoring at least as high; then a mask NMS per
        class; best first
        (the Predictor keeps at most max_detections)

The IoU inside the common area is the test of "the same object": two tiles saw the same
pixels there, so a cut object's pieces agree on them, a duplicate in the overlap agrees
everywhere, and two neighbouring objects do not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from maskrcnn.inference.tta import TTAConfig, tta_box_probs
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.model.postprocess import expand_boxes, paste_masks
from maskrcnn.model.preprocess import resize_scale, resized_size, scale_boxes
from maskrcnn.structures.detections import Detections
from maskrcnn.structures.local_masks import LocalMasks
from maskrcnn.utils.malloc import release_freed_memory

PIECE_INSIDE = 0.8  # a lower-scored detection this much inside a better one is a piece of it
# A cut detection whose mask spans less than EMPTY_PIECE of its box (the extent of its
# pixels against the box's area) is dropped: a box the model put on the few pixels of an
# object beyond the tile's edge, with next to no mask in it. (A thin diagonal object, a
# cable or a crack, fills little of its box too, but spans all of it.)
EMPTY_PIECE = 0.25
# A piece goes inside a larger whole detection of another class only if that one scores at
# least this fraction of the piece's score (a weak, large detection must not erase objects).
OTHER_CLASS_SCORE = 0.5
TRIM_EVERY = 4  # batches of tiles between two trims of the heap (see release_freed_memory)
Window = tuple[int, int, int, int]  # x0, y0, x1, y1 (ends exclusive)
# images (3, h, w) float in [0, 1] -> per image detections in its pixels and their masks
TilePredictor = Callable[[list[Tensor]], list[tuple[Detections, LocalMasks]]]


@dataclass(frozen=True)
class TileConfig:
    """Sliced prediction: square tiles of ``size`` pixels overlapping by ``overlap`` (a
    fraction of ``size``), run ``batch_size`` at a time; ``full_pass``: also predict the
    whole image at the model's size (finds objects larger than a tile); ``match_iou``: the
    mask IoU, inside two tiles' common area, above which their detections are one object;
    ``edge_margin``: pixels from a tile's inner edge within which a box counts as cut."""

    size: int = 1024
    overlap: float = 0.25
    batch_size: int = 4
    full_pass: bool = False
    match_iou: float = 0.5
    edge_margin: float = 2.0

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"tile size must be at least 16 pixels, got {self.size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tile overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise ValueError(f"tile batch size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.match_iou <= 1.0:
            raise ValueError(f"match_iou must be in (0, 1], got {self.match_iou}")


def axis_starts(length: int, size: int, overlap: float) -> list[int]:
    """Tile starts along one axis of ``length`` pixels: every ``size * (1 - overlap)``
    pixels, and a last tile ending at the edge; one tile when the axis fits in one."""
    if length <= size:
        return [0]
    stride = max(1, int(size * (1.0 - overlap)))
    return [*range(0, length - size, stride), length - size]


def tile_windows(height: int, width: int, size: int, overlap: float) -> list[Window]:
    """The tiles of an image, row by row: (x0, y0, x1, y1), ends exclusive, each inside
    the image (smaller than ``size`` only where the image is)."""
    return [
        (x, y, min(x + size, width), min(y + size, height))
        for y in axis_starts(height, size, overlap)
        for x in axis_starts(width, size, overlap)
    ]


def paste_local(
    probs: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float
) -> LocalMasks:
    """(N, 1, M, M) box-relative probabilities → binary masks over their own boxes, with the
    values :func:`paste_masks` gives at those pixels (the same grown, integer box)."""
    n = boxes.shape[0]
    if n == 0:
        return LocalMasks.empty(image_size)
    h, w = image_size
    side = probs.shape[-1]
    grown = expand_boxes(boxes.float(), (side + 2) / side).to(torch.int64)
    lo = torch.stack([grown[:, 0].clamp(0, w - 1), grown[:, 1].clamp(0, h - 1)], 1)
    hi = torch.stack([grown[:, 2].clamp(0, w - 1), grown[:, 3].clamp(0, h - 1)], 1)
    crops = []
    for k in range(n):
        x0, y0 = (int(v) for v in lo[k])
        x1, y1 = (int(v) for v in hi[k])
        shift = boxes.new_tensor([x0, y0, x0, y0])
        pasted = paste_masks(probs[k : k + 1], boxes[k : k + 1] - shift, (y1 - y0 + 1, x1 - x0 + 1))
        crops.append((pasted[0, 0] > threshold).cpu())
    return LocalMasks(crops, lo.cpu(), image_size)


def box_probs(
    model: MaskRCNN, images: list[Tensor], tta: TTAConfig | None = None
) -> list[tuple[Detections, Tensor]]:
    """``model.predict`` before the paste: per image its detections in the image's pixels
    and their (N, 1, 28, 28) mask probabilities (with ``tta``: merged over its views)."""
    if tta is not None:
        return tta_box_probs(model, images, tta)
    batch, _ = model.preprocess(images, None, training=False)
    features, dets = model.detect_boxes(batch)
    labels = torch.cat([d.labels for d in dets])
    probs = model.mask_probs(features, [d.boxes for d in dets], batch.image_sizes, labels)
    out = []
    for d, p, size, original in zip(
        dets, probs.split([len(d.boxes) for d in dets]), batch.image_sizes,
        batch.original_sizes, strict=True,
    ):
        out.append((Detections(scale_boxes(d.boxes, size, original), d.scores, d.labels), p))
    return out


def model_tile_predictor(
    model: MaskRCNN, mask_threshold: float, tta: TTAConfig | None = None
) -> TilePredictor:
    """The model (eval mode, called under ``inference_mode``) as a :data:`TilePredictor`."""

    device = next(model.parameters()).device

    def predict(images: list[Tensor]) -> list[tuple[Detections, LocalMasks]]:
        images = [im.to(device) for im in images]
        return [
            (d, paste_local(p, d.boxes, (im.shape[-2], im.shape[-1]), mask_threshold))
            for (d, p), im in zip(box_probs(model, images, tta), images, strict=True)
        ]

    return predict


@dataclass
class Candidates:
    """Every detection of every pass, in image pixels: ``source[i]`` the index of the
    window it came from (the whole-image pass has the whole image as its window), ``cut[i]``
    whether its box touches an inner edge of that window."""

    dets: Detections
    masks: LocalMasks
    source: Tensor
    cut: Tensor
    windows: list[Window]
    full_source: int | None  # the whole-image pass's window index, if it ran
    edge_margin: float = 2.0  # the ``cut`` test's margin (TileConfig.edge_margin)


def cut_by_window(boxes: Tensor, window: Window | Tensor, image_size: tuple[int, int],
                  margin: float) -> Tensor:
    """Whether xyxy ``boxes`` touch (within ``margin`` pixels) an edge of ``window`` that is
    not an edge of the image; ``boxes`` (..., 4) and a tensor of windows (..., 4) broadcast."""
    x0, y0, x1, y1 = torch.as_tensor(window, dtype=boxes.dtype, device=boxes.device).unbind(-1)
    h, w = image_size
    return (
        ((x0 > 0) & (boxes[..., 0] <= x0 + margin))
        | ((y0 > 0) & (boxes[..., 1] <= y0 + margin))
        | ((x1 < w) & (boxes[..., 2] >= x1 - margin))
        | ((y1 < h) & (boxes[..., 3] >= y1 - margin))
    )


def as_float_tile(image: Tensor) -> Tensor:
    """A tile as the model takes it: float in [0, 1]. Divided in place: one block per tile,
    not two (with two, glibc's heap fragments and the process grows tile after tile)."""
    return image.to(torch.float32).div_(255.0) if image.dtype == torch.uint8 else image.float()


def shrink_for_full_pass(image: Tensor, model: MaskRCNN) -> tuple[Tensor, tuple[int, int]]:
    """The whole image at the model's input size, as float in [0, 1], resized from the
    original (uint8 stays uint8 until then: a 20,000-pixel image is 1.2 GB as uint8 and 4.8
    GB as float)."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    cfg = model.cfg
    scale = resize_scale(h, w, cfg.min_sizes[-1], cfg.max_size)
    size = resized_size(h, w, scale)
    if scale >= 1.0:
        return as_float_tile(image), (h, w)
    small = torch.nn.functional.interpolate(
        image[None].float() if image.dtype != torch.uint8 else image[None],
        size=size, mode="bilinear", antialias=True, align_corners=False,
    )[0]
    return as_float_tile(small), size


def collect(
    image: Tensor, predict_tiles: TilePredictor, cfg: TileConfig,
    full_pass: Callable[[Tensor], tuple[Detections, LocalMasks]] | None,
    windows: list[Window] | None = None,
) -> Candidates:
    """Runs every tile (and the whole-image pass) and gathers their detections in image
    pixels. ``windows``: other tiles than ``cfg``'s grid."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    if windows is None:
        windows = tile_windows(h, w, cfg.size, cfg.overlap)
    parts: list[tuple[Detections, LocalMasks, int]] = []
    for start in range(0, len(windows), cfg.batch_size):
        group = windows[start : start + cfg.batch_size]
        tiles = [as_float_tile(image[:, y0:y1, x0:x1]) for x0, y0, x1, y1 in group]
        for k, ((d, m), (x0, y0, _, _)) in enumerate(zip(predict_tiles(tiles), group,
                                                          strict=True)):
            offset = d.boxes.new_tensor([x0, y0, x0, y0])
            moved = LocalMasks(m.crops, m.origins + torch.tensor([x0, y0]), (h, w))
            parts.append((Detections(d.boxes + offset, d.scores, d.labels), moved, start + k))
        if start // cfg.batch_size % TRIM_EVERY == TRIM_EVERY - 1:
            release_freed_memory()
    full_source = None
    # One tile covering the image is already the whole-image pass.
    if full_pass is not None and len(windows) > 1:
        d, m = full_pass(image)
        # An object no wider and no taller than the tiles' overlap lies whole in some tile,
        # which sees it at a finer scale: the whole-image pass keeps only the larger ones.
        seen_whole = cfg.size - max(1, int(cfg.size * (1.0 - cfg.overlap)))
        sides = d.boxes[:, 2:] - d.boxes[:, :2]
        large = torch.where((sides > seen_whole).any(1))[0]
        d, m = d.select(large), m.select(large.cpu())
        full_source = len(windows)
        windows = [*windows, (0, 0, w, h)]
        parts.append((d, m, full_source))
    if not parts:
        empty = torch.zeros(0)
        return Candidates(Detections(torch.zeros(0, 4), empty, empty.long()),
                          LocalMasks.empty((h, w)), empty.long(), empty.bool(), windows,
                          full_source, cfg.edge_margin)
    dets = Detections(
        torch.cat([p[0].boxes.float().cpu() for p in parts]),
        torch.cat([p[0].scores.float().cpu() for p in parts]),
        torch.cat([p[0].labels.cpu() for p in parts]),
    )
    source = torch.cat([torch.full((len(p[1]),), p[2], dtype=torch.int64) for p in parts])
    cut = torch.cat([cut_by_window(p[0].boxes.float().cpu(), windows[p[2]], (h, w),
                                   cfg.edge_margin) for p in parts])
    masks = LocalMasks.cat([p[1] for p in parts], (h, w))
    return Candidates(dets, masks, source, cut, windows, full_source, cfg.edge_margin)


def _clip(crop: Tensor, origin: tuple[int, int], region: Window) -> tuple[Tensor, int, int]:
    """The part of ``crop`` (at ``origin`` x, y) inside ``region``, and its origin."""
    x, y = origin
    x0, y0 = max(x, region[0]), max(y, region[1])
    x1 = min(x + crop.shape[1], region[2])
    y1 = min(y + crop.shape[0], region[3])
    if x1 <= x0 or y1 <= y0:
        return crop[:0, :0], x0, y0
    return crop[y0 - y : y1 - y, x0 - x : x1 - x], x0, y0


def _intersection(a: tuple[Tensor, tuple[int, int]], b: tuple[Tensor, tuple[int, int]],
                  region: Window, areas: list[int] | None = None) -> int:
    """Pixels two box-local masks share inside ``region``; ``areas``, if given, receives
    each mask's own pixel count inside the region."""
    ca, ax, ay = _clip(*a, region)
    cb, bx, by = _clip(*b, region)
    if areas is not None:
        areas += [int(ca.sum()), int(cb.sum())]
    x0, y0 = max(ax, bx), max(ay, by)
    x1, y1 = min(ax + ca.shape[1], bx + cb.shape[1]), min(ay + ca.shape[0], by + cb.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0
    return int((ca[y0 - ay : y1 - ay, x0 - ax : x1 - ax]
                & cb[y0 - by : y1 - by, x0 - bx : x1 - bx]).sum())


def iou_inside(a: tuple[Tensor, tuple[int, int]], b: tuple[Tensor, tuple[int, int]],
               region: Window) -> float:
    """IoU of two box-local masks counting only the pixels inside ``region``."""
    areas: list[int] = []
    inter = _intersection(a, b, region, areas)
    if min(areas) == 0:
        return 0.0
    return inter / (areas[0] + areas[1] - inter)


def _common(a: Window, b: Window) -> Window | None:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _meets(a: Tensor, b: Tensor) -> Tensor:
    """Whether xyxy boxes ``a`` (..., 4) and ``b`` (..., 4) overlap (by a positive area),
    broadcast over their leading dimensions."""
    return ((a[..., 0] < b[..., 2]) & (b[..., 0] < a[..., 2])
            & (a[..., 1] < b[..., 3]) & (b[..., 1] < a[..., 3]))


def matched_pairs(c: Candidates, match_iou: float) -> list[tuple[float, int, int]]:
    """(IoU inside the common area, i, j) of detections of different windows that are the
    same object; only detections whose boxes meet the two windows' common area are tried."""
    by_source: dict[int, Tensor] = {}
    for s in c.source.unique().tolist():
        by_source[int(s)] = torch.where(c.source == s)[0]
    sources = sorted(by_source)
    crops = list(c.masks)
    pairs = []
    for a_pos, sa in enumerate(sources):
        for sb in sources[a_pos + 1 :]:
            region = _common(c.windows[sa], c.windows[sb])
            if region is None:
                continue
            area = c.dets.boxes.new_tensor(region)
            ia = by_source[sa][_meets(c.dets.boxes[by_source[sa]], area)]
            ib = by_source[sb][_meets(c.dets.boxes[by_source[sb]], area)]
            if ia.numel() == 0 or ib.numel() == 0:
                continue
            same = c.dets.labels[ia][:, None] == c.dets.labels[ib][None, :]
            ba, bb = c.dets.boxes[ia][:, None], c.dets.boxes[ib][None, :]
            for p, q in torch.nonzero(same & _meets(ba, bb)).tolist():
                i, j = int(ia[p]), int(ib[q])
                iou = iou_inside(crops[i], crops[j], region)
                if iou >= match_iou:
                    pairs.append((iou, i, j))
    return pairs


def group_candidates(c: Candidates, match_iou: float) -> list[list[int]]:
    """Groups of detections that are one object: matched pairs joined strongest first,
    unless the two groups hold detections of the same window (the model already decided
    that those are different objects)."""
    n = len(c.dets.scores)
    parent = list(range(n))
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    sources: dict[int, set[int]] = {i: {int(c.source[i])} for i in range(n)}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for _, i, j in sorted(matched_pairs(c, match_iou), reverse=True):
        ri, rj = root(i), root(j)
        if ri == rj or sources[ri] & sources[rj]:
            continue
        if len(members[ri]) < len(members[rj]):
            ri, rj = rj, ri
        parent[rj] = ri
        members[ri] += members.pop(rj)
        sources[ri] |= sources.pop(rj)
    return list(members.values())


def unite(masks: LocalMasks, index: Sequence[int]) -> tuple[Tensor, tuple[int, int]]:
    """The union of masks ``index`` as one crop and its origin."""
    parts = [(masks.crops[i], (int(masks.origins[i, 0]), int(masks.origins[i, 1])))
             for i in index]
    x0 = min(o[0] for _, o in parts)
    y0 = min(o[1] for _, o in parts)
    x1 = max(o[0] + c.shape[1] for c, o in parts)
    y1 = max(o[1] + c.shape[0] for c, o in parts)
    out = torch.zeros((y1 - y0, x1 - x0), dtype=torch.bool)
    for crop, (x, y) in parts:
        out[y - y0 : y - y0 + crop.shape[0], x - x0 : x - x0 + crop.shape[1]] |= crop
    return out, (x0, y0)


def merge(c: Candidates, match_iou: float) -> tuple[Detections, LocalMasks]:
    """One detection per group (see the module's flow), best score first."""
    boxes, scores, labels, crops, origins, pieces = [], [], [], [], [], []
    held_whole = seen_whole_by_another_tile(c)
    for group in group_candidates(c, match_iou):
        idx = torch.tensor(group)
        best = int(idx[c.dets.scores[idx].argmax()])
        whole = [i for i in group if not bool(c.cut[i])]
        if not whole and len(group) == 1 and held_whole(group[0]):
            continue  # a lone piece where another tile, seeing more around it, found no such object
        # Tiles see at a finer scale than the whole-image pass: theirs first.
        from_tiles = [i for i in group if int(c.source[i]) != c.full_source]
        if whole:
            pick = max([i for i in whole if i in from_tiles] or whole,
                       key=lambda i: float(c.dets.scores[i]))
            boxes.append(c.dets.boxes[pick])
            crops.append(c.masks.crops[pick])
            origins.append(c.masks.origins[pick])
            scores.append(c.dets.scores[pick])
        else:
            crop, origin = unite(c.masks, from_tiles or group)
            b = c.dets.boxes[idx]
            boxes.append(torch.cat([b[:, :2].min(0).values, b[:, 2:].max(0).values]))
            crops.append(crop)
            origins.append(torch.tensor(origin))
            scores.append(c.dets.scores[idx].max())
        labels.append(c.dets.labels[best])
        pieces.append(not whole)
    if not boxes:  # no candidates, or none left
        none = torch.zeros(0, dtype=torch.int64)
        return c.dets.select(none), c.masks.select(none)
    masks = LocalMasks(crops, torch.stack(origins), c.masks.image_size)
    merged = Detections(torch.stack(boxes), torch.stack(scores), torch.stack(labels))
    keep = torch.tensor(without_pieces_inside(masks, merged.boxes, merged.scores,
                                             merged.labels, pieces), dtype=torch.int64)
    order = keep[merged.scores[keep].argsort(descending=True, stable=True)]
    order = order[mask_nms(masks.select(order), merged.boxes[order], merged.labels[order],
                           match_iou)]
    return merged.select(order), masks.select(order)


def seen_whole_by_another_tile(c: Candidates) -> Callable[[int], bool]:
    """A test of detection ``i``: does a tile other than its own hold its box away from
    that tile's inner edges (the whole-image pass does not count: it keeps large objects
    only)? Such a tile saw the same pixels with more around them; if none of its detections
    matched, it found no such object there."""
    windows = torch.tensor(c.windows, dtype=c.dets.boxes.dtype).reshape(-1, 4)

    def held(i: int) -> bool:
        box = c.dets.boxes[i]
        holds = ((windows[:, :2] <= box[:2]).all(1) & (box[2:] <= windows[:, 2:]).all(1)
                 & ~cut_by_window(box, windows, c.masks.image_size, c.edge_margin))
        holds[int(c.source[i])] = False  # (a piece is cut in its own tile anyway)
        if c.full_source is not None:
            holds[c.full_source] = False
        return bool(holds.any())

    return held


def mask_nms(masks: LocalMasks, boxes: Tensor, labels: Tensor, iou_thresh: float) -> Tensor:
    """Greedy NMS over detections given best first (per class): a detection goes when its
    mask's IoU with a better one reaches ``iou_thresh`` or :data:`PIECE_INSIDE` of it lies
    inside a better one. It removes what is left of one object seen differently by two tiles
    (neither matched the other in their common area, because a third detection of one of
    the tiles had joined the group first), and partial detections of an object near a
    tile's edge."""
    n = len(masks)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    region = (0, 0, masks.image_size[1], masks.image_size[0])
    local = list(masks)
    removed = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        if removed[i]:
            continue
        # The later detections of its class whose boxes meet its box, one row at a time (an
        # n x n table would take gigabytes for the tens of thousands of a large image).
        meet = (labels[i + 1 :] == labels[i]) & _meets(boxes[i + 1 :], boxes[i])
        for j in torch.where(meet)[0].add(i + 1).tolist():
            if removed[j]:
                continue
            areas: list[int] = []
            inter = _intersection(local[i], local[j], region, areas)
            union = areas[0] + areas[1] - inter
            if union and (inter / union >= iou_thresh or inter >= PIECE_INSIDE * areas[1]):
                removed[j] = True
    return torch.where(~removed)[0]


def _extent(crop: Tensor) -> int:
    """The area of the bounding rectangle of a crop's pixels (0 when it has none)."""
    rows = torch.where(crop.any(1))[0]
    cols = torch.where(crop.any(0))[0]
    if rows.numel() == 0:
        return 0
    return int(rows[-1] - rows[0] + 1) * int(cols[-1] - cols[0] + 1)


def without_pieces_inside(masks: LocalMasks, boxes: Tensor, scores: Tensor, labels: Tensor,
                          pieces: list[bool], inside: float = 0.5) -> list[int]:
    """Indices of the merged detections to keep: all but the pieces (every member cut by a
    tile edge) whose mask spans next to nothing of its box (:data:`EMPTY_PIECE`) or lies mostly
    (``inside`` of its area) within a larger detection that scores at least as high, or
    that some tile saw whole (of its class, or of another class scoring at least
    :data:`OTHER_CLASS_SCORE` of its score). Such a piece is a tile's partial detection of
    an object that tile cut (often of another class: a sliver of a circle looks like
    anything), which matched no other tile because the object's detection there had already
    been taken, or because no tile saw the object whole and its other pieces were united."""
    areas = masks.areas()
    sizes = torch.tensor([[c.shape[1], c.shape[0]] for c in masks.crops],
                         dtype=torch.int64).reshape(-1, 2)
    lo = masks.origins
    extents = torch.cat([lo, lo + sizes], 1)  # each crop's extent, xyxy
    region = (0, 0, masks.image_size[1], masks.image_size[0])
    index = torch.arange(len(pieces))
    whole = torch.tensor([not p for p in pieces])
    keep = []
    for k, piece in enumerate(pieces):
        if piece and _extent(masks.crops[k]) < EMPTY_PIECE * float(
                boxes[k, 2:].sub(boxes[k, :2]).prod()):
            continue
        if piece:
            # Larger detections (the earlier one of two equal) whose crops meet its crop.
            larger = (areas > areas[k]) | ((areas == areas[k]) & (index < k))
            seen_whole = whole & ((labels == labels[k])
                                  | (scores >= OTHER_CLASS_SCORE * scores[k]))
            near = torch.where(larger & (seen_whole | (scores >= scores[k]))
                               & _meets(extents, extents[k]))[0].tolist()
            crop_k = (masks.crops[k], (int(lo[k, 0]), int(lo[k, 1])))
            if any(_intersection(crop_k, (masks.crops[j], (int(lo[j, 0]), int(lo[j, 1]))),
                                 region) >= inside * int(areas[k]) for j in near):
                continue
        keep.append(k)
    return keep


def sliced_predict(
    image: Tensor,
    predict_tiles: TilePredictor,
    cfg: TileConfig,
    full_pass: Callable[[Tensor], tuple[Detections, LocalMasks]] | None = None,
) -> tuple[Detections, LocalMasks]:
    """One image (3, H, W), uint8 or float in [0, 1], predicted tile by tile: its detections
    in image pixels, best first, one per object, with box-local masks. ``full_pass``: the
    whole-image prediction (``None``: tiles only)."""
    candidates = collect(image, predict_tiles, cfg, full_pass)
    if len(candidates.windows) == 1:  # one tile: the model's own prediction, nothing to merge
        order = candidates.dets.scores.argsort(descending=True, stable=True)
        return candidates.dets.select(order), candidates.masks.select(order)
    return merge(candidates, cfg.match_iou)


def model_full_pass(
    model: MaskRCNN, mask_threshold: float, tta: TTAConfig | None = None
) -> Callable[[Tensor], tuple[Detections, LocalMasks]]:
    """The whole-image pass of a model: the image shrunk to the model's size first, then
    boxes scaled back and masks pasted over their boxes at full resolution."""

    device = next(model.parameters()).device

    def predict(image: Tensor) -> tuple[Detections, LocalMasks]:
        h, w = int(image.shape[-2]), int(image.shape[-1])
        small, size = shrink_for_full_pass(image.cpu(), model)  # uint8 resizes on the CPU
        d, p = box_probs(model, [small.to(device)], tta)[0]
        boxes = scale_boxes(d.boxes, size, (h, w))
        return Detections(boxes, d.scores, d.labels), paste_local(p, boxes, (h, w),
                                                                   mask_threshold)

    return predict
