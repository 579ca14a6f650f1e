"""Configuration: the model, the data, the solver and the run, as frozen dataclasses.

Fields shared with torchvision's ``MaskRCNN`` keyword arguments keep torchvision's names and
default values, so a torchvision recipe translates field by field.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "vgg16")
NORMS = ("frozen", "bn", "syncbn", "gn")
ARCHS = ("v1", "v2")
RECIPES = "maskrcnn.configs"  # the package holding the shipped recipes (YAML)


@dataclass(frozen=True)
class LossWeights:
    """Multipliers of the five losses; the model returns each loss already weighted."""

    classifier: float = 1.0
    box_reg: float = 1.0
    mask: float = 1.0
    objectness: float = 1.0
    rpn_box_reg: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a Mask R-CNN network and its pre/post-processing."""

    num_classes: int = 91
    backbone: str = "resnet50"
    # A file, or "imagenet": torchvision's ImageNet weights of the backbone (torch hub cache).
    backbone_weights: str | None = None
    # A trained detector to start from: a weights name (coco; `maskrcnn weights list`) or a
    # file (a state dict, or a checkpoint of an earlier run). Other classes than the source's:
    # see maskrcnn.model.pretrained; class_map maps a dataset class name to the source's.
    weights: str | None = None
    class_map: dict[str, str] = field(default_factory=dict)
    trainable_backbone_layers: int = 3
    # Normalisation in the trainable backbone stages: frozen (FrozenBatchNorm2d, torchvision's
    # choice), bn (BatchNorm2d, batch statistics in training), syncbn (bn, synchronised
    # across processes on CUDA), gn (GroupNorm). Frozen stages always keep frozen norms.
    norm: str = "frozen"
    # v1: torchvision's maskrcnn_resnet50_fpn. v2: its maskrcnn_resnet50_fpn_v2 (BatchNorm in
    # the FPN and the heads, a two-conv RPN head, a four-conv + one-fc box head).
    arch: str = "v1"
    fpn_channels: int = 256
    # pre-processing (GeneralizedRCNNTransform)
    min_size: int | tuple[int, ...] = 800
    max_size: int = 1333
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32
    # anchors
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # RPN
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.0
    # box branch
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] | None = None
    # mask branch
    class_agnostic_masks: bool = False
    mask_threshold: float = 0.5
    loss_weights: LossWeights = field(default_factory=LossWeights)
    # Class name -> weight of its RoIs in the box classifier's cross-entropy (a weighted
    # mean; unnamed classes 1.0, "background" names the background). For rare classes; see
    # docs/training.md "Class imbalance".
    class_loss_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes must count the background too (>= 2), got {self.num_classes}"
            )
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {ARCHS}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        if self.norm != "frozen" and self.backbone == "vgg16":
            raise ValueError(
                f"norm={self.norm!r}: vgg16 has no normalisation layers to change; "
                "model.norm applies to the resnet and mobilenet_v2 backbones"
            )
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise ValueError(
                f"trainable_backbone_layers must be in [0, 5], got {self.trainable_backbone_layers}"
            )
        if not isinstance(self.class_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.class_map.items()
        ):
            raise ValueError(
                f"class_map must map dataset class names to source class names, got "
                f"{self.class_map!r}"
            )
        if not isinstance(self.class_loss_weights, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and v > 0 for k, v in self.class_loss_weights.items()
        ):
            raise ValueError(
                "class_loss_weights must map class names to positive numbers, got "
                f"{self.class_loss_weights!r}"
            )
        if isinstance(self.loss_weights, dict):  # built from YAML
            object.__setattr__(self, "loss_weights", LossWeights(**self.loss_weights))

    @property
    def min_sizes(self) -> tuple[int, ...]:
        """Training picks one of these at random per image; evaluation uses the last."""
        return (self.min_size,) if isinstance(self.min_size, int) else tuple(self.min_size)


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is batched. With no ``train_json`` the embedded
    synthetic-shapes dataset is generated under the run folder."""

    train_json: str | None = None
    train_images: str | None = None
    val_json: str | None = None
    val_images: str | None = None
    search_subfolders: bool = False
    allow_outside_root: bool = False
    max_image_pixels: int | None = 89_478_485
    batch_size: int = 2
    num_workers: int = 2
    aspect_ratio_grouping: bool = True
    on_bad_sample: str = "error"
    # Repeat-factor sampling against class imbalance (LVIS): an image whose rarest class is in
    # a fraction f < t of the images repeats sqrt(t / f) times an epoch; 0 turns it off.
    repeat_factor_threshold: float = 0.0
    train_augmentation: tuple[dict[str, Any], ...] | None = None
    val_augmentation: tuple[dict[str, Any], ...] | None = None
    synthetic_train_images: int = 200
    synthetic_val_images: int = 50
    synthetic_size: int = 128

    def __post_init__(self) -> None:
        if not 0.0 <= self.repeat_factor_threshold <= 1.0:
            raise ValueError("data.repeat_factor_threshold must be in [0, 1] (0: off), got "
                             f"{self.repeat_factor_threshold}")
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(
                f"data.on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}"
            )
        _at_least(self, "data", batch_size=1, num_workers=0)
        from maskrcnn.data.transforms import build_transforms  # torchvision: imported late

        for key, spec, train in (("train_augmentation", self.train_augmentation, True),
                                 ("val_augmentation", self.val_augmentation, False)):
            if spec is not None:
                try:
                    build_transforms(list(spec), train=train)
                except (ValueError, TypeError) as err:
                    raise ValueError(f"data.{key}: {err}") from None
        if any(entry.get("name") == "resize" for entry in self.val_augmentation or ()):
            raise ValueError(
                "data.val_augmentation: 'resize' would score predictions of the resized image "
                "against the original's annotations; the model resizes by itself "
                "(model.min_size, model.max_size)"
            )


@dataclass(frozen=True)
class SolverConfig:
    """SGD with momentum, warm-up, step or cosine decay, accumulation and clipping."""

    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    no_decay_norm_and_bias: bool = False
    max_iter: int = 90_000
    schedule: str = "multistep"
    steps: tuple[int, ...] = (60_000, 80_000)
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    grad_clip_norm: float | None = None
    accumulation_steps: int = 1
    scale_lr: bool = False
    reference_batch_size: int = 16
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.schedule not in ("multistep", "cosine"):
            raise ValueError(
                f"solver.schedule must be 'multistep' or 'cosine', got {self.schedule!r}"
            )
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(
                f"solver.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}"
            )
        _at_least(self, "solver", max_iter=1, accumulation_steps=1, warmup_iters=0)
        if not self.base_lr > 0 or not math.isfinite(self.base_lr):
            raise ValueError(f"solver.base_lr must be > 0, got {self.base_lr}")
        if list(self.steps) != sorted(self.steps):
            raise ValueError(f"solver.steps must be increasing, got {list(self.steps)}")


@dataclass(frozen=True)
class RunConfig:
    """Output folder, seeding, and how often to log, evaluate and save."""

    output_dir: str = "runs/demo"
    seed: int = 0
    device: str = "auto"
    log_period: int = 20
    eval_period: int = 0
    checkpoint_period: int = 500
    num_overlays: int = 4
    max_nonfinite_skips: int = 0
    dist_timeout_s: float = 300.0
    # A new run in a folder that holds another run's checkpoint is refused unless this is set
    # (or the command says --resume).
    overwrite: bool = False
    # Early stopping: stop after this many evaluations in a row without a better mask AP
    # (best.pth keeps the best); 0 never stops early. Needs run.eval_period and a val set.
    patience: int = 0
    # Also log the validation loss (the five losses on the val set, BatchNorm with its
    # running statistics, a fixed seed for the sampled proposals) at each evaluation.
    val_loss: bool = False

    def __post_init__(self) -> None:
        _at_least(self, "run", log_period=1, eval_period=0, checkpoint_period=1,
                  num_overlays=0, max_nonfinite_skips=0, patience=0)
        if not self.dist_timeout_s > 0:
            raise ValueError(f"run.dist_timeout_s must be > 0, got {self.dist_timeout_s}")


def _at_least(cfg: Any, section: str, **minimum: int) -> None:
    """A ValueError naming the first field of ``cfg`` below its minimum."""
    for name, low in minimum.items():
        if getattr(cfg, name) < low:
            raise ValueError(f"{section}.{name} must be >= {low}, got {getattr(cfg, name)}")


@dataclass(frozen=True)
class TrainConfig:
    """A whole training job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """YAML values into the field's type: lists into tuples, dicts into dataclasses, a
    number written as a string (YAML reads ``1e-3`` as one) into a float; anything that does
    not fit the type is a ValueError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except (TypeError, ValueError):
                continue
        names = " or ".join(_type_name(a) for a in args)
        raise ValueError(f"{where}: expected {names}, got {value!r}")
    if origin is tuple:
        return _convert_tuple(value, args, where)
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if hint is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a folder or file named by digits
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _convert_tuple(value: Any, args: tuple[Any, ...], where: str) -> tuple[Any, ...]:
    """``tuple[X, ...]`` takes a list or a single value; ``tuple[X, Y]`` a list of that length."""
    variable = len(args) == 2 and args[1] is Ellipsis
    if variable and not isinstance(value, (list, tuple)):
        value = [value]
    if not isinstance(value, (list, tuple)) or (not variable and len(value) != len(args)):
        size = "a list" if variable else f"a list of {len(args)}"
        raise ValueError(f"{where}: expected {size}, got {value!r}")
    items = [args[0]] * len(value) if variable else list(args)
    pairs = enumerate(zip(value, items, strict=True))
    return tuple(_convert(v, h, f"{where}[{i}]") for i, (v, h) in pairs)


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return hint.__name__ if isinstance(hint, type) else str(hint)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; an unknown key is an error that names it
    and suggests the nearest valid one."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {path!r}{hint} (valid: {', '.join(names)})")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for YAML and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["solver.base_lr=0.01", "model.backbone=resnet18"]`` applied to a nested dict;
    values are parsed as YAML (numbers, booleans, lists, null)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(
                f"override {item!r} must look like section.key=value (a recipe name or a "
                "YAML file goes after --config)"
            )
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {k!r} is not a section")
        try:
            node[keys[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "it does not parse"
            raise ValueError(f"override {item!r}: the value is not YAML ({problem})") from None
    return data


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Defaults ← YAML file (``yaml.safe_load``) ← dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a mapping of sections")
        data = loaded or {}
    return from_dict(TrainConfig, apply_overrides(data, overrides or []))


def recipe_path(name_or_path: str) -> Path:
    """A YAML file path, or the name of a recipe shipped with the package (``demo``...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = resources.files(RECIPES) / f"{name_or_path}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(
        p.name[:-5] for p in resources.files(RECIPES).iterdir() if p.name.endswith(".yaml")
    )
    raise ValueError(f"config {name_or_path!r} is neither a file nor a recipe ({', '.join(names)})")
