"""Configuration files, overrides and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from maskrcnn.config import TrainConfig, from_dict, load_train_config, recipe_path, to_dict


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  base_lr: 0.1\n  steps: [5, 9]\nmodel:\n  backbone: resnet18\n")
    cfg = load_train_config(
        path,
        [
            "solver.base_lr=0.01",
            "model.min_size=[600, 800]",
            "model.loss_weights.mask=2",
            "data.val_json=null",
        ],
    )
    assert cfg.solver.base_lr == 0.01  # the override wins over the file
    assert cfg.solver.steps == (5, 9)  # lists become tuples
    assert cfg.model.backbone == "resnet18"
    assert cfg.model.min_size == (600, 800) and cfg.model.min_sizes == (600, 800)
    assert cfg.model.loss_weights.mask == 2.0
    assert cfg.solver.momentum == 0.9  # untouched default


def test_unknown_key_names_it_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown config key 'solver.base_rl'; did you mean "
        r"'solver.base_lr'",
    ):
        load_train_config(None, ["solver.base_rl=0.1"])
    path = tmp_path / "c.yaml"
    path.write_text("modle:\n  backbone: resnet18\n")
    with pytest.raises(ValueError, match="did you mean 'model'"):
        load_train_config(path)


def test_wrong_types_and_values_are_refused() -> None:
    with pytest.raises(ValueError, match=r"solver\.max_iter: expected int"):
        load_train_config(None, ["solver.max_iter=lots"])
    with pytest.raises(ValueError, match=r"solver\.schedule"):
        load_train_config(None, ["solver.schedule=linear"])
    with pytest.raises(ValueError, match="must look like"):
        load_train_config(None, ["solver.base_lr"])


def test_round_trip_through_yaml() -> None:
    assert load_train_config(None, []) == TrainConfig()
    cfg = load_train_config(recipe_path("demo"))
    assert from_dict(TrainConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


@pytest.mark.parametrize("name", ["demo", "coco_r50_fpn_1x", "finetune_small"])
def test_recipes_load(name: str) -> None:
    cfg = load_train_config(recipe_path(name))
    assert cfg.solver.max_iter > 0


def test_train_command_reports_bad_overrides_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from maskrcnn.cli.main import main

    assert main(["train", "demo", "solver.precision=fp32"]) == 2
    err = capsys.readouterr().err
    assert "override 'demo' must look like section.key=value" in err and "--config" in err
    assert main(["train", "--config", "demo", "solver.precision=fp8"]) == 2
    assert "solver.precision must be" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("solver.base_lr=1e-3", ("solver", "base_lr", 0.001)),  # YAML reads 1e-3 as a string
        ("solver.steps=300", ("solver", "steps", (300,))),  # one step, no list needed
        ("run.output_dir=2024", ("run", "output_dir", "2024")),
    ],
)
def test_values_are_converted_to_the_field_type(
    override: str, expected: tuple[str, str, object]
) -> None:
    section, name, value = expected
    assert getattr(getattr(load_train_config(None, [override]), section), name) == value


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("solver.grad_clip_norm=abc", "solver.grad_clip_norm: expected float or null, got 'abc'"),
        ("model.min_size=800.5", "model.min_size: expected int or tuple"),
        ("model.image_mean=[0.5, 0.5]", "model.image_mean: expected a list of 3"),
        ("model.class_agnostic_masks=1", "model.class_agnostic_masks: expected bool"),
        ("run.seed=true", "run.seed: expected int, got True"),
        ("run.checkpoint_period=0", "run.checkpoint_period must be >= 1, got 0"),
        ("run.log_period=0", "run.log_period must be >= 1"),
        ("solver.max_iter=-5", "solver.max_iter must be >= 1"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("solver.steps=[80, 60]", "solver.steps must be increasing"),
    ],
)
def test_values_that_cannot_work_are_refused_at_load_time(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_train_config(None, [override])


def test_augmentation_and_yaml_mistakes_are_found_when_the_config_is_read() -> None:
    with pytest.raises(ValueError, match=r"data\.train_augmentation: unknown transform 'foo'"):
        load_train_config(None, ["data.train_augmentation=[{name: foo}]"])
    with pytest.raises(ValueError, match=r"override 'solver\.steps=\[': the value is not YAML"):
        load_train_config(None, ["solver.steps=["])


def test_train_command_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from maskrcnn.cli.main import main

    assert main(["train", "--config", "nonexist"]) == 2
    assert capsys.readouterr().err.startswith("error: config 'nonexist' is neither a file")
    a_file = tmp_path / "a.json"
    a_file.write_text("{}")
    assert main(["data", "synth", str(a_file), "--images", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {a_file}") and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--nproc", "0"])
    assert exit_info.value.code == 2


def test_a_learning_rate_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(ValueError, match=r"solver\.base_lr must be > 0, got nan"):
        load_train_config(None, ["solver.base_lr=nan"])


def test_an_augmentation_step_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ValueError, match=r"data\.val_augmentation: transform entry 'hflip'"):
        load_train_config(None, ["data.val_augmentation=[hflip]"])


def test_a_validation_pipeline_that_resizes_is_refused() -> None:
    """Validation predictions are scored against the annotations at the original size."""
    with pytest.raises(ValueError, match=r"data\.val_augmentation: 'resize' would score"):
        load_train_config(None, ["data.val_augmentation=[{name: resize, min_size: 128}]"])


def test_overrides_may_come_before_and_after_other_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import maskrcnn.config
    from maskrcnn.cli.main import main

    seen = []

    def stop(path: object, overrides: list[str]) -> None:
        seen.append(overrides)
        raise ValueError("stop here")

    monkeypatch.setattr(maskrcnn.config, "load_train_config", stop)
    argv = ["train", "solver.max_iter=5", "--resume", "--config", "demo", "run.seed=1"]
    assert main(argv) == 2
    assert seen == [["solver.max_iter=5", "run.seed=1"]]
    assert "error: stop here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "--resume", "--no-such-flag"])
    assert info.value.code == 2
