"""Starting a model from a trained detector (``model.weights``): COCO weights by name, or a
checkpoint of an earlier run, also when the new dataset has other classes.

Every tensor whose shape fits is loaded. The class-specific layers (box classifier, box
regressor, mask logits) have one row (four for the regressor) per class: when the class
counts or names differ they keep their fresh initialisation, except the rows of classes the
source also has — matched by name, case-insensitively, or through ``class_map`` (dataset name
→ source name) — which are copied from the source, so that a ``person`` dataset starts from
COCO's person detector. The background row is always copied.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from maskrcnn.model.weights import (
    CATALOGUE,
    WeightsError,
    fetch,
    load_file,
    lookup,
    read_state_dict,
    state_dict_of,
)

log = logging.getLogger("maskrcnn")

# Parameter name → rows per class.
CLASS_ROWS = {
    "roi_heads.box_predictor.cls_score.weight": 1,
    "roi_heads.box_predictor.cls_score.bias": 1,
    "roi_heads.box_predictor.bbox_pred.weight": 4,
    "roi_heads.box_predictor.bbox_pred.bias": 4,
    "roi_heads.mask_predictor.mask_fcn_logits.weight": 1,
    "roi_heads.mask_predictor.mask_fcn_logits.bias": 1,
}


@dataclass
class Source:
    """A trained detector's weights and what is known about them."""

    name: str
    state: dict[str, Tensor]
    class_names: list[str] | None
    backbone: str | None = None  # the backbone the weights are for, when the source says
    arch: str | None = "v1"  # None: the file does not say


@dataclass
class Transfer:
    """What :func:`load_detector` did: ``copied`` maps our class names to the source's classes
    their rows came from; ``fresh`` lists the class-specific tensors left (partly) at their
    initialisation."""

    source: str
    copied: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if not self.fresh:
            return f"model.weights={self.source}: every tensor loaded"
        rows = ", ".join(f"{ours} ← {theirs}" for ours, theirs in self.copied.items())
        return (
            f"model.weights={self.source}: other classes than the source's; re-initialised "
            f"{', '.join(self.fresh)}; rows copied for {rows or 'no class (none matched)'}"
        )


def source_of(name_or_path: str, backbone: str | None = None, arch: str = "v1") -> Source:
    """The weights named (``coco``, ``torchvision:...``) or in a file (a state dict, or a
    training checkpoint, whose class names and backbone are used too). ``backbone`` and
    ``arch``: the model's, checked against a named source's before anything is downloaded."""
    entry = lookup(name_or_path)
    if entry is not None:
        if entry.kind != "detector":
            raise WeightsError(
                f"{entry.name} are ImageNet weights of a {entry.backbone} backbone, not a "
                f"detector's: give them as model.backbone_weights=imagenet"
            )
        check_fits(entry.name, entry.backbone, entry.arch, backbone, arch)
        state = read_state_dict(fetch(entry), entry.name)
        return Source(entry.name, state, entry.categories, entry.backbone, entry.arch)
    path = Path(name_or_path)
    if not path.is_file():
        names = ", ".join(e.aliases[0] for e in CATALOGUE if e.kind == "detector" and e.aliases)
        raise WeightsError(
            f"model.weights={name_or_path!r} is neither a file nor a known name ({names}; "
            "see `maskrcnn weights list`)"
        )
    meta = load_file(path, str(path))  # read once: the weights and what the file says
    state = state_dict_of(meta, path, str(path))
    names_in_file = meta.get("class_names") if isinstance(meta, dict) else None
    config = meta.get("config") if isinstance(meta, dict) else None
    model = config.get("model", {}) if isinstance(config, dict) else {}
    return Source(str(path), state, names_in_file, model.get("backbone"), model.get("arch"))


def check_fits(
    name: str, source_backbone: str | None, source_arch: str | None, backbone: str | None,
    arch: str,
) -> None:
    """A WeightsError when weights for ``source_backbone`` / ``source_arch`` cannot fit a
    model with ``backbone`` / ``arch`` (None: not known; the tensors' shapes decide)."""
    if source_arch is not None and source_arch != arch:
        raise WeightsError(f"{name} is a {source_arch} model; set model.arch={source_arch}")
    if None not in (source_backbone, backbone) and source_backbone != backbone:
        raise WeightsError(
            f"{name} is a {source_backbone} model; set model.backbone={source_backbone}"
        )


def class_rows(
    ours: Sequence[str], theirs: Sequence[str], class_map: Mapping[str, str]
) -> dict[int, int]:
    """Our label → the source's label of the same class: background to background, then by
    ``class_map`` (our name → theirs) or by name, case-insensitively."""
    index = {name.lower(): i for i, name in enumerate(theirs) if i > 0}
    rows = {0: 0}
    for label, name in enumerate(ours):
        if label == 0:
            continue
        wanted = class_map.get(name, name).lower()
        if wanted in index:
            rows[label] = index[wanted]
        elif name in class_map:
            raise WeightsError(
                f"model.class_map maps {name!r} to {class_map[name]!r}, which the source does "
                f"not have (its classes: {', '.join(t for t in theirs[1:] if t != 'N/A')})"
            )
    return rows


@torch.no_grad()
def _copy_rows(target: Tensor, source: Tensor, rows: Mapping[int, int], per_class: int) -> None:
    for ours, theirs in rows.items():
        target[ours * per_class : (ours + 1) * per_class] = source[
            theirs * per_class : (theirs + 1) * per_class
        ]


def load_detector(
    model: nn.Module,
    source: Source,
    backbone: str,
    class_names: Sequence[str] | None = None,
    class_map: Mapping[str, str] | None = None,
    arch: str = "v1",
) -> Transfer:
    """Load ``source`` into ``model`` (a MaskRCNN built with ``backbone`` and ``arch``); see
    the module's docstring for the class-specific layers. A WeightsError names the tensors
    that do not fit when the architectures differ."""
    check_fits(source.name, source.backbone, source.arch, backbone, arch)
    own = model.state_dict()
    # BatchNorm's num_batches_tracked exists in one norm setting and not the other: not a weight.
    counter = "num_batches_tracked"
    missing = sorted(k for k in own if k not in source.state and not k.endswith(counter))
    unexpected = sorted(k for k in source.state if k not in own and not k.endswith(counter))
    misfit = sorted(
        k for k in source.state
        if k in own and k not in CLASS_ROWS and source.state[k].shape != own[k].shape
    )
    if missing or unexpected or misfit:
        raise WeightsError(
            f"{source.name} does not fit this model: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, other shapes {misfit[:4]}"
        )
    transfer = Transfer(source.name)
    same = class_names is None or source.class_names is None or (
        list(class_names) == list(source.class_names)
    )
    rows: dict[int, int] = {0: 0}
    if class_names is not None and source.class_names is not None:
        rows = class_rows(class_names, source.class_names, class_map or {})
    state = {k: v for k, v in source.state.items() if k in own}
    for key, per_class in CLASS_ROWS.items():
        if key not in state or (same and state[key].shape == own[key].shape):
            continue
        fresh = own[key].clone()
        sizes = (fresh.shape[0], state[key].shape[0])
        if sizes == (per_class, per_class):
            fresh = state[key]  # class-agnostic masks: one channel, any classes
        elif per_class in sizes:  # class-agnostic on one side only: nothing to copy row-wise
            transfer.fresh.append(key)
        else:
            _copy_rows(fresh, state[key], rows, per_class)
            transfer.fresh.append(key)
        state[key] = fresh
    if class_names is not None and source.class_names is not None:
        transfer.copied = {
            class_names[o]: source.class_names[t] for o, t in rows.items() if o > 0
        }
    model.load_state_dict(state, strict=False)  # num_batches_tracked may be absent
    log.info(transfer.describe())
    return transfer
