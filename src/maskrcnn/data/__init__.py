"""Datasets: reading and checking COCO-format data, converters, a synthetic generator."""

from maskrcnn.data.checks import CheckReport, ClassCount, Finding, check_dataset
from maskrcnn.data.coco import CocoDataset, build_label_map
from maskrcnn.data.converters import labelme_to_coco, mask_pngs_to_coco, yolo_seg_to_coco
from maskrcnn.data.errors import DatasetError
from maskrcnn.data.image_io import read_image, read_image_size
from maskrcnn.data.synthetic import make_synthetic_coco

__all__ = [
    "CheckReport",
    "ClassCount",
    "CocoDataset",
    "DatasetError",
    "Finding",
    "build_label_map",
    "check_dataset",
    "labelme_to_coco",
    "make_synthetic_coco",
    "mask_pngs_to_coco",
    "read_image",
    "read_image_size",
    "yolo_seg_to_coco",
]
