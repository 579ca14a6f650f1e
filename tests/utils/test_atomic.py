"""Files written whole or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from maskrcnn.utils.atomic import atomic_write, write_text_atomic


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


def test_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """mkstemp makes its file owner-only; an exported model must stay readable by the
    server that loads it, as a plain write would leave it."""
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "model.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o644


def test_a_failed_rename_names_the_file_asked_for(tmp_path: Path) -> None:
    (tmp_path / "predictions.json").mkdir()  # a folder in the way
    with pytest.raises(IsADirectoryError) as info:
        write_text_atomic(tmp_path / "predictions.json", "{}")
    assert info.value.filename == str(tmp_path / "predictions.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.json"]
