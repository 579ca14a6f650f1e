"""Files written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskrcnn.atomic import atomic_write, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_text("the good model")
    with pytest.raises(OSError, match="No space"), atomic_write(target) as tmp:
        tmp.write_text("half a mod")
        raise OSError(28, "No space left on device")
    assert target.read_text() == "the good model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_finished_write_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "model.pt2"
    with atomic_write(target, suffix=".tmp.pt2", durable=True) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".tmp.pt2")
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and not tmp.exists()
    write_text_atomic(target, "text")
    assert target.read_text() == "text"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pt2"]
