"""report.py: one self-contained HTML file per run (every section, embedded PNGs, no external
resource), its fallbacks for missing files, the CLI's errors, and a headless Chromium render."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chexnet.analysis import heatmaps, report
import retrain
from read_only import refuse_writes

# One torch thread in this process (conftest.py one_thread: 2 shared cores).
pytestmark = pytest.mark.usefixtures("one_thread")

PNG_URI = "data:image/png;base64,"
# Sections whose content is a figure (the others are tables and notes).
WITH_IMAGE = ("convergence", "aucs", "roc", "heatmaps", "compare")


class ReportParser(HTMLParser):
    """Collects section ids, their h2 text, their images, and every src/href/script."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.current: str | None = None
        self.in_h2 = False
        self.urls: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "section":
            self.current = a["id"]
            self.sections[self.current] = {"h2": "", "images": [], "text": ""}
        elif tag == "h2":
            self.in_h2 = True
        elif tag == "img" and self.current is not None:
            self.sections[self.current]["images"].append(a.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.current = None
        elif tag == "h2":
            self.in_h2 = False

    def handle_data(self, data: str) -> None:
        if self.current is not None:
            self.sections[self.current]["text"] += data
            if self.in_h2:
                self.sections[self.current]["h2"] += data


def parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished one-epoch demo run (tiny: 40 images of 32 px)."""
    from chexnet.datatools.demo import make_nih_demo

    base = tmp_path_factory.mktemp("report_run")
    make_nih_demo(base / "nih", n_images=40, size=32, seed=0)
    code = retrain.main(["--dataset", "demo", "--data", str(base / "nih"), "--out",
                         str(base / "results"), "--name", "r", "--image-size", "32",
                         "--batch-size", "8", "--weights", "none", "--workers", "0",
                         "--epochs", "1"])
    assert code == 0
    return base / "results" / "r"


@pytest.fixture(scope="module")
def report_html(run_dir) -> Path:
    # Compared with itself: exercises the paired comparison without a second training run.
    return report.build_report(run_dir, n_boot=50, compare_to=run_dir)


@pytest.mark.slow
def test_report_has_every_section_with_embedded_images(report_html, run_dir):
    assert report_html == run_dir / "report.html"
    doc = parse(report_html)
    assert list(doc.sections) == list(report.SECTIONS)
    for sid, content in doc.sections.items():
        assert content["h2"] == report.SECTIONS[sid]
    for sid in WITH_IMAGE:
        images = doc.sections[sid]["images"]
        assert images, f"section {sid} has no image"
        for src in images:
            assert src.startswith(PNG_URI)
            with Image.open(io.BytesIO(base64.b64decode(src[len(PNG_URI):]))) as img:
                assert img.format == "PNG" and min(img.size) > 50
    # Self-contained: no scripts, no stylesheet links, only in-page anchors and data URIs.
    assert not doc.tags & {"script", "link", "iframe", "object", "embed"}
    for url in doc.urls:
        assert url.startswith(("#", "data:")), url
        assert "http" not in url.split(",")[0]
    assert "http://" not in report_html.read_text() and "https://" not in report_html.read_text()


def test_report_contents(report_html):
    doc = parse(report_html)
    text = {sid: c["text"] for sid, c in doc.sections.items()}
    # Environment and settings from run_record.json / config.json.
    assert "git_commit" in text["config"] and "torch" in text["config"]
    assert "image_size" in text["config"]
    assert "best epoch 1 of 1" in text["convergence"]
    # Published figures for a 14-finding demo run, labelled as other splits.
    assert "CheXNet paper (own test split)" in text["aucs"]
    assert "reproduce-chexnet (own test split)" in text["aucs"]
    assert "0.9248" in text["aucs"]          # CheXNet's Cardiomegaly, from labels.py
    assert "resamples of the" in text["aucs"] and "patients" in text["aucs"]
    assert "youden(val)" in text["thresholds"]
    assert "rendered by" in text["heatmaps"]
    assert "Paired AUC comparison" in text["compare"]


@pytest.mark.slow
def test_report_without_optional_files(run_dir, tmp_path):
    """Only preds.csv and config.json: the report still builds, saying what is missing."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("preds.csv", "config.json"):
        shutil.copy(run_dir / name, bare / name)
    out = report.build_report(bare, tmp_path / "bare.html", n_boot=20)
    doc = parse(out)
    assert "compare" not in doc.sections
    assert list(doc.sections) == [s for s in report.SECTIONS if s != "compare"]
    text = {sid: c["text"] for sid, c in doc.sections.items()}
    assert "run_record.json not found" in text["config"]
    assert "no training curves" in text["convergence"]
    assert "val_preds.csv not found" in text["thresholds"]
    assert "checkpoint.pt not found" in text["heatmaps"]
    assert doc.sections["roc"]["images"]


def test_report_gallery_is_visualize_predictions_with_the_data_folder(run_dir, tmp_path,
                                                                      monkeypatch):
    """The report draws its heatmaps with visualize_prediction.py's gallery
    (chexnet/analysis/heatmaps.py), passing --data on."""
    calls = []
    real = heatmaps.gallery

    def gallery(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(heatmaps, "gallery", gallery)
    run = report.read_run(run_dir)
    label = report.prevalent_findings(run)[0]
    data = json.loads((run_dir / "config.json").read_text())["data"]
    png = report.render_gallery(run, label, 2, tmp_path / "g.png", data)
    assert [(a[1], a[2], kw.get("data")) for a, kw in calls] == [(label, 2, data)]
    with Image.open(png) as img:
        assert img.format == "PNG"
        assert np.asarray(img.convert("L")).std() > 5


def test_cli_errors_name_the_file(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert str(tmp_path / "empty" / "preds.csv") in capsys.readouterr().err


@pytest.mark.slow
def test_headless_chromium_renders_report(request, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    # Asked for only now, so that a machine without chromium skips without training a run.
    report_html: Path = request.getfixturevalue("report_html")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             # Console messages (JS errors, blocked loads) go to stderr only with this.
             "--enable-logging=stderr", "--window-size=1200,3000"]
    url = report_html.resolve().as_uri()
    shot = tmp_path / "shot.png"
    # timeout: a guard against a hung browser, not a speed requirement.
    done = subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for sid, title in report.SECTIONS.items():
        assert f'<section id="{sid}">' in dom.stdout
        assert f"<h2>{title}</h2>" in dom.stdout
    for stderr in (done.stderr, dom.stderr):
        assert "Uncaught" not in stderr
        assert "Content Security Policy" not in stderr      # nothing tried to load
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (1200, 3000)
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50


@pytest.mark.slow
def test_report_subgroups_section(report_html, run_dir, tmp_path):
    """Attributes from the demo's Data_Entry_2017.csv (the run's data folder), under-diagnosis
    at the validation F1 threshold, calibration with a reliability diagram; and, for a run
    whose labels file has no subgroup columns, a note saying so (calibration still shown)."""
    import json

    import pandas as pd

    section = parse(report_html).sections["subgroups"]
    text = section["text"]
    assert "Data_Entry_2017.csv: sex, age, view, followup" in text
    assert "AUC per subgroup" in text and "same resamples" in text
    assert "F1-maximising threshold of No Finding on val_preds.csv" in text
    assert "temperature" in text and "pooled" in text
    assert len(section["images"]) == 1 and section["images"][0].startswith(PNG_URI)
    data = tmp_path / "data"
    data.mkdir()
    preds = pd.read_csv(run_dir / "preds.csv")
    pd.DataFrame({"Image Index": preds["Image Index"], "fold": "test",
                  **{f: preds[f].astype(int) for f in report.NIH_FINDINGS}}).to_csv(
        data / "nih_labels.csv", index=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "preds.csv", bare / "preds.csv")
    config = json.loads((run_dir / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "data": str(data)}))
    other = parse(report.build_report(bare, tmp_path / "bare.html", n_boot=20))
    text = other.sections["subgroups"]["text"]
    assert "No subgroup attributes" in text and "nih_labels.csv: no subgroup column" in text
    assert "no validation predictions" in text and "never on test" in text
    assert len(other.sections["subgroups"]["images"]) == 1


# --------------------------------------------------------------------------------------------
# An output place that cannot be written
# --------------------------------------------------------------------------------------------
def _preds_only_run(folder: Path) -> Path:
    """A run folder holding only a preds.csv: 20 test images, both classes of every finding."""
    import pandas as pd

    from chexnet.labels import NIH_FINDINGS

    rng = np.random.default_rng(0)
    run = folder / "run"
    run.mkdir()
    table = {"Image Index": [f"{i + 1:08d}_000.png" for i in range(20)]}
    for k, finding in enumerate(NIH_FINDINGS):
        truth = (np.arange(20) + k) % 2
        table[finding] = truth
        table[f"prob_{finding}"] = np.round(0.3 * truth + rng.uniform(0, 0.7, 20), 4)
    pd.DataFrame(table).to_csv(run / "preds.csv", index=False)
    return run


@pytest.mark.parametrize("where", ["report.html", "new/report.html"])
def test_unwritable_out_is_refused_before_the_report_is_computed(tmp_path, monkeypatch, capsys,
                                                                  where):
    run = _preds_only_run(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    refuse_writes(locked, monkeypatch.setattr)

    def computed(*args, **kwargs):
        raise AssertionError("the report was computed before its place was checked")

    monkeypatch.setattr(report, "auc_ci_table", computed)
    out = locked / where
    assert report.main([str(run), "--out", str(out), "--n-boot", "5"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the report {out}: Permission denied" in err
    assert "Choose a writable place with --out" in err and "Traceback" not in err
    assert report.main([str(run), "--out", str(tmp_path), "--n-boot", "5"]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_disk_full_when_the_report_is_written(tmp_path, monkeypatch, capsys):
    import errno

    from chexnet.runs import SaveError

    run = _preds_only_run(tmp_path)

    def full(text, path):
        raise SaveError(f"could not write {path}") from OSError(
            errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "save_text", full)
    out = tmp_path / "r.html"
    assert report.main([str(run), "--out", str(out), "--n-boot", "5"]) == 2
    err = capsys.readouterr().err
    assert (f"cannot write the report {out}: No space left on device. Free some space, or "
            "choose a writable place with --out") in err
    assert not out.exists()


def test_auc_forest_draws_an_interval_that_misses_the_auc():
    """With few resamples a percentile interval can lie wholly on one side of the AUC; the
    plot draws it (that side's bar empty) instead of a matplotlib error."""
    import pandas as pd

    ci = pd.DataFrame({"label": ["Mass", "Edema", "mean"], "auc": [0.80, 0.70, 0.75],
                       "ci_low": [0.82, 0.60, 0.70], "ci_high": [0.90, 0.75, 0.80]})
    fig = report.plot_auc_forest(ci, published=False)
    (bars,) = [c for c in fig.axes[0].containers if c.get_label() == "this run (95% CI)"]
    assert len(bars.lines[2][0].get_segments()) == 2
