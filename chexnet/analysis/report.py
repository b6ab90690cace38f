"""One self-contained HTML report of a training run: settings, convergence, AUCs with bootstrap
CIs next to the published figures, ROC curves, thresholds, CAM galleries, and optionally a
paired comparison with another run.

    python report.py results/demo
    python report.py results/nih_run --out nih_report.html --compare-to results/nih_amp
    python report.py results/demo --n-boot 200 --data data/demo/nih   # data moved since training

The file embeds every figure as a base64 PNG and its CSS inline; it has no scripts and no
external references (a Content-Security-Policy forbids them), so it opens from disk in any
browser and can be mailed or archived as is.

Sections (each a `<section id=...>`): config, convergence, aucs, roc, thresholds, heatmaps,
subgroups (subgroup AUCs, under-diagnosis, calibration and reliability diagrams, from
subgroups.py), and compare with --compare-to. Published AUCs (labels.PUBLISHED_AUCS) are shown
for runs on the 14 NIH findings; each was measured on its own test split, never on this run's
test fold.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import errno
import html
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from chexnet.cli import at_least, command, integer
from chexnet.analysis import metrics
from chexnet.analysis import training_plots
from chexnet.runs import SaveError, save_text
from chexnet.analysis import subgroups
from chexnet.analysis import heatmaps
from chexnet.data import DataError
from chexnet.files import check_outputs, probe_writable, run_files
from chexnet.scoring import patients_of, per_label_auc, truth_and_scores
from chexnet.labels import NIH_FINDINGS, PUBLISHED_AUCS, PUBLISHED_MEAN_AUC

SECTIONS = {
    "config": "Configuration and environment",
    "convergence": "Convergence",
    "aucs": "Test AUCs",
    "roc": "ROC curves",
    "thresholds": "Thresholds",
    "heatmaps": "Heatmaps",
    "subgroups": "Subgroups and calibration",
    "compare": "Comparison",
}
# Published columns shown next to the run's AUCs (arnoweng/CheXNet is in labels.py too, but
# the brief of the report is the paper and the reproduction this project follows).
PUBLISHED_SHOWN = ("CheXNet paper", "reproduce-chexnet")
# Settings shown in the config table, in this order (the full config.json follows, folded).
KEY_SETTINGS = ("dataset", "data", "labels", "image_size", "batch_size", "epochs", "lr",
                "momentum", "weight_decay", "lr_decay", "patience", "weights", "amp", "seed",
                "missing")
CHEXPHOTO_SETTINGS = ("uncertainty", "source", "view", "no_finding")
ENVIRONMENT_KEYS = ("python", "platform", "torch", "torchvision", "numpy", "pandas",
                    "scikit-learn", "cuda", "gpu", "git_commit", "git_dirty", "started")
HEATMAP_FINDINGS = 3      # the most prevalent findings of the test fold get a gallery each

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2329;
       margin: 0; background: #f4f6f8; line-height: 1.45; }
header, main { max-width: 1150px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 18px; }
h1 { font-size: 1.6em; margin: 0.2em 0; }
h2 { font-size: 1.25em; margin: 0 0 0.6em; border-bottom: 2px solid #d0d7de; padding-bottom: 4px; }
h3 { font-size: 1.02em; margin: 1.1em 0 0.4em; }
nav { margin: 8px 0 14px; }
nav a { margin-right: 14px; color: #0b5cad; text-decoration: none; font-size: 0.95em; }
section { background: #fff; border: 1px solid #d8dee4; border-radius: 6px; padding: 16px 20px;
          margin: 0 0 18px; }
.headline { display: flex; flex-wrap: wrap; gap: 10px; margin: 6px 0 14px; }
.headline div { background: #fff; border: 1px solid #d8dee4; border-radius: 6px;
                padding: 6px 12px; font-size: 0.92em; }
.headline b { display: block; font-size: 1.25em; }
table { border-collapse: collapse; font-size: 0.86em; margin: 6px 0 10px; }
th, td { border: 1px solid #d8dee4; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; background: #f6f8fa; }
tbody tr:nth-child(even) { background: #fafbfc; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0; }
figure { margin: 8px 0 14px; }
figcaption, .note { color: #57606a; font-size: 0.86em; }
.note { margin: 4px 0 8px; }
.warn { color: #8a4b00; }
code { font-size: 0.92em; background: #f0f2f4; padding: 0 3px; border-radius: 3px; }
details summary { cursor: pointer; color: #0b5cad; font-size: 0.9em; }
.cols { display: flex; flex-wrap: wrap; gap: 24px; }
"""


# --------------------------------------------------------------------------------------------
# HTML helpers
# --------------------------------------------------------------------------------------------
def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """A matplotlib Figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def img_tag(png: bytes, alt: str, caption: str | None = None) -> str:
    """An <img> embedding PNG bytes as a data URI (so the report needs no other file)."""
    data = base64.b64encode(png).decode("ascii")
    tag = f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'
    if caption:
        return f"<figure>{tag}<figcaption>{_esc(caption)}</figcaption></figure>"
    return f"<figure>{tag}</figure>"


def _cell(value: object, digits: int) -> str:
    if value is None or value is pd.NA:
        return '<td class="num">n/a</td>'
    if isinstance(value, (bool, np.bool_)):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, (int, np.integer)):
        return f'<td class="num">{int(value)}</td>'
    if isinstance(value, (float, np.floating)):
        text = "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
        return f'<td class="num">{text}</td>'
    return f"<td>{_esc(value)}</td>"


def html_table(df: pd.DataFrame, digits: int = 4, total_label: str | None = "mean") -> str:
    """A DataFrame as an HTML table: floats with `digits` decimals, NaN as n/a, every text
    escaped; a row whose first cell is `total_label` is set in bold."""
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cls = ' class="total"' if total_label is not None and str(row[0]) == total_label else ""
        body.append(f"<tr{cls}>" + "".join(_cell(v, digits) for v in row) + "</tr>")
    return (f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def kv_table(items: Sequence[tuple[str, object]]) -> str:
    """Two-column key / value table (values escaped; None shown as n/a)."""
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc('n/a' if v is None else v)}</td></tr>"
                   for k, v in items)
    return f"<table><tbody>{rows}</tbody></table>"


def note(text: str, warn: bool = False) -> str:
    return f'<p class="note{" warn" if warn else ""}">{_esc(text)}</p>'


def section(sid: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{_esc(SECTIONS[sid])}</h2>\n{body}\n</section>'


# --------------------------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResults:
    """What the report needs from a run folder; absent files are None."""

    path: Path
    config: dict | None
    record: dict | None
    y_true: np.ndarray          # (N, K) test-fold ground truth, NaN = masked
    y_score: np.ndarray         # (N, K) probabilities
    findings: list[str]
    ids: list[str]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def dataset(self) -> str | None:
        return (self.config or {}).get("dataset")


def _read_json(path: Path) -> dict | None:
    """A JSON object file, or None when absent. Raises DataError when unreadable."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}).") from err
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object.")
    return value


def read_run(run_dir: str | Path) -> RunResults:
    """Read a run folder written by retrain.py (preds.csv is required).

    Raises:
        DataError: not a folder, no or unreadable preds.csv / config.json / run_record.json.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise DataError(f"{path}: run folder not found (expected a folder written by "
                        "retrain.py, e.g. results/NAME).")
    preds = path / "preds.csv"
    if not preds.is_file():
        raise DataError(f"{preds}: not found; the run has not finished (retrain.py writes it "
                        "after the last epoch), or this is not a run folder.")
    y_true, y_score, findings, ids = truth_and_scores(preds, None)
    return RunResults(path, _read_json(path / "config.json"),
                      _read_json(path / "run_record.json"),
                      y_true, y_score, findings, ids)


def shows_published(run: RunResults) -> bool:
    """Published NIH AUCs apply to runs predicting exactly the 14 NIH findings (nih or demo)."""
    return (run.dataset in (None, "nih", "demo") and len(run.findings) == len(NIH_FINDINGS)
            and set(run.findings) == set(NIH_FINDINGS))


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
def config_section(run: RunResults) -> str:
    """Key settings, the environment of run_record.json, the data fingerprint, full config."""
    columns, parts = [], []
    if run.config is None:
        parts.append(note(f"{run.path / 'config.json'} not found: settings unknown.", warn=True))
    else:
        keys = KEY_SETTINGS + (CHEXPHOTO_SETTINGS if run.dataset == "chexphoto" else ())
        items = [(k, run.config.get(k)) for k in keys if k in run.config]
        items.append(("findings", len(run.findings)))
        columns.append("<div><h3>Settings</h3>" + kv_table(items) + "</div>")
    if run.record is None:
        parts.append(note(f"{run.path / 'run_record.json'} not found (a run from before run "
                          "records): versions and git commit unknown.", warn=True))
    else:
        env = run.record.get("environment", {})
        items = [(k, env.get(k)) for k in ENVIRONMENT_KEYS if k in env]
        items.append(("processes", run.record.get("processes")))
        block = "<div><h3>Environment</h3>" + kv_table(items)
        data = run.record.get("data", {})
        if data:
            items = [("images", data.get("images")),
                     ("folds sha256", str(data.get("folds_sha256", ""))[:16] + "...")]
            items += [(f"labels {Path(p).name}", f"sha256 {h[:16]}...")
                      for p, h in data.get("sources", {}).items()]
            block += "<h3>Data</h3>" + kv_table(items)
        columns.append(block + "</div>")
    if columns:
        parts.insert(0, f'<div class="cols">{"".join(columns)}</div>')
    parts.append(note("findings: " + ", ".join(run.findings)))
    if run.config is not None:
        full = kv_table([(k, json.dumps(v)) for k, v in run.config.items()])
        parts.append(f"<details><summary>all settings (config.json)</summary>{full}</details>")
    return section("config", "\n".join(parts))


def convergence_section(run: RunResults, dpi: int) -> str:
    """Loss curves (plot_training), best epoch and LR steps, the per-epoch log."""
    try:
        log = training_plots.read_log(run.path)
        summary = training_plots.convergence_summary(log)
    except (FileNotFoundError, ValueError) as err:
        # The rest of the report stands without the log; say why this part is missing.
        return section("convergence", note(f"no training curves: {err}", warn=True))
    fig = training_plots.plot_runs([log], [run.name])
    steps = ", ".join(map(str, summary["lr_steps"])) or "none"
    best = (f"best epoch {summary['best_epoch']} of {summary['epochs']} "
            f"(validation loss {summary['best_val_loss']:.4f}); checkpoint.pt holds that "
            f"epoch's weights and made the test predictions. Epochs that started at a new "
            f"learning rate: {steps}.")
    table = log.copy()
    if "seconds" not in table and (run.path / training_plots.LOG_NAME).is_file():
        raw = pd.read_csv(run.path / training_plots.LOG_NAME)
        if "seconds" in raw and len(raw) == len(table):
            table["seconds"] = raw["seconds"].to_numpy(np.float64)
    table["lr"] = [f"{v:.2e}" if math.isfinite(v) else "n/a" for v in table["lr"]]
    return section("convergence", "\n".join([
        note(best), img_tag(figure_png(fig, dpi), "training and validation loss per epoch"),
        f"<details><summary>per-epoch log</summary>{html_table(table, total_label=None)}"
        "</details>"]))


def auc_ci_table(run: RunResults, n_boot: int, seed: int) -> tuple[pd.DataFrame, str]:
    """bootstrap_auc of the run's test predictions, resampling patients where the ids name
    them. Returns (table with a mean row, a sentence saying what was resampled)."""
    groups = patients_of(run.ids)
    ci = metrics.bootstrap_auc(run.y_true, run.y_score, n_boot, seed, groups,
                               findings=run.findings, with_mean=True)
    unit = (f"{len(np.unique(groups))} patients" if groups is not None
            else f"{len(run.ids)} images (the ids name no patients)")
    return ci, (f"95% percentile bootstrap intervals: {n_boot} resamples of the {unit} of the "
                f"test fold ({len(run.ids)} images), seed {seed}.")


def plot_auc_forest(ci: pd.DataFrame, published: bool) -> Figure:
    """AUC with its 95% CI per finding; the published AUCs as markers when `published`."""
    rows = ci[ci["label"] != "mean"].reset_index(drop=True)
    fig = Figure(figsize=(9, 0.32 * len(rows) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    auc = rows["auc"].to_numpy(np.float64)
    err = np.vstack([auc - rows["ci_low"].to_numpy(np.float64),
                     rows["ci_high"].to_numpy(np.float64) - auc])
    # A percentile interval need not contain the AUC itself (few resamples, a skewed bootstrap
    # distribution): that side's bar is then drawn empty, not refused by matplotlib.
    ax.errorbar(auc, y, xerr=np.clip(np.nan_to_num(err), 0, None), fmt="o", color="C0", capsize=3,
                label="this run (95% CI)", gid="run")
    if published:
        for i, (source, marker) in enumerate(zip(PUBLISHED_SHOWN, ("s", "^"))):
            values = [PUBLISHED_AUCS[source].get(label, math.nan) for label in rows["label"]]
            ax.plot(values, y, ls="none", marker=marker, color=f"C{i + 1}", ms=5,
                    label=f"{source} (own test split)", gid="published")
    ax.axvline(0.5, ls=":", color="grey", lw=1)
    ax.set_yticks(y, rows["label"], fontsize=8)
    ax.invert_yaxis()
    low = np.nanmin(np.r_[rows["ci_low"].to_numpy(np.float64), 0.5]) if len(rows) else 0.5
    ax.set(xlabel="ROC AUC", xlim=(max(0.0, min(0.45, low - 0.02)), 1.0),
           title="per-finding test AUC")
    ax.grid(axis="x", alpha=0.3)
    # Outside the axes: inside, it would hide the bottom findings' intervals.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def aucs_section(run: RunResults, ci: pd.DataFrame, how: str, dpi: int) -> str:
    """The AUC table with intervals, published columns for NIH-finding runs, and a forest plot."""
    table = pd.DataFrame({
        "finding": ci["label"], "positives": ci["n_pos"].astype(int),
        "negatives": ci["n_neg"].astype(int), "AUC": ci["auc"],
        "95% CI": [metrics.format_ci(a, lo, hi).partition(" ")[2] or "n/a"
                   for a, lo, hi in zip(ci["auc"], ci["ci_low"], ci["ci_high"])]})
    published = shows_published(run)
    parts = []
    if published:
        for source in PUBLISHED_SHOWN:
            table[f"{source} (own test split)"] = [
                PUBLISHED_MEAN_AUC[source] if f == "mean" else PUBLISHED_AUCS[source].get(f)
                for f in table["finding"]]
    mean = ci.loc[ci["label"] == "mean"].iloc[0]
    undefined = [f for f, a in zip(ci["label"], ci["auc"]) if not math.isfinite(a)]
    parts.append(note(f"mean AUC {metrics.format_ci(mean.auc, mean.ci_low, mean.ci_high)} over "
                      f"the {len(run.findings) - len(undefined)} findings with both classes in "
                      f"the test fold. {how}"))
    if undefined:
        parts.append(note(f"AUC undefined (one class in the test fold): {', '.join(undefined)}.",
                          warn=True))
    parts.append(html_table(table))
    if published:
        parts.append(note("The published columns (labels.PUBLISHED_AUCS) were measured on each "
                          "project's own test split, not on this run's test fold: differences "
                          "of about 0.01 are within split-to-split variation."))
        if run.dataset == "demo":
            parts.append(note("This run is on the synthetic demo phantoms: the published NIH "
                              "figures are shown for the layout only and are not comparable.",
                              warn=True))
    parts.append(img_tag(figure_png(plot_auc_forest(ci, published), dpi),
                         "per-finding AUC with 95% CI"))
    return section("aucs", "\n".join(parts))


def roc_section(run: RunResults, ci: pd.DataFrame, dpi: int) -> str:
    """metrics.plot_roc of every finding with both classes in the test fold."""
    curves = metrics.roc_curves(run.y_true, run.y_score, run.findings)
    if not curves:
        return section("roc", note("no finding has both classes in the test fold: no ROC "
                                   "curve to draw.", warn=True))
    fig = metrics.plot_roc(curves, ci[ci["label"] != "mean"].reset_index(drop=True))
    left_out = [f for f in run.findings if f not in curves]
    parts = [img_tag(figure_png(fig, dpi), "ROC curve per finding",
                     "ROC curves on the test fold; legend: AUC [95% bootstrap CI].")]
    if left_out:
        parts.append(note(f"left out (one class in the test fold): {', '.join(left_out)}."))
    return section("roc", "\n".join(parts))


def thresholds_section(run: RunResults) -> str:
    """metrics.threshold_report: test metrics at 0.5 and at Youden's J chosen on val_preds.csv,
    one row per finding (the confusion counts in a folded full table)."""
    val_path = run.path / "val_preds.csv"
    if not val_path.is_file():
        return section("thresholds", note(
            f"{val_path} not found (runs from before validation predictions were saved): "
            "thresholds are chosen on the validation fold only, never on test, so none are "
            "reported.", warn=True))
    v_true, v_score, v_findings, _ = truth_and_scores(val_path, None)
    if v_findings != run.findings:
        raise DataError(f"{val_path}: findings {v_findings} differ from preds.csv's.")
    report = metrics.threshold_report(v_true, v_score, run.y_true, run.y_score, run.findings)
    wide = pd.DataFrame({"finding": run.findings})
    for rule, name in (("0.5", "at 0.5"), ("youden(val)", "at Youden")):
        part = report[report["rule"] == rule].set_index("label").loc[run.findings]
        if rule != "0.5":
            wide["Youden threshold"] = part["threshold"].to_numpy()
        for metric in ("f1", "precision", "recall", "specificity"):
            wide[f"{metric} {name}"] = part[metric].to_numpy()
    return section("thresholds", "\n".join([
        note("Metrics on the test fold at a fixed 0.5 threshold and at each finding's Youden "
             f"threshold (max sensitivity + specificity - 1) chosen on {val_path.name} "
             f"({len(v_true)} validation images); the test fold never chooses a threshold."),
        html_table(wide, total_label=None),
        "<details><summary>full table with confusion counts</summary>"
        f"{html_table(report, total_label=None)}</details>"]))


def prevalent_findings(run: RunResults, n: int = HEATMAP_FINDINGS) -> list[str]:
    """The n findings with the most positives in the test fold (at least one each)."""
    pos = (run.y_true == 1).sum(axis=0)   # NaN (masked) compares unequal: not positive
    order = sorted(range(len(run.findings)), key=lambda j: (-pos[j], j))
    return [run.findings[j] for j in order[:n] if pos[j] > 0]


def render_gallery(run: RunResults, label: str, top: int, out: Path, data: str | None) -> Path:
    """visualize_prediction.py's gallery of `label` for the run (the same figure as
    `python visualize_prediction.py --run RUN --label LABEL`), written to `out`."""
    return heatmaps.gallery(run.path, label, top, out, method="cam", data=data)


def heatmaps_section(run: RunResults, top: int, data: str | None, n_findings: int = HEATMAP_FINDINGS
                     ) -> str:
    """A CAM gallery for each of the `n_findings` most prevalent findings of the test fold."""
    findings = prevalent_findings(run, n_findings)
    if not findings:
        return section("heatmaps", note("no positive image in the test fold.", warn=True))
    if not (run.path / "checkpoint.pt").is_file():
        return section("heatmaps", note(f"{run.path / 'checkpoint.pt'} not found: no model to "
                                        "explain.", warn=True))
    pos = {f: int((run.y_true[:, run.findings.index(f)] == 1).sum()) for f in findings}
    parts = [note(f"Class activation maps (CAM) of the best checkpoint for the "
                  f"{len(findings)} most prevalent findings of the test fold: "
                  + ", ".join(f"{f} ({pos[f]} positives)" for f in findings)
                  + ". Tiles: the most confident true-or-predicted positives.")]
    with tempfile.TemporaryDirectory() as tmp:
        for label in findings:
            out = Path(tmp) / "gallery.png"
            try:
                png = render_gallery(run, label, top, out, data)
            except (DataError, FileNotFoundError) as err:
                # One finding's images being unavailable should not sink the whole report:
                # the section says why, and so does stderr.
                print(f"report: no {label} gallery: {err}", file=sys.stderr)
                parts.append(f"<h3>{_esc(label)}</h3>" + note(f"no gallery: {err}", warn=True))
                continue
            parts.append(f"<h3>{_esc(label)}</h3>" + img_tag(Path(png).read_bytes(),
                                                             f"CAM gallery of {label}"))
    parts.append(note("rendered by visualize_prediction.py's gallery "
                      "(chexnet/analysis/heatmaps.py)."))
    return section("heatmaps", "\n".join(parts))


def _ci_text(value: float, low: float, high: float) -> str:
    """'[0.8300, 0.8460]' (the interval of metrics.format_ci), or 'n/a'."""
    return metrics.format_ci(value, low, high).partition(" ")[2] or "n/a"


def subgroup_auc_part(run: RunResults, attrs: subgroups.Attributes, n_boot: int, seed: int) -> str:
    """Mean AUC per subgroup with its CI and the gap to the rest (same resamples), then the
    full per-finding table, folded."""
    units = patients_of(run.ids)
    units = units if units is not None else attrs.patients
    table = subgroups.subgroup_auc(run.y_true, run.y_score, attrs.table, units, run.findings,
                                   n_boot, seed)
    mean = table[table["finding"] == "mean"]
    shown = pd.DataFrame({
        "attribute": mean["attribute"], "group": mean["group"], "images": mean["n"],
        "patients": mean["patients"], "mean AUC": mean["auc"],
        "95% CI": [_ci_text(*v) for v in zip(mean["auc"], mean["ci_low"], mean["ci_high"])],
        "gap to rest": mean["gap"],
        "95% CI of gap": [_ci_text(*v) for v in zip(mean["gap"], mean["gap_ci_low"],
                                                     mean["gap_ci_high"])]})
    unit = "patients" if units is not None else "images"
    return "\n".join([
        "<h3>AUC per subgroup</h3>",
        note(f"Mean AUC over the findings defined in both the subgroup and the rest of the test "
             f"fold; gap = subgroup minus the rest. Both intervals: {n_boot} resamples of "
             f"{unit}, the same resamples for a subgroup and its rest (seed {seed})."),
        html_table(shown, total_label=None),
        "<details><summary>every finding (subgroups.csv)</summary>"
        f"{html_table(table, total_label=None)}</details>"])


def underdiagnosis_part(run: RunResults, attrs: subgroups.Attributes, n_boot: int,
                        seed: int) -> str:
    """Under-diagnosis rates at the F1 threshold of No Finding chosen on val_preds.csv."""
    val_path = run.path / "val_preds.csv"
    parts = ["<h3>Under-diagnosis</h3>"]
    if not val_path.is_file():
        return "\n".join(parts + [note(f"{val_path} not found: the No Finding threshold is "
                                        "chosen on the validation fold only, so no "
                                        "under-diagnosis rate is reported.", warn=True)])
    v_true, v_score, _, _ = truth_and_scores(val_path, None)
    v_truth, v_normal, _ = subgroups.no_finding(v_true, v_score, run.findings)
    threshold = subgroups.f1_threshold(v_truth, v_normal)
    if not math.isfinite(threshold):
        return "\n".join(parts + [note("the validation fold has one No Finding class: no "
                                        "threshold, no under-diagnosis rate.", warn=True)])
    truth, normal, how = subgroups.no_finding(run.y_true, run.y_score, run.findings)
    units = patients_of(run.ids)
    table = subgroups.underdiagnosis(truth, normal, threshold, attrs.table,
                                     units if units is not None else attrs.patients, n_boot,
                                     seed)
    shown = table.assign(**{"95% CI": [_ci_text(*v) for v in
                                       zip(table["rate"], table["ci_low"], table["ci_high"])],
                            "95% CI of gap": [_ci_text(*v) for v in
                                              zip(table["gap"], table["gap_ci_low"],
                                                  table["gap_ci_high"])]})
    shown = shown[["attribute", "group", "with_finding", "underdiagnosed", "rate", "95% CI",
                   "gap", "95% CI of gap"]]
    return "\n".join(parts + [
        note(f"Images with a finding that the model calls normal (Seyyed-Kalantari et al., "
             f"Nature Medicine 2021): score >= {threshold:.4f}, the F1-maximising threshold of "
             f"No Finding on {val_path.name}; {how}."),
        html_table(shown, total_label=None)])


def calibration_part(run: RunResults, dpi: int) -> str:
    """ECE and Brier per finding and pooled, before and after temperature scaling fitted on
    val_preds.csv, and the reliability diagrams."""
    val_path = run.path / "val_preds.csv"
    val = truth_and_scores(val_path, None)[:2] if val_path.is_file() else (None, None)
    cal = subgroups.calibrate(run.y_true, run.y_score, run.findings, *val)
    fig = subgroups.plot_reliability(run.y_true, run.y_score, run.findings, cal.calibrated)
    return "\n".join([
        "<h3>Calibration</h3>",
        note(f"Expected calibration error over {subgroups.N_BINS} equal-mass bins and Brier "
             f"score on the test fold; {cal.note}", warn=cal.calibrated is None),
        html_table(cal.table, total_label="pooled"),
        img_tag(figure_png(fig, dpi), "reliability diagrams",
                "Observed frequency against mean probability per equal-mass bin; dotted: "
                "perfect calibration.")])


def subgroups_section(run: RunResults, n_boot: int, seed: int, dpi: int, data: str | None) -> str:
    """Subgroup AUCs and under-diagnosis (attributes from the run's labels file, when it has
    the columns), then calibration (always)."""
    attrs, notes = subgroups.find_attributes(run.ids, subgroups.metadata_files(run.path, data))
    if attrs is None:
        parts = [note("No subgroup attributes: no labels file of this run has sex, age, view or "
                      "follow-up columns (nih_labels.csv has none; Data_Entry_2017*.csv and "
                      "CheXphoto's CSVs do). " + " ".join(notes), warn=True)]
    else:
        parts = [note(attrs.describe()), subgroup_auc_part(run, attrs, n_boot, seed),
                 underdiagnosis_part(run, attrs, n_boot, seed)]
    parts.append(calibration_part(run, dpi))
    return section("subgroups", "\n".join(parts))


def compare_section(run: RunResults, other: RunResults, n_boot: int, seed: int, dpi: int) -> str:
    """Settings that differ, both training curves, and the paired AUC comparison."""
    parts = [note(f"This run ({run.name}, A) against {other.path} (B).")]
    a_cfg, b_cfg = run.config or {}, other.config or {}
    skip = {"name", "out", "findings"}
    diff = [(k, json.dumps(a_cfg.get(k)), json.dumps(b_cfg.get(k)))
            for k in sorted((set(a_cfg) | set(b_cfg)) - skip) if a_cfg.get(k) != b_cfg.get(k)]
    parts.append("<h3>Settings that differ</h3>")
    parts.append(html_table(pd.DataFrame(diff, columns=["setting", f"A: {run.name}",
                                                        f"B: {other.name}"]),
                            total_label=None) if diff else note("none."))
    logs, names = [], []
    for tag, r in (("A", run), ("B", other)):
        try:
            logs.append(training_plots.read_log(r.path))
            names.append(f"{tag}: {r.name}")
        except (FileNotFoundError, ValueError) as err:
            parts.append(note(f"no training curves for {r.path}: {err}", warn=True))
    if logs:
        parts.append(img_tag(figure_png(training_plots.plot_runs(logs, names), dpi),
                             "training curves of both runs"))
    parts.append("<h3>Paired AUC comparison</h3>")
    try:
        pair = metrics.align_preds(run.path / "preds.csv", other.path / "preds.csv")
    except DataError as err:
        # Runs on different test images cannot be paired; their own AUCs still say something.
        parts.append(note(f"not paired: {err}", warn=True))
        a = per_label_auc(run.y_true, run.y_score, run.findings, warn=False)
        b = per_label_auc(other.y_true, other.y_score, other.findings, warn=False)
        labels = [f for f in run.findings if f in b]
        parts.append(note("Unpaired: each run's AUC on its own test images."))
        parts.append(html_table(pd.DataFrame({"finding": labels,
                                              f"A: {run.name}": [a[f] for f in labels],
                                              f"B: {other.name}": [b[f] for f in labels]}),
                                total_label=None))
        return section("compare", "\n".join(parts))
    truth = pair.y_true if pair.y_true is not None else run.y_true
    table = metrics.compare_runs(truth, pair.score_a, pair.score_b, pair.findings, n_boot, seed,
                                 patients_of(pair.ids))
    shown = pd.DataFrame({
        "finding": table["label"], f"AUC A ({run.name})": table["auc_a"],
        f"AUC B ({other.name})": table["auc_b"], "A - B": table["diff"],
        "95% CI of A - B": [metrics.format_ci(d, lo, hi).partition(" ")[2] or "n/a"
                            for d, lo, hi in zip(table["diff"], table["diff_ci_low"],
                                                 table["diff_ci_high"])],
        "DeLong p": table["delong_p"]})
    parts.append(note(f"{len(pair.ids)} test images in both runs; the interval uses the same "
                      f"{n_boot} patient resamples for both runs; DeLong's test treats images "
                      "as independent."))
    parts.append(html_table(shown, total_label=None))
    return section("compare", "\n".join(parts))


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def build_report(run_dir: str | Path, out: str | Path | None = None, n_boot: int = 1000,
                 compare_to: str | Path | None = None, seed: int = 0, top: int = 4,
                 data: str | None = None, dpi: int = 90,
                 heatmap_findings: int = HEATMAP_FINDINGS) -> Path:
    """Write the HTML report of a run folder.

    Args:
        run_dir: folder written by retrain.py (preds.csv required; config.json,
            run_record.json, log_train.csv, val_preds.csv and checkpoint.pt used when present).
        out: HTML path (default run_dir/report.html).
        n_boot: bootstrap resamples for the AUC intervals (and the comparison).
        compare_to: another run folder: adds the `compare` section.
        seed: bootstrap seed.
        top: tiles per heatmap gallery.
        data: dataset folder, if it moved since training (for the heatmaps).
        dpi: resolution of the embedded figures.
        heatmap_findings: galleries for this many of the most prevalent test findings.

    Returns:
        The path written.

    Raises:
        DataError: run_dir (or compare_to) is not a finished run folder, or a file in it
            is unreadable (the message names it).
    """
    run = read_run(run_dir)
    other = read_run(compare_to) if compare_to is not None else None
    out = Path(out) if out is not None else run.path / "report.html"
    check_writable(out)  # at once, not after minutes of bootstrap
    ci, how = auc_ci_table(run, n_boot, seed)
    sections = [config_section(run), convergence_section(run, dpi),
                aucs_section(run, ci, how, dpi), roc_section(run, ci, dpi),
                thresholds_section(run), heatmaps_section(run, top, data, heatmap_findings),
                subgroups_section(run, n_boot, seed, dpi, data)]
    if other is not None:
        sections.append(compare_section(run, other, n_boot, seed, dpi))
    ids = [s for s in SECTIONS if other is not None or s != "compare"]
    mean = ci.loc[ci["label"] == "mean"].iloc[0]
    headline = [("mean test AUC", metrics.format_ci(mean.auc, mean.ci_low, mean.ci_high)),
                ("test images", str(len(run.ids))),
                ("findings", str(len(run.findings))),
                ("dataset", str(run.dataset or "unknown"))]
    commit = ((run.record or {}).get("environment") or {}).get("git_commit")
    if commit:
        headline.append(("git commit", str(commit)[:10]))
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # No script, no fetch, no external anything: only inline CSS and data: images.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        'img-src data:; style-src \'unsafe-inline\'">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Run report: {_esc(run.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<header><h1>Run report: {_esc(run.name)}</h1>",
        note(f"{run.path} - generated {time.strftime('%Y-%m-%d %H:%M')} by report.py"),
        '<div class="headline">' + "".join(f"<div>{_esc(k)}<b>{_esc(v)}</b></div>"
                                            for k, v in headline) + "</div>",
        "<nav>" + "".join(f'<a href="#{s}">{_esc(SECTIONS[s])}</a>' for s in ids) + "</nav>",
        "</header><main>", *sections, "</main></body></html>", ""])
    try:
        save_text(page, out)
    except (OSError, SaveError) as err:
        cause = err.__cause__ if isinstance(err.__cause__, OSError) else err
        raise unwritable(out, cause) from err
    return out


def unwritable(out: Path, err: BaseException) -> DataError:
    """The report cannot be written at `out`: say where, why, and that --out moves it."""
    why = getattr(err, "strerror", None) or str(err)
    first = ("Free some space, or choose" if getattr(err, "errno", None) == errno.ENOSPC
             else "Choose")
    return DataError(f"cannot write the report {out}: {why}. {first} a writable place with "
                     "--out FILE.html (default: RUN/report.html).")


def check_writable(out: Path) -> None:
    """Create the folder of `out` and a scratch file in it, so that a read-only, full or
    mistyped place is reported before the report is computed.

    Raises:
        DataError: naming `out` and --out.
    """
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give the report's file name, e.g. "
                        f"--out {out / 'report.html'}.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe_writable(out.parent)
    except OSError as err:
        raise unwritable(out, err) from err


@command
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder written by retrain.py (results/NAME)")
    p.add_argument("--out", help="HTML file (default RUN/report.html)")
    p.add_argument("--compare-to", metavar="RUN_B", help="another run folder: adds a paired "
                   "comparison (AUC differences with bootstrap CIs and DeLong's test)")
    p.add_argument("--n-boot", type=at_least(1), default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=integer(0), default=0, help="bootstrap seed")
    p.add_argument("--top", type=at_least(1), default=4, help="tiles per heatmap gallery")
    p.add_argument("--data", help="dataset folder, if it moved since training (heatmaps)")
    args = p.parse_args(argv)
    check_outputs({"--out": args.out or Path(args.run) / "report.html"},
                  {**run_files(args.run), **run_files(args.compare_to)})
    out = build_report(args.run, args.out, args.n_boot, args.compare_to, args.seed,
                       args.top, args.data)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); open it in a browser: "
          f"file://{out.resolve()}")
    return 0
