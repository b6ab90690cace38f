"""Every notebook runs top to bottom on the demo data (what a user gets from "Run all")."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import ROOT, shared
from chexnet.labels import NIH_FINDINGS

# Trains networks or runs subprocesses: `pytest -m "not slow"` leaves these out.
# One torch thread in this process (conftest.py one_thread: 2 shared cores).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = ROOT / "notebooks"
TINY = {"CHEXNET_IMAGE_SIZE": "32", "CHEXNET_EPOCHS": "1", "CHEXNET_WEIGHTS": "none",
        "CHEXNET_DEMO_IMAGES": "60"}


def run_cells(nb):
    """Execute `nb` in place in a python3 kernel started in notebooks/, as Jupyter does."""
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()


def execute(name, monkeypatch, **env):
    for key, value in {**TINY, **env}.items():
        monkeypatch.setenv(key, str(value))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    run_cells(nb)
    return nb


def text_of(nb):
    return "\n".join(o.get("text", "") + json.dumps(o.get("data", {}))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_notebooks_are_stored_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and not c.get("execution_count")
                   for c in nb.cells if c.cell_type == "code"), path.name


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from chexnet.datatools.demo import make_chexphoto_demo, make_nih_demo

    root = tmp_path_factory.mktemp("nbdemo")
    make_nih_demo(root / "nih", n_images=60, size=40, seed=5)
    make_chexphoto_demo(root / "chexphoto", n_train=40, n_valid=18, size=40, seed=5)
    return root


def test_retrain_chexphoto(demo, tmp_path, monkeypatch):
    execute("Retrain_chexphoto.ipynb", monkeypatch,
            CHEXNET_DATA=demo / "chexphoto" / "CheXphoto-v1.1", CHEXNET_OUT=tmp_path)
    import pandas as pd
    aucs = pd.read_csv(tmp_path / "chexphoto_run" / "aucs.csv").set_index("label")
    assert len(aucs) == 14  # 13 findings + mean
    preds = pd.read_csv(tmp_path / "chexphoto_run" / "preds.csv")
    want = []
    for f in aucs.index[:-1]:  # the run's table against sklearn on its own predictions
        rows = preds[f].notna()
        if preds.loc[rows, f].nunique() == 2:
            want.append(roc_auc_score(preds.loc[rows, f], preds.loc[rows, f"prob_{f}"]))
            assert aucs.loc[f, "auc"] == pytest.approx(want[-1], abs=1e-6), f
    assert aucs.loc["mean", "auc"] == pytest.approx(np.mean(want), abs=1e-6)


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """One finished 2-epoch run on the demo (retrain.main, in this process), which the plot and
    prediction notebooks only read (they write nothing into the run folder)."""
    import retrain

    out = tmp_path_factory.mktemp("nbruns")
    assert retrain.main(["--dataset", "demo", "--data", str(demo / "nih"), "--out", str(out),
                         "--name", "r", "--image-size", "32", "--weights", "none", "--workers",
                         "0", "--epochs", "2"]) == 0
    return out / "r"


def test_plot(trained, tmp_path, monkeypatch):
    nb = execute("plot.ipynb", monkeypatch, CHEXNET_RUNS=trained,
                 CHEXNET_PRETRAINED=tmp_path / "none")
    out = text_of(nb)
    assert "best_epoch" in out and "image/png" in out
    # Without the reference log it says so, and how to get it (it was silently left out).
    assert "no reference curve: " in out and "python fetch_reference.py" in out


def test_plot_shows_the_published_curve(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("CHEXNET_RUNS", str(trained))
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    shutil.copyfile(shared("reference", "reproduce_chexnet_pretrained_log_train.csv"),
                    pretrained / "log_train")
    out = text_of(execute("plot.ipynb", monkeypatch, CHEXNET_PRETRAINED=pretrained))
    assert "reproduce-chexnet (published log) {'best_epoch': 6, 'best_val_loss': 0.1452" in out


def test_explore_nih_on_the_demo(demo, tmp_path, monkeypatch):
    nb = execute("Explore_nihdataset.ipynb", monkeypatch, CHEXNET_DATA=demo / "nih")
    out = text_of(nb)
    assert "60 images" in out and out.count("image/png") >= 5


def test_explore_nih_on_the_real_sample(monkeypatch):
    from conftest import shared

    images = shared("nih", "images")
    nb = execute("Explore_nihdataset.ipynb", monkeypatch, CHEXNET_DATA=images.parent,
                 CHEXNET_LABELS=shared("nih", "Data_Entry_2017_v2020.csv.gz"),
                 CHEXNET_MISSING="skip")
    assert "120 images" in text_of(nb)


def test_explore_chexphoto_on_the_demo(demo, monkeypatch):
    nb = execute("Explore_chexphotodataset.ipynb", monkeypatch,
                 CHEXNET_DATA=demo / "chexphoto" / "CheXphoto-v1.1")
    assert text_of(nb).count("image/png") >= 5


def test_explore_predictions(demo, trained, monkeypatch):
    nb = execute("Explore_Predictions.ipynb", monkeypatch, CHEXNET_RUN=trained,
                 CHEXNET_LABEL="Effusion", CHEXNET_TOP=4,
                 CHEXNET_BOXES=demo / "nih" / "BBox_List_2017.csv")
    out = text_of(nb)
    preds = pd.read_csv(trained / "preds.csv")
    aucs = [roc_auc_score(preds[f], preds[f"prob_{f}"]) for f in NIH_FINDINGS
            if preds[f].nunique() == 2]
    assert f"{np.mean(aucs):.4f} [" in out         # the CI table's mean row, as sklearn has it
    assert out.count("image/png") >= 2             # ROC + gallery
    assert "hit_rate" in out and "centre_hit_rate" in out  # pointing game vs the centre
    check_show_next(nb, trained, demo / "nih", "Effusion")


def shown_examples(nb):
    """Per cell ending in `show_next()`: (its printed line, its table's rows as
    (finding, probability, ground truth), how many PNGs it displayed)."""
    shown = []
    for cell in nb.cells:
        if cell.cell_type != "code" or not cell.source.splitlines()[-1].startswith("show_next()"):
            continue
        printed = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        (table,) = [o["data"]["text/plain"] for o in cell.outputs
                    if o.output_type == "execute_result"]
        rows = [re.fullmatch(r"(.+?)\s+(\d\.\d+)\s+(True|False)", line.strip())
                for line in table.splitlines()]
        pngs = sum("image/png" in o.get("data", {}) for o in cell.outputs)
        shown.append((printed, [(m[1], float(m[2]), m[3] == "True") for m in rows if m], pngs))
    return shown


def check_show_next(nb, run_dir, data, label):
    """The show_next() cells step through the test positives of `label` in test order; each
    shows one figure and a table whose numbers are the run's preds.csv row and the image's
    labels in Data_Entry_2017.csv, sorted by probability; the prevalence is the training fold's."""
    import pandas as pd

    from chexnet.config import load_run_config
    from chexnet.loaders import load_tables

    preds = pd.read_csv(run_dir / "preds.csv").set_index("Image Index")
    positives = list(preds.index[preds[label] == 1])          # preds.csv is in test order
    entries = pd.read_csv(data / "Data_Entry_2017.csv").set_index("Image Index")
    labels, _ = load_tables(load_run_config(run_dir))
    table = labels.frame
    train_rate = (table.loc[table["fold"] == "train", label] == 1).mean()
    assert train_rate != pytest.approx((table.loc[table["fold"] == "test", label] == 1).mean())
    shown = shown_examples(nb)
    assert len(shown) == 2 and len(positives) >= 2
    for (printed, rows, pngs), image_id in zip(shown, positives):
        m = re.fullmatch(rf"(\S+): P\({label}\)=([\d.]+), training prevalence ([\d.]+)\n",
                         printed)
        assert m and m[1] == image_id and pngs == 1, printed
        assert abs(float(m[2]) - preds.at[image_id, "prob_" + label]) <= 5e-4 + 1e-6
        assert abs(float(m[3]) - train_rate) <= 5e-5 + 1e-9
        truth = set(entries.at[image_id, "Finding Labels"].split("|"))
        assert len(rows) == 14
        assert [p for _, p, _ in rows] == sorted((p for _, p, _ in rows), reverse=True)
        for name, prob, ground_truth in rows:
            assert abs(prob - preds.at[image_id, "prob_" + name]) <= 5e-4 + 1e-6, name
            assert ground_truth == (name in truth), name


def test_subgroups_and_calibration_on_the_demo(tmp_path, monkeypatch):
    """The injected gap for women is found (interval excludes 0) and the clean labels show
    none; the saved tables match sklearn on the notebook's own files; temperature scaling
    lowers the ECE and leaves every AUC as it was."""
    nb = execute("Subgroups_and_calibration.ipynb", monkeypatch, CHEXNET_DEMO_IMAGES=1500,
                 CHEXNET_IMAGE_SIZE=16, CHEXNET_N_BOOT=300, CHEXNET_OUT=tmp_path,
                 CHEXNET_PRETRAINED=tmp_path / "no_reference")
    out = text_of(nb)
    assert "no reference predictions: " in out and "python fetch_reference.py" in out
    assert re.search(r"with injection: gap F - M -0\.\d+ \[-0\.\d+, -0\.\d+\], interval "
                     r"excludes 0: True", out)
    assert "without injection: gap F - M" in out and "interval excludes 0: False" in out
    assert "F1-maximising on the validation fold" in out and out.count("image/png") == 1
    entry = pd.read_csv(tmp_path / "injected" / "Data_Entry_2017.csv").set_index("Image Index")
    preds = pd.read_csv(tmp_path / "run_injected" / "preds.csv")
    women = (entry.loc[preds["Image Index"], "Patient Gender"] == "F").to_numpy()
    want = np.mean([roc_auc_score(preds.loc[women, f], preds.loc[women, f"prob_{f}"])
                    for f in NIH_FINDINGS])
    table = pd.read_csv(tmp_path / "run_injected" / "subgroups.csv")
    row = table[(table["group"] == "F") & (table["finding"] == "mean")].iloc[0]
    assert row["auc"] == pytest.approx(want)
    clean = pd.read_csv(tmp_path / "run_clean" / "preds.csv")
    calibrated = pd.read_csv(tmp_path / "run_clean" / "preds_calibrated.csv")
    temperature = pd.read_csv(tmp_path / "run_clean" / "calibration.csv").set_index("finding")[
        "temperature"]
    for f in NIH_FINDINGS:
        assert roc_auc_score(clean[f], calibrated[f"prob_{f}"]) == roc_auc_score(
            clean[f], clean[f"prob_{f}"])
        p = clean[f"prob_{f}"].to_numpy()
        by_hand = 1 / (1 + (p / (1 - p)) ** (-1 / temperature[f]))   # sigmoid(logit(p) / T)
        np.testing.assert_allclose(calibrated[f"prob_{f}"], by_hand, rtol=1e-9)
    pooled = pd.read_csv(tmp_path / "run_clean" / "calibration.csv").iloc[-1]
    assert pooled["ece_calibrated"] < 0.5 * pooled["ece"]


def test_subgroups_notebook_on_the_reference_predictions(tmp_path, monkeypatch):
    """Its last section reads pretrained/preds.csv: the counts of the reference test fold by
    sex (literals from Data_Entry v2020) and a mean AUC against sklearn."""
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    shutil.copyfile(shared("reference", "reproduce_chexnet_pretrained_preds.csv"),
                    pretrained / "preds.csv")
    out = text_of(execute("Subgroups_and_calibration.ipynb", monkeypatch,
                          CHEXNET_DEMO_IMAGES=200, CHEXNET_IMAGE_SIZE=16, CHEXNET_N_BOOT=20,
                          CHEXNET_OUT=tmp_path, CHEXNET_PRETRAINED=pretrained))
    assert "reproduce-chexnet's test predictions (22433 images)" in out
    assert re.search(r"sex +F +9802 +2822 ", out) and re.search(r"sex +M +12631 +3365 ", out)
    preds = pd.read_csv(pretrained / "preds.csv")
    labels = pd.read_csv(ROOT / "nih_labels.csv").set_index("Image Index").loc[
        preds["Image Index"]]
    women = (labels["Patient Gender"] == "F").to_numpy()
    want = np.mean([roc_auc_score(labels[f][women], preds[f"prob_{f}"][women])
                    for f in NIH_FINDINGS])
    assert re.search(rf"sex +F +9802 +2822 +\d+ {want:.4f} \[", out)


@pytest.mark.slow
def test_jupyter_lab_serves_the_notebooks(tmp_path):
    """`make notebooks` runs `jupyter lab notebooks/`: it starts from the setup's .venv and
    lists every notebook (its contents API, as the browser's file panel asks it).

    The server is bound to 127.0.0.1 and asked there: "localhost" may resolve to an address
    (::1) the server does not listen on. Its log is read to the end in a thread, so a full
    pipe never stalls it, and it is shown when the check fails."""
    import subprocess
    import sys
    import threading
    import urllib.request
    from pathlib import Path

    jupyter = Path(sys.executable).with_name("jupyter")
    env = {**os.environ, "HOME": str(tmp_path), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_DATA_DIR": str(tmp_path / "d")}
    server = subprocess.Popen(
        [str(jupyter), "lab", "notebooks/", "--no-browser", "--ip=127.0.0.1", "--port=0",
         "--allow-root", "--IdentityProvider.token=test", "--ServerApp.port_retries=0"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    log, listening = [], threading.Event()

    def read_log():
        for line in server.stderr:
            log.append(line)
            if re.search(r"http://127\.0\.0\.1:\d+/lab", line):
                listening.set()
        listening.set()  # the server exited: stop waiting

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        listening.wait(timeout=240)
        found = re.search(r"(http://127\.0\.0\.1:\d+)/lab", "".join(log))
        assert found and server.poll() is None, f"jupyter lab did not start:\n{''.join(log)}"
        # Jupyter prints its URL before its event loop binds the port (jupyter_server's
        # init_httpserver defers the listen to a callback): a refused connection only means
        # "not yet" while the process lives, so ask again, waiting on the process in between.
        for attempt in range(600):
            try:
                with urllib.request.urlopen(f"{found.group(1)}/api/contents?token=test",
                                            timeout=60) as reply:
                    listed = {item["name"] for item in json.load(reply)["content"]}
                break
            except OSError as err:
                if "refused" not in str(err) or attempt == 599:
                    raise AssertionError(f"{err}; the server's log:\n{''.join(log)}") from None
                try:
                    server.wait(timeout=0.1)
                    raise AssertionError(f"jupyter lab exited:\n{''.join(log)}")
                except subprocess.TimeoutExpired:
                    pass  # still running: not listening yet
        assert {p.name for p in (ROOT / "notebooks").glob("*.ipynb")} <= listed
    finally:
        server.terminate()
        server.wait(timeout=60)
        reader.join(timeout=60)
