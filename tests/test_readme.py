"""The README's commands, run where a new user runs them: in a copy of the repository's tracked
files in a temporary folder with no ../shared beside it.

Every command of the README (its fenced blocks, and the `python ...` / `make ...` commands in
its text and tables) must have an entry in RECIPE: either how it runs here (its paths mapped
to demo data made in the copy, e.g. /data/nih -> data/demo/nih, and for training a tiny
recipe), or why it cannot (it needs the real dataset, a GPU, the network, or it is the suite
itself), so a new README command without an entry fails `test_every_readme_command_is_listed`.
Each runnable one must exit 0, and what it writes must be there.

The commands run through the copy's own tests/warm.py, so the copy's package is the one
imported (checked: chexnet.__file__ is in the copy).
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, shared

pytestmark = pytest.mark.slow

DEMO = "data/demo"
NIH = f"{DEMO}/nih"
PHOTO = f"{DEMO}/chexphoto/CheXphoto-v1.1"
# A 1-epoch DenseNet at 32 px on 60 images: a run folder in a few seconds.
TINY = ["--epochs", "1", "--image-size", "32", "--weights", "none", "--workers", "0",
        "--batch-size", "16"]
# README path -> the copy's stand-in (longest first when substituting).
PATHS = {
    "/kaggle/input/nih": NIH, "/data/nih/images/": f"{NIH}/images/", "/data/nih": NIH,
    "/data/CheXphoto-v1.1": PHOTO, "/data/x/": f"{NIH}/images/",
    "results/NAME": "results/nih_run", "results/A results/B": "results/nih_run results/photo",
    "X.png": f"{NIH}/images/00000001_000.png", "chest.png": f"{NIH}/images/00000001_000.png",
    "study.dcm": "extra/study.dcm", "Data_Entry_2017_v2020.csv": f"{NIH}/Data_Entry_2017.csv",
    "BBox_List_2017.csv": f"{NIH}/BBox_List_2017.csv",
}
DATASET = "the real dataset (112,120 NIH images or CheXphoto), not the demo"
NETWORK = "the network (no machine here reaches it; the code is tested against a loopback server)"

# README command -> ("run", extra arguments for the demo) or ("skip", why). In README order
# of first use; they run in this order (later ones use what earlier ones wrote).
RECIPE: dict[str, tuple[str, object]] = {
    "python demo_data.py --out data/demo --kind both":
        ("run", ["--n-images", "60", "--n-train", "40", "--n-valid", "20", "--png-size", "48"]),
    # The demo's labels and a random split (its images are not NIH's), as make demo does.
    "python prepare_data.py nih --data /data/nih": ("run", [
        "--image-size", "32", "--split", "random", "--labels", f"{NIH}/Data_Entry_2017.csv"]),
    "python prepare_data.py chexphoto --data /data/CheXphoto-v1.1": ("run",
                                                                     ["--image-size", "32"]),
    "python prepare_data.py nih --data /kaggle/input/nih --labels-out nih_labels.csv "
    "--cache-dir cache": ("skip", "writes nih_labels.csv in the working folder, on Kaggle "
                          "/kaggle/working; run here from the repository it would be the "
                          "repository's own nih_labels.csv (refused as an input, tested in "
                          "test_invariants)"),
    "python retrain.py --dataset nih --data /kaggle/input/nih --labels nih_labels.csv "
    "--cache-dir cache": ("skip", "the Kaggle pair above"),
    "python retrain.py --dataset nih --data /data/nih --name nih_run": ("run", TINY),
    "python retrain.py --dataset chexphoto --data /data/CheXphoto-v1.1 --name photo":
        ("run", TINY + ["--view", "all"]),
    "python retrain.py --help": ("run", []),
    "python eval_model.py --preds results/nih_run/preds.csv": ("run", []),
    "python nih_batch_download_zips.py --out /data/nih --extract": ("skip", NETWORK),
    "make reference": ("fetch", None),
    "python eval_model.py --preds pretrained/preds.csv --labels nih_labels.csv --out aucs.csv":
        ("needs reference", []),
    "python eval_model.py --preds results/NAME/preds.csv --compare pretrained/preds.csv":
        ("skip", "a run on NIH's reference test fold: the demo's images are other images"),
    "python visualize_prediction.py --checkpoint results/nih_run/checkpoint.pt --image X.png "
    "--label Cardiomegaly --out h.png": ("run", []),
    "python predict.py /data/x/ --checkpoint results/nih_run/checkpoint.pt --out preds.csv":
        ("run", []),
    "python predict.py chest.png study.dcm --checkpoint results/nih_run/checkpoint.pt "
    "--heatmap heatmaps/": ("run", []),
    "python predict.py /data/nih/images/ extra/scan.dcm --checkpoint "
    "results/nih_run/checkpoint.pt --out nih_preds.csv": ("run", []),
    "python make_nih_labels.py --data-entry Data_Entry_2017_v2020.csv --lists DIR":
        ("skip", "arnoweng's split lists cover NIH's images, not the demo's (the reference "
         "split of the demo is refused, tested in test_splits)"),
    "python plot_training.py results/A results/B --reference --out curves.png":
        ("needs reference", []),
    "python report.py results/NAME": ("run", []),
    "python visualize_prediction.py --run results/NAME --label Effusion --top 12 --method "
    "gradcam --out g.png": ("run", []),
    "python visualize_prediction.py --run results/NAME --label Effusion --style reference "
    "--out g.png": ("run", []),
    "python localization.py --run results/NAME --boxes BBox_List_2017.csv": ("run", []),
    "python explore_data.py nih --data /data/nih --out explore/": ("run", []),
    "python cross_eval.py --checkpoint results/nih_run/checkpoint.pt --dataset chexphoto "
    "--data /data/CheXphoto-v1.1": ("run", []),
    "python photo_corruptions.py --run results/NAME --severities 1 3 5 --out robustness.csv "
    "--plot robustness.png": ("run", []),
    "python benchmarks/subgroups_reference.py": ("needs reference", ["--n-boot", "20"]),
    "python benchmarks/data_pipeline.py": ("run", []),  # says it needs ../shared; exits 0
    "python benchmarks/colab_reset.py": ("run", ["--small-files", "20", "--big-mb", "4"]),
    "python benchmarks/train_memory.py": ("run", ["--batches", "2", "--image-size", "32",
                                                  "--steps", "1"]),
    "python retrain.py --dataset nih --data /data/nih --name nih_run --memory-efficient":
        ("skip", "the same training as the nih_run line above, with one more flag (its "
         "folder would already hold a run); --memory-efficient is tested in test_precision"),
    "python benchmarks/localization_demo.py": ("skip", "trains a DenseNet on 1,000 demo "
                                               "images (minutes); tests/test_localization_demo "
                                               "runs its --quick form"),
    "python convert_checkpoint.py reproduce_chexnet_checkpoint pretrained/checkpoint.pt "
    "--trust-pickle": ("skip", "reproduce-chexnet's pickled checkpoint is not distributed "
                       "with it (tests/test_convert_checkpoint converts a generated one)"),
    "python convert_checkpoint.py IN converted.pt [--trust-pickle]": ("skip", "a usage line "
                                                                      "(IN: any checkpoint)"),
    "python -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/pip "
    "install --no-deps -e .": ("skip", "what make demo does first; CI's fresh clone runs it"),
    "make demo": ("skip", "5-7 minutes; CI runs it in a fresh clone, and its figures are in the "
                  "README"),
    "make test": ("skip", "this suite"),
    "make test TEST_JOBS=8": ("skip", "this suite, on 8 workers"),
    "make test-fast": ("skip", "a part of this suite"),
    "make test-portable": ("skip", "this suite's training tests three times (14 minutes)"),
    "make notebooks": ("skip", "opens JupyterLab: test_notebooks starts jupyter lab "
                       "notebooks/ and lists the notebooks"),
    ".venv/bin/jupyter lab notebooks/": ("skip", "as make notebooks"),
    "make bench-localization": ("skip", "as benchmarks/localization_demo.py"),
}


def readme_commands() -> list[str]:
    """Every command in the README: the lines of its fenced shell blocks (continuations
    joined, comments dropped), then `python ...` / `make ...` spans in its text."""
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append(" ".join(line.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`((?:python|make|\.venv/bin/\w+) [^`]*)`", prose):
        found.append(" ".join(span.split()))
    return list(dict.fromkeys(found))


def test_every_readme_command_is_listed():
    unlisted = [c for c in readme_commands() if c not in RECIPE]
    assert not unlisted, f"README commands with no entry in RECIPE: {unlisted}"
    stale = [c for c in RECIPE if c not in readme_commands()]
    assert not stale, f"RECIPE entries the README no longer has: {stale}"


def argv_of(command: str, extra: list[str]) -> list[str]:
    """The command with its README paths mapped to the copy's stand-ins, `python` dropped."""
    for path, stand_in in sorted(PATHS.items(), key=lambda kv: -len(kv[0])):
        command = re.sub(rf"(?<![\w/.-]){re.escape(path)}(?![\w/.-])", stand_in, command)
    words = command.split()
    assert words[0] == "python", command
    return words[1:] + list(extra)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The tracked files (as committed or edited, no build outputs, no .venv), in a folder
    whose parent has no shared/."""
    where = tmp_path_factory.mktemp("readme") / "clone"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, where / name)
    assert not (where.parent / "shared").exists() and not (where / "pretrained" /
                                                           "preds.csv").exists()
    return where


@pytest.fixture(scope="module")
def warm(clone):
    spec = importlib.util.spec_from_file_location("clone_warm", clone / "tests" / "warm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["clone_warm"] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    with module.Warm(cwd=clone) as server:
        yield server


@pytest.fixture(scope="module")
def mirror():
    """A loopback mirror of reproduce-chexnet's pretrained/ folder, from the shared copies of
    its files; None without ../shared (make reference then needs the network)."""
    from test_download import FileServer

    try:
        copies = {name: shared("reference", f"reproduce_chexnet_pretrained_{stem}.csv")
                  for name, stem in (("preds.csv", "preds"), ("aucs.csv", "aucs"),
                                     ("log_train", "log_train"))}
    except pytest.skip.Exception:
        yield None
        return
    server = FileServer()
    server.files.update({name: path.read_bytes() for name, path in copies.items()})
    server.thread.start()
    yield server.url("")
    server.httpd.shutdown()
    server.httpd.server_close()


def test_the_readme_runs_in_a_plain_clone(clone, warm, mirror):
    from test_predict import write_dicom

    out = subprocess.run([sys.executable, "-c", "import chexnet; print(chexnet.__file__)"],
                         cwd=clone, capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()).is_relative_to(clone)  # the copy's package, not the checkout's
    gray = np.asarray(Image.open(ROOT / "docs" / "report_screenshot.png").convert("L"))[:64, :64]
    ran, left_out = [], {}
    for command, (how, extra) in RECIPE.items():
        if how == "skip":
            left_out[command] = extra
            continue
        if how == "fetch":  # make reference, from the loopback mirror
            if mirror is None:
                left_out[command] = f"{NETWORK}; ../shared absent, so no loopback mirror"
                continue
            argv = ["fetch_reference.py", "--base-url", mirror]
        elif how == "needs reference" and mirror is None:
            left_out[command] = "pretrained/ not fetched: make reference needs the network here"
            continue
        else:
            argv = argv_of(command, extra)
        if argv[0] == "predict.py" and not (clone / "extra").exists():
            (clone / "extra").mkdir()
            write_dicom(clone / "extra" / "study.dcm", gray, bits_stored=8)
            write_dicom(clone / "extra" / "scan.dcm", gray, bits_stored=8)
        done = warm.run(argv, cwd=clone)
        assert done.returncode == 0, (command, argv, done.output[-3000:])
        assert "Traceback" not in done.stderr, (command, done.stderr[-3000:])
        ran.append(command)
        if how == "fetch":
            assert sorted(p.name for p in (clone / "pretrained").iterdir()) == [
                "README.md", "aucs.csv", "log_train", "preds.csv"]
    print(f"ran {len(ran)} README commands; left out: {left_out}")
    for path in ("results/nih_run/preds.csv", "results/photo/preds.csv", "h.png", "g.png",
                 "preds.csv", "nih_preds.csv", "heatmaps", "results/nih_run/report.html", "explore",
                 "robustness.csv", "robustness.png"):
        assert (clone / path).exists(), path
    if mirror is not None:  # what the reference's files were read for
        assert (clone / "aucs.csv").exists() and (clone / "curves.png").exists()
    assert len(ran) >= (22 if mirror is not None else 19), ran
