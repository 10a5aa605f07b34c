"""Honest validation (issue 18): folds of whole groups of overlapping or touching scenes, a leakage
check on every validation scene, and `train --folds` / `evaluate --cv` on the real Beijing tiles."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from uvsam.errors import InputError
from uvsam.folds import check_leakage, group_scenes, make_folds


@pytest.fixture(scope="module")
def tiles(beijing):
    """All eight Beijing tiles, winter (train) and summer (val), as one list."""
    return sorted(beijing.glob("*/images/*.tif"))


def test_overlapping_and_touching_tiles_stay_in_one_group(tiles):
    names = [t.stem for t in tiles]
    groups = [{names[i] for i in g} for g in group_scenes(tiles)]
    # the six winter tiles overlap by half or a quarter, 49570_107872 touches 49570_107868 edge to edge
    assert groups == [{"49566_107866", "49566_107868", "49568_107866", "49570_107868", "49570_107872",
                       "49572_107868"}, {"49554_107968", "49554_107970"}]
    folds = make_folds(tiles, 2)
    assert sorted(len(f) for f in folds) == [2, 6]
    with pytest.raises(InputError, match="only 2 spatially separate group"):
        make_folds(tiles, 3)
    winter = [t for t in tiles if t.stem.startswith("4956") or t.stem.startswith("4957")]
    assert [len(g) for g in group_scenes(winter, buffer_m=0)] == [6]


def test_val_fraction_holds_out_whole_groups(beijing):
    from uvsam.datasets import pair_scenes
    from uvsam.training import TrainConfig, split_scenes

    every = TrainConfig(images=str(beijing / "*/images/*.tif"), labels=str(beijing / "*/masks/*.tif"), out="m.ckpt",
                        val_fraction=0.2)
    messages: list[str] = []
    train, val = split_scenes(every, pair_scenes(every.images, every.labels), messages.append)
    assert sorted(p.image.stem for p in val) == ["49554_107968", "49554_107970"] and len(train) == 6
    assert "held out: 49554_107968.tif, 49554_107970.tif" in messages[0]
    winter = TrainConfig(images=str(beijing / "train/images"), labels=str(beijing / "train/masks"), out="m.ckpt",
                         val_fraction=0.2)
    with pytest.raises(InputError, match="every training scene overlaps or touches another"):
        split_scenes(winter, pair_scenes(winter.images, winter.labels))


def test_a_validation_scene_overlapping_training_is_refused(tiles, beijing, tmp_path):
    winter = [t for t in tiles if not t.stem.startswith("49554")]
    held = [t for t in winter if t.stem == "49572_107868"]
    rest = [t for t in winter if t.stem != "49572_107868"]
    with pytest.raises(InputError, match="shares 50 % of its ground with training scene 49570_107868"):
        check_leakage(rest, held)
    touching = [t for t in winter if t.stem == "49570_107872"]
    with pytest.raises(InputError, match="touches training scene 49570_107868"):
        check_leakage([t for t in winter if t.stem == "49570_107868"], touching)
    check_leakage(winter, [t for t in tiles if t.stem.startswith("49554")])  # 30 km away: fine
    from uvsam.training import TrainConfig, train

    held_dir = tmp_path / "held"
    (held_dir / "images").mkdir(parents=True)
    (held_dir / "masks").mkdir()
    for sub in ("images", "masks"):
        (held_dir / sub / "49572_107868.tif").symlink_to(beijing / "train" / sub / "49572_107868.tif")
    cfg = TrainConfig(images=str(beijing / "train/images"), labels=str(beijing / "train/masks"),
                      out=str(tmp_path / "m.ckpt"), val_images=str(held_dir / "images"),
                      val_labels=str(held_dir / "masks"), epochs=1, steps_per_epoch=1, sam_epochs=0)
    with pytest.raises(InputError, match="partly a training score"):
        train(cfg, log=lambda m: None)
    assert not (tmp_path / "m.ckpt").exists()


def test_train_folds_and_evaluate_cv(beijing, tmp_path, capsys):
    out = tmp_path / "cv.ckpt"
    code, stdout, err = run_cli(["train", "--images", str(beijing / "*/images/*.tif"), "--labels",
                                 str(beijing / "*/masks/*.tif"), "--out", out, "--folds", 2, "--epochs", 1, "--steps",
                                 2, "--crop", 64, "--batch-size", 2, "--sam-epochs", 0, "--warmup", 1], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert set(summary) == {"specialist", "polygons"}
    cv = json.loads((tmp_path / "cv.cv.json").read_text())
    assert [f["fold"] for f in cv["folds"]] == [1, 2]
    held = [set(f["scenes"]) for f in cv["folds"]]
    assert {len(h) for h in held} == {2, 6} and not held[0] & held[1]  # each tile held out exactly once
    for k in ("specialist", "polygons"):
        ious = [f[k]["iou"] for f in cv["folds"]]
        assert summary[k]["mean_iou"] == pytest.approx(sum(ious) / 2, abs=1e-4)
        assert summary[k]["min_iou"] <= summary[k]["mean_iou"] <= summary[k]["max_iou"]
    code, stdout, err = run_cli(["evaluate", "--model", out, "--cv"], capsys)
    assert code == 0, err
    again = json.loads(stdout)
    assert again["summary"] == summary  # the fold models reproduce their scores
    code, _, err = run_cli(["train", "--images", str(beijing / "train/images"), "--labels",
                            str(beijing / "train/masks"), "--out", tmp_path / "x.ckpt", "--folds", 2], capsys)
    assert code == 2 and err.count("\n") == 1 and "all 6 scenes overlap or touch" in err
