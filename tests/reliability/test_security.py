"""Untrusted files let nothing in: checkpoints and weight files are read with
``weights_only=True``, configs with ``yaml.safe_load``, and a dataset's file names cannot
reach outside its image root unless the user allows it.

Each malicious file is first shown to work (an unsafe load does create the marker file), then
fed to the project, which must refuse it with a clear error and never create the marker.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import maskrcnn
from maskrcnn.cli.main import main
from maskrcnn.config import ModelConfig, load_train_config
from maskrcnn.data.checks import check_dataset
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.errors import DatasetError
from maskrcnn.data.synthetic import make_synthetic_coco
from maskrcnn.engine.checkpoint import CheckpointError, load_checkpoint
from maskrcnn.inference.predictor import Predictor
from maskrcnn.model.mask_rcnn import MaskRCNN
from tiny_run import TINY

SRC = Path(maskrcnn.__file__).parent


# --- the source: no unsafe loader anywhere -----------------------------------------------------


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<not a literal>"
    return None


def _unsafe_calls(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in ("torch.load", "torch.serialization.load") and (
            _keyword(node, "weights_only") is not True
        ):
            yield node.lineno, f"{name}(...) without weights_only=True"
        elif name in ("yaml.load", "yaml.load_all", "yaml.full_load", "yaml.unsafe_load",
                      "yaml.unsafe_load_all", "pickle.load", "pickle.loads", "pickle.Unpickler",
                      "torch.jit.load", "eval", "exec", "marshal.loads"):
            yield node.lineno, f"{name}(...)"
        elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is True:
            yield node.lineno, f"{name}(..., allow_pickle=True)"


def test_no_unsafe_loader_in_the_package() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = [
        f"{path.relative_to(SRC)}:{line}: {what}"
        for path in files
        for line, what in _unsafe_calls(ast.parse(path.read_text(), str(path)))
    ]
    assert not found, "\n".join(found)
    loads = sum("torch.load(" in path.read_text() for path in files)
    assert loads >= 2  # checkpoint.py and backbone.py at least: the scan did see them


def test_the_scan_catches_unsafe_calls() -> None:
    code = (
        "torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=flag)\n"
        "torch.load(p, weights_only=True)\nyaml.load(s, Loader=yaml.Loader)\n"
        "yaml.safe_load(s)\npickle.loads(b)\nnp.load(f, allow_pickle=True)\nmodel.eval()\n"
    )
    assert [line for line, _ in _unsafe_calls(ast.parse(code))] == [1, 2, 3, 5, 7, 8]


# --- malicious pickles -----------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture
def evil(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A checkpoint-looking file (a dict of tensors plus the payload) and its marker path.
    The fixture checks at the end that the marker was never created."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "iteration": 3, "x": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    yield path, marker
    assert not marker.exists(), "the payload ran"


def test_load_checkpoint_refuses_a_malicious_pickle(evil: tuple[Path, Path]) -> None:
    path, _ = evil
    with pytest.raises(CheckpointError, match=r"was refused.*could run code.*posix\.system"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="was refused"):
        Predictor.from_checkpoint(path, device="cpu")


def test_backbone_weights_refuse_a_malicious_pickle(evil: tuple[Path, Path]) -> None:
    path, _ = evil
    with pytest.raises(ValueError, match=r"was refused"):
        MaskRCNN(ModelConfig(num_classes=2, backbone="resnet18", backbone_weights=str(path)))


def test_backbone_weights_refusal_names_the_file(evil: tuple[Path, Path]) -> None:
    path, _ = evil
    with pytest.raises(Exception, match=re.escape(str(path))):  # any type, if it names the file
        MaskRCNN(ModelConfig(num_classes=2, backbone="resnet18", backbone_weights=str(path)))


def test_train_resume_refuses_a_malicious_last_checkpoint(
    tmp_path: Path, evil: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = evil
    ann = make_synthetic_coco(tmp_path / "data", 2, size=32)
    out = tmp_path / "run"
    out.mkdir()
    path.rename(out / "last.pth")
    argv = ["train", "--resume", *TINY, f"run.output_dir={out}", f"data.train_json={ann}",
            f"data.train_images={ann.parent}", "solver.max_iter=1"]
    assert main(argv) == 2  # a one-line error, no traceback
    assert re.search(r"error: .*last\.pth was refused", capsys.readouterr().err)


# --- YAML --------------------------------------------------------------------------------------


def _yaml_payload(marker: Path) -> str:
    return f"!!python/object/apply:os.system [{json.dumps('touch ' + shlex.quote(str(marker)))}]"


def test_a_config_file_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.yaml"
    config.write_text(f"run:\n  output_dir: {_yaml_payload(marker)}\n")
    yaml.unsafe_load(config.read_text())  # the payload is real
    assert marker.exists()
    marker.unlink()
    with pytest.raises(yaml.constructor.ConstructorError, match="python/object/apply"):
        load_train_config(config)
    assert main(["train", "--config", str(config)]) == 2  # refused, one-line error
    with pytest.raises(ValueError, match=r"not YAML .*python/object/apply"):  # nor an override
        load_train_config(None, [f"run.output_dir={_yaml_payload(marker)}"])
    assert not marker.exists()


# --- file names leaving the image root --------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """``tmp/secret.png`` outside the image root ``tmp/root``; the annotation file is in the
    root."""
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "secret.png")
    (tmp_path / "root" / "sub").mkdir(parents=True)
    return tmp_path / "secret.png"


def _coco_naming(root: Path, file_name: str) -> Path:
    ann = root / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 9, "file_name": file_name, "height": 4, "width": 6}],
        "annotations": [], "categories": [{"id": 1, "name": "x"}],
    }))
    return ann


@pytest.mark.parametrize("how", ["relative", "absolute", "nested", "windows"])
def test_file_names_cannot_leave_the_image_root(outside: Path, how: str) -> None:
    root = outside.parent / "root"
    file_name = {"relative": "../secret.png", "absolute": str(outside),
                 "nested": "sub/../../secret.png", "windows": "..\\secret.png"}[how]
    ann = _coco_naming(root, file_name)
    # Refused when the dataset is built, before any file is opened.
    with pytest.raises(DatasetError, match="image id 9: file_name .*secret.png.* is absolute or "
                       r"has a '\.\.' part.*allow_outside_root=True "
                       r"\(config: data\.allow_outside_root=true\)") as info:
        CocoDataset(ann, root)
    assert file_name in str(info.value).replace("\\\\", "\\")
    # `data check` agrees: an error unless allowed there too.
    assert [(f.severity, f.code) for f in check_dataset(ann, root).errors] == [
        ("error", "path_outside_root")]
    assert check_dataset(ann, root, allow_outside_root=True).ok
    # The user may allow it; backslashes are separators, so the Windows form is found too.
    image, _ = CocoDataset(ann, root, allow_outside_root=True)[0]
    assert image.shape == (3, 4, 6)


def test_ordinary_file_names_stay_allowed(outside: Path) -> None:
    root = outside.parent / "root"
    (root / "a" / "b").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(root / "a" / "b" / "x..y.png")
    assert len(CocoDataset(_coco_naming(root, "a/./b/x..y.png"), root)) == 1
