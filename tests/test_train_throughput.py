"""benchmarks/train_throughput.py: smoke runs of its --quick mode on the CPU.

The numbers of a CPU smoke run mean nothing; these tests check that every code path runs (the
three configs, the cache epoch, the AMP check, the compile fallback) and that the report has
its documented shape. Nothing here asserts on a time.
"""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch
from torch import nn

from conftest import load_benchmark

# Trains networks or runs subprocesses: `pytest -m "not slow"` leaves these out.
pytestmark = pytest.mark.slow

tt = load_benchmark("train_throughput")

CONFIG_KEYS = {"key", "label", "batch", "eval_batch", "amp", "channels_last", "compile_requested",
               "compiled", "train_img_s", "eval_img_s", "train_times_s", "eval_times_s",
               "train_warmup_s", "eval_warmup_s", "peak_gb", "train_speedup", "eval_speedup"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick --check-amp --json` run, shared by the tests that read its output."""
    out = tmp_path_factory.mktemp("bench") / "out.json"
    buffer = io.StringIO()  # capsys is function-scoped: capture the module-wide run by hand
    with contextlib.redirect_stdout(buffer):
        code = tt.main(["--quick", "--device", "cpu", "--check-amp", "--json", str(out)])
    return code, buffer.getvalue(), json.loads(out.read_text())


def test_quick_run_prints_the_table_and_the_final_lines(quick_run):
    code, text, _ = quick_run
    assert code == 0
    assert "not performance figures" in text
    header = next(line for line in text.splitlines() if line.startswith("| config |"))
    for column in ("batch", "train img/s", "eval img/s", "peak GB", "speedup vs (a)"):
        assert column in header
    rows = [line for line in text.splitlines() if re.match(r"\| \([abc]\) ", line)]
    assert [r[3] for r in rows] == ["a", "b", "c"]
    assert "reference: fp32, NCHW | 4 | 8 |" in rows[0]
    assert "| 8 | 8 |" in rows[2]  # (c) runs at --best-batch (8 in --quick)
    assert "torch" in text and "date" in text
    last = text.strip().splitlines()[-2:]
    assert re.fullmatch(r"best/reference train speedup: \d+\.\dx", last[0])
    assert re.fullmatch(r"NIH epoch estimate \(78,468 images\): \d+ s", last[1])


def test_quick_run_json_has_every_number(quick_run):
    _, _, report = quick_run
    assert set(report) >= {"environment", "quick", "sizes", "configs", "end_to_end",
                           "check_amp", "best_over_reference_train_speedup",
                           "nih_epoch_estimate_s"}
    assert report["quick"] is True
    assert report["environment"]["device_type"] == "cpu"
    assert {"device", "torch", "date"} <= set(report["environment"])
    configs = report["configs"]
    assert [c["key"] for c in configs] == ["a", "b", "c"]
    for c in configs:
        assert CONFIG_KEYS <= set(c)
        assert c["train_img_s"] > 0 and c["eval_img_s"] > 0
        assert len(c["train_times_s"]) == report["sizes"]["repeats"]
        assert c["peak_gb"] is None  # no GPU memory to report on a CPU
    a, b, c = configs
    assert (a["amp"], a["channels_last"], a["compile_requested"]) == ("fp32", False, False)
    assert b["channels_last"] and c["channels_last"]
    assert c["compile_requested"] is False  # compile is skipped on CPU unless asked
    assert a["train_speedup"] == 1.0
    assert report["best_over_reference_train_speedup"] == pytest.approx(c["train_speedup"])
    e2e = report["end_to_end"]
    assert e2e["images"] == 32 and e2e["batch"] == c["batch"]
    assert e2e["nih_epoch_estimate_s"] == pytest.approx(78_468 / e2e["train_img_s"])
    assert report["nih_epoch_estimate_s"] == e2e["nih_epoch_estimate_s"]


def test_check_amp_reports_a_relative_difference(quick_run):
    _, text, report = quick_run
    check = report["check_amp"]
    assert check["amp"] == "bf16"  # forced on a CPU, where --amp auto means fp32
    assert check["steps"] == 2
    assert check["fp32_val_loss"] > 0 and check["amp_val_loss"] > 0
    assert check["amp_val_loss"] != check["fp32_val_loss"]  # autocast really ran
    assert check["rel_diff"] == pytest.approx(
        abs(check["amp_val_loss"] - check["fp32_val_loss"]) / check["fp32_val_loss"])
    assert re.search(r"relative difference \d+\.\d+% \(tolerance 1%\)", text)


def test_a_compile_failure_at_the_first_step_falls_back_to_eager(monkeypatch, capsys):
    class Broken(nn.Module):
        """What torch.compile returns when the backend fails: an error at the first call."""

        def __init__(self, model: nn.Module):
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("backend 'inductor' failed: no working C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken(model))
    code = tt.main(["--quick", "--device", "cpu", "--compile", "on", "--image-size", "32",
                    "--repeats", "1", "--steps", "1", "--eval-steps", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "torch.compile failed at the first step (RuntimeError: backend 'inductor' failed" \
        in out
    assert "+ torch.compile |" in out  # (c) asked for it ...
    assert out.strip().splitlines()[-1].startswith("NIH epoch estimate")  # ... and still ran


def test_best_config_halves_its_batch_when_out_of_memory(monkeypatch):
    tried = []

    def fake_run_config(bc, sizes, device, say):
        tried.append(bc.batch)
        if bc.batch > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return "result", "trainer"

    monkeypatch.setattr(tt, "run_config", fake_run_config)
    bc = tt.BenchConfig("c", "best", 256, 256, torch.bfloat16, True, True)
    assert tt.run_best(bc, tt.Sizes.quick(), torch.device("cpu"), lambda s: None) == \
        ("result", "trainer")
    assert tried == [256, 128, 64] and bc.batch == bc.eval_batch == 64


def test_cpu_without_quick_runs_the_quick_version(monkeypatch):
    seen = {}

    def fake_throughput(args, sizes, *rest):
        seen["quick"], seen["image_size"] = args.quick, sizes.image_size
        return []

    monkeypatch.setattr(tt, "throughput", fake_throughput)
    assert tt.main(["--device", "cpu"]) == 0
    assert seen == {"quick": True, "image_size": 64}
