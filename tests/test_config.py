"""chexnet/config.py: a run's settings are frozen; set-up resolves them into a new value."""
from __future__ import annotations

import dataclasses
import json

import pytest

from chexnet.config import TrainConfig, config_from_record, load_run_config
from chexnet.labels import NIH_FINDINGS
from conftest import nih_demo


def test_a_config_cannot_be_changed_in_place():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.1
    assert dataclasses.replace(cfg, lr=0.1).lr == 0.1 and cfg.lr == 0.01


def test_a_recorded_config_reads_back_equal_and_unknown_keys_are_ignored(tmp_path):
    cfg = TrainConfig(dataset="demo", data="d", lr=0.05, betas=[0.8, 0.99], findings=["A"])
    (tmp_path / "config.json").write_text(json.dumps({**cfg.record(), "retired": 1}))
    assert load_run_config(tmp_path) == cfg
    assert load_run_config(tmp_path, data="elsewhere") == dataclasses.replace(cfg,
                                                                              data="elsewhere")
    assert config_from_record({"dataset": "nih", "unknown": 2}) == TrainConfig(dataset="nih")


@pytest.mark.slow
def test_set_up_resolves_into_a_new_config_and_leaves_the_given_one(tmp_path_factory, tmp_path):
    """start_run fills in the split used and the findings; the caller's config is unchanged,
    and config.json records the resolved one."""
    from chexnet.train import start_run

    data = nih_demo(tmp_path_factory, n_images=40, size=48, seed=0)
    cfg = TrainConfig(dataset="demo", data=str(data), out=str(tmp_path), name="r",
                      image_size=32, batch_size=4, weights="none", workers=0, device="cpu")
    run = start_run(cfg)
    assert cfg.split is None and cfg.findings == []
    assert run.cfg.split == "random" and run.cfg.findings == list(NIH_FINDINGS)
    assert run.cfg == dataclasses.replace(cfg, split="random", findings=list(NIH_FINDINGS))
    assert load_run_config(tmp_path / "r") == run.cfg
