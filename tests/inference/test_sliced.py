"""Sliced prediction: the tile grid, merging across tiles (with a detector that sees exactly
the pixels a tile shows, so that any error is the merge's), a trained model on an object cut
by a tile border, and the memory of a 20,000 x 20,000 image."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from maskrcnn.inference.predictor import Predictor
from maskrcnn.inference.sliced import (
    Candidates,
    TileConfig,
    axis_starts,
    merge,
    sliced_predict,
    tile_windows,
    without_pieces_inside,
)
from maskrcnn.inference.tta import TTAConfig
from maskrcnn.structures.detections import Detections
from maskrcnn.structures.local_masks import LocalMasks
from sliced_scenes import disc, object_ids, paint, rect, see

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tile_grid_covers_the_image_with_the_last_tile_at_the_edge() -> None:
    # 300 px, tiles of 128 overlapping by a quarter: every 96 px, the last one ends at 300.
    assert axis_starts(300, 128, 0.25) == [0, 96, 172]
    assert axis_starts(128, 128, 0.25) == [0]
    assert axis_starts(129, 128, 0.0) == [0, 1]
    windows = tile_windows(100, 300, 128, 0.25)
    assert windows == [(0, 0, 128, 100), (96, 0, 224, 100), (172, 0, 300, 100)]
    # An image smaller than a tile is one tile of its own size.
    assert tile_windows(50, 40, 128, 0.25) == [(0, 0, 40, 50)]


@pytest.mark.parametrize("bad", [{"size": 8}, {"overlap": 1.0}, {"overlap": -0.1},
                                 {"batch_size": 0}, {"match_iou": 0.0}])
def test_tile_config_refuses_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"tile|match_iou"):
        TileConfig(**bad)  # type: ignore[arg-type]


def _scene() -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """300 x 300, tiles of 128 at x, y = 0, 96, 172 (inner edges at 96, 128, 172, 224)."""
    image = torch.zeros((3, 300, 300), dtype=torch.uint8)
    paint(image, 1, rect(30, 40), x=110, y=20)     # across the edge x = 128, whole in tile 2
    paint(image, 2, disc(15), x=113, y=113)        # on the corner (128, 128)
    paint(image, 3, rect(30, 220), x=40, y=200)    # wider than any tile: cut in all of them
    paint(image, 4, rect(30, 30), x=160, y=60)     # two objects touching each other,
    paint(image, 5, rect(30, 30), x=190, y=60)     # across the edge x = 172
    paint(image, 6, rect(20, 20), x=280, y=280)    # in the image's corner
    paint(image, 7, rect(40, 40), x=150, y=150)    # in the overlap of four tiles, whole in each
    ids = object_ids(image)
    return image, {k: ids == k for k in range(1, 8)}


def _matches(masks: LocalMasks, truth: dict[int, torch.Tensor]) -> dict[int, list[float]]:
    """Per true object, the mask IoU of every prediction that overlaps it."""
    dense = masks.to_dense()
    out: dict[int, list[float]] = {}
    for k, t in truth.items():
        inter = (dense & t).flatten(1).sum(1).float()
        union = (dense | t).flatten(1).sum(1).float()
        out[k] = [float(v) for v in (inter / union)[inter > 0]]
    return out


@pytest.mark.parametrize("overlap", [0.25, 0.4])
def test_each_object_comes_back_once_and_whole(overlap: float) -> None:
    image, truth = _scene()
    dets, masks = sliced_predict(image, see, TileConfig(size=128, overlap=overlap))
    matches = _matches(masks, truth)
    # One prediction per object (no piece left over at a border, no duplicate from the
    # overlaps, the two touching objects kept apart), and its mask is the object's.
    assert len(dets.scores) == len(truth)
    assert all(len(v) == 1 and v[0] == 1.0 for v in matches.values()), matches
    assert (dets.scores[:-1] >= dets.scores[1:]).all()
    # Boxes are the masks' extents (object 3 is a union of pieces).
    for box, (crop, (x, y)) in zip(dets.boxes.tolist(), masks, strict=True):
        rows = torch.where(crop.any(1))[0]
        cols = torch.where(crop.any(0))[0]
        assert box == [x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1,
                       y + int(rows[-1]) + 1]


def test_without_merging_the_tiles_split_objects() -> None:
    """The oracle's side: the same tiles, each detection kept, give pieces and duplicates
    (so the test above measures the merge)."""
    image, truth = _scene()
    windows = tile_windows(300, 300, 128, 0.25)
    pieces = sum(len(see([image[:, y0:y1, x0:x1].float() / 255])[0][0].scores)
                 for x0, y0, x1, y1 in windows)
    assert pieces > 2 * len(truth)


def _box_mask(box: list[int], pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A crop filling ``box`` (xyxy), or only its first ``pixels`` pixels, and its origin."""
    crop = torch.ones((box[3] - box[1], box[2] - box[0]), dtype=torch.bool)
    if pixels is not None:
        crop.view(-1)[pixels:] = False
    return crop, torch.tensor(box[:2])


def test_a_model_s_partial_detections_at_a_tile_edge_leave_one_whole_object() -> None:
    """What a trained model does at a tile edge (the mosaic benchmark's cases): the object's
    piece in the tile that cuts it scores higher than its whole detection in the next tile;
    that tile's sliver is taken for another class; a box over the few pixels beyond the
    edge has next to no mask. One detection stays: the whole one, with its own score."""
    windows = [(0, 0, 128, 100), (72, 0, 200, 100)]  # common area x in [72, 128)
    rows = [  # box, label, score, window, cut, pixels of the mask (None: the whole box)
        ([100, 20, 128, 60], 1, 0.95, 0, True, None),   # piece, cut at x = 128
        ([100, 20, 150, 60], 1, 0.60, 1, False, None),  # the same object seen whole
        ([120, 30, 128, 40], 2, 0.90, 0, True, None),   # a sliver of it, another class
        ([10, 70, 128, 100], 1, 0.80, 0, True, 3),      # a box with 3 pixels of mask
    ]
    masks = [_box_mask(b, n) for b, _, _, _, _, n in rows]
    c = Candidates(
        Detections(torch.tensor([r[0] for r in rows], dtype=torch.float32),
                   torch.tensor([r[2] for r in rows]), torch.tensor([r[1] for r in rows])),
        LocalMasks([m[0] for m in masks], torch.stack([m[1] for m in masks]), (100, 200)),
        torch.tensor([r[3] for r in rows]), torch.tensor([r[4] for r in rows]), windows, None,
    )
    dets, out = merge(c, 0.5)
    assert dets.boxes.tolist() == [[100.0, 20.0, 150.0, 60.0]]
    assert dets.scores.tolist() == [pytest.approx(0.60)]  # the whole detection's score
    assert out.origins.tolist() == [[100, 20]] and int(out.crops[0].sum()) == 50 * 40


def test_a_lone_piece_goes_when_another_tile_saw_its_pixels_away_from_its_edges() -> None:
    """A piece no other tile matched: where the next tile holds its whole box away from
    its own edges, that tile saw the object whole and found no such thing, so the piece
    goes; where no tile holds it (it reaches past the tiles' overlap), it stays."""
    windows = [(0, 0, 128, 100), (72, 0, 200, 100)]  # common area x in [72, 128)

    def merged(box: list[int], cut: bool = True, full_pass: bool = False
               ) -> list[list[float]]:
        crop, origin = _box_mask(box)
        c = Candidates(Detections(torch.tensor([box], dtype=torch.float32),
                                  torch.tensor([0.9]), torch.tensor([1])),
                       LocalMasks([crop], origin[None], (100, 200)), torch.tensor([0]),
                       torch.tensor([cut]), windows, None)
        if full_pass:  # the first tile and the whole-image pass only
            c.windows = [windows[0], (0, 0, 200, 100)]
            c.full_source = 1
        return merge(c, 0.5)[0].boxes.tolist()

    assert merged([110, 20, 128, 50]) == []  # the second tile holds x 110-128 inside
    assert merged([60, 20, 128, 50]) == [[60.0, 20.0, 128.0, 50.0]]  # it starts at x 72
    assert merged([73, 20, 128, 50]) == [[73.0, 20.0, 128.0, 50.0]]  # on its edge: cut there
    # A detection its own tile saw whole stays, whatever the other tile missed.
    assert merged([100, 20, 120, 50], cut=False) == [[100.0, 20.0, 120.0, 50.0]]
    # The whole-image pass holds every box, but it keeps large objects only: no veto.
    assert merged([110, 20, 128, 50], full_pass=True) == [[110.0, 20.0, 128.0, 50.0]]


def test_a_piece_goes_when_inside_a_larger_detection_seen_whole_or_scoring_higher() -> None:
    big, small = _box_mask([0, 0, 40, 40]), _box_mask([10, 10, 20, 20])
    masks = LocalMasks([big[0], small[0]], torch.stack([big[1], small[1]]), (50, 50))
    boxes = torch.tensor([[0.0, 0, 40, 40], [10.0, 10, 20, 20]])

    def kept(scores: list[float], pieces: list[bool], labels: tuple[int, int] = (1, 1)
             ) -> list[int]:
        return without_pieces_inside(masks, boxes, torch.tensor(scores),
                                     torch.tensor(labels), pieces)

    assert kept([0.5, 0.9], [False, True]) == [0]   # inside a whole one: gone
    assert kept([0.9, 0.5], [True, True]) == [0]    # inside a better-scored union of pieces
    assert kept([0.4, 0.5], [True, True]) == [0, 1]  # a weaker union of pieces: kept
    assert kept([0.9, 0.5], [True, False]) == [0, 1]  # seen whole: never a piece
    # A whole detection of another class takes the piece only if it scores half as much.
    assert kept([0.5, 0.9], [False, True], (1, 2)) == [0]
    assert kept([0.06, 0.9], [False, True], (1, 2)) == [0, 1]


def test_merging_can_drop_every_detection_and_keeps_thin_objects() -> None:
    windows = [(0, 0, 128, 100), (72, 0, 200, 100)]
    # Only a box with 3 pixels of mask at a tile edge: nothing is left.
    crop, origin = _box_mask([10, 70, 128, 100], 3)
    c = Candidates(Detections(torch.tensor([[10.0, 70, 128, 100]]), torch.tensor([0.8]),
                              torch.tensor([1])),
                   LocalMasks([crop], origin[None], (100, 200)), torch.tensor([0]),
                   torch.tensor([True]), windows, None)
    dets, out = merge(c, 0.5)
    assert len(dets.scores) == 0 and len(out) == 0
    # A thin diagonal object cut by the tile: 3 % of its box, but 360 pixels: kept.
    diagonal = torch.zeros((90, 118), dtype=torch.bool)
    for k in range(90):
        diagonal[k, k : k + 4] = True
    c = Candidates(Detections(torch.tensor([[10.0, 5, 128, 95]]), torch.tensor([0.8]),
                              torch.tensor([1])),
                   LocalMasks([diagonal], torch.tensor([[10, 5]]), (100, 200)),
                   torch.tensor([0]), torch.tensor([True]), windows, None)
    dets, out = merge(c, 0.5)
    assert int(diagonal.sum()) == 360 and 360 < 0.05 * 118 * 90
    assert len(dets.scores) == 1 and int(out.crops[0].sum()) == 360


def test_a_whole_image_pass_finds_an_object_no_tile_sees_and_adds_no_duplicate() -> None:
    image, truth = _scene()
    big = torch.zeros((3, 300, 300), dtype=torch.uint8)
    big[:] = image
    paint(big, 8, rect(260, 20), x=5, y=20)  # taller than two tiles
    truth[8] = object_ids(big) == 8

    def whole(img: torch.Tensor) -> tuple:  # the same detector on the whole image
        return see([img])[0]

    dets, masks = sliced_predict(big, see, TileConfig(size=128, overlap=0.25), whole)
    matches = _matches(masks, truth)
    assert len(dets.scores) == len(truth)
    assert all(len(v) == 1 and v[0] == 1.0 for v in matches.values()), matches


def test_an_image_smaller_than_a_tile_is_predicted_as_one() -> None:
    image = torch.zeros((3, 60, 90), dtype=torch.uint8)
    paint(image, 1, disc(10), x=5, y=5)
    dets, masks = sliced_predict(image, see, TileConfig(size=128))
    plain_dets, plain_masks = see([image])[0]
    assert torch.equal(dets.boxes, plain_dets.boxes)
    assert torch.equal(masks.to_dense(), plain_masks.to_dense())


def test_one_tile_with_a_trained_model_is_the_plain_prediction(trained_tiny: Path) -> None:
    """With the image in one tile, sliced prediction is the model's own: the same boxes and
    scores, and box-local masks equal to the pasted ones (the paste over each box gives the
    values of the paste over the image)."""
    photo = sorted((trained_tiny / "data" / "val").glob("*.png"))[0]
    image = torch.from_numpy(np.array(Image.open(photo).convert("RGB"))).permute(2, 0, 1)
    predictor = Predictor.from_checkpoint(trained_tiny / "last.pth", device="cpu",
                                          score_thresh=0.05)
    plain = predictor(image)
    predictor.tile = TileConfig(size=128)
    sliced = predictor(image)
    assert isinstance(sliced.masks, LocalMasks) and len(plain) >= 2
    assert torch.equal(sliced.boxes, plain.boxes) and torch.equal(sliced.scores, plain.scores)
    assert torch.equal(sliced.masks.to_dense(), plain.masks)
    assert sliced.to_coco(1) == plain.to_coco(1)
    # With test-time augmentation too: the views merged, then pasted over each box.
    predictor.tta = TTAConfig(hflip=True, scales=(0.9, 1.0))
    predictor.tile = None
    plain = predictor(image)
    predictor.tile = TileConfig(size=128)
    sliced = predictor(image)
    assert torch.equal(sliced.boxes, plain.boxes)
    assert torch.equal(sliced.masks.to_dense(), plain.masks)  # type: ignore[union-attr]


def test_sliced_predictions_encode_to_the_rles_of_their_dense_masks() -> None:
    image, _ = _scene()
    _, masks = sliced_predict(image, see, TileConfig(size=128))
    dense = masks.to_dense().numpy().transpose(1, 2, 0).astype(np.uint8)
    expected = mask_utils.encode(np.asfortranarray(dense))
    assert [r["counts"] for r in masks.rles()] == [e["counts"].decode() for e in expected]


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    sys.path.insert(0, sys.argv[1])
    from sliced_scenes import disc, paint, see
    from maskrcnn.inference.sliced import TileConfig, sliced_predict
    side = 20000
    image = torch.zeros((3, side, side), dtype=torch.uint8)
    k = 0
    for y in range(300, side - 300, 560):      # 35 x 35 = 1,225 discs of radius 40, on a
        for x in range(300, side - 300, 560):  # grid that crosses the tile borders
            k += 1
            paint(image, k, disc(40), x=x, y=y)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    dets, masks = sliced_predict(image, see, TileConfig(size=1024, overlap=0.25))
    rles = masks.rles()
    print(json.dumps({"objects": k, "found": len(rles), "seconds": time.perf_counter() - start,
                      "before_kib": before,
                      "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def test_a_20000_pixel_image_with_a_thousand_objects_stays_within_memory(
    tmp_path: Path,
) -> None:
    """The image is 1.2 GB as uint8; a dense (N, H, W) bool mask tensor would be 490 GB.
    Beyond the image (and the libraries), the process's peak grows by under 0.6 GB: tiles,
    box-local masks, RLEs (measured 0.3 GB, with 1024 px tiles too)."""
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(Path(__file__).parents[1])],
                         capture_output=True, text=True, check=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["found"] == result["objects"] == 35 * 35
    assert result["peak_kib"] - result["before_kib"] < 0.6e6, result
