"""Score predictions: per-label ROC AUC, alone or against a labels file.

    python eval_model.py --preds results/demo/preds.csv
    python eval_model.py --preds results/demo/preds.csv --ci --roc roc.png --thresholds
    python eval_model.py --preds results/nih/preds.csv --compare results/photo_on_nih/preds.csv
    python eval_model.py --preds pretrained/preds.csv --labels nih_labels.csv --out aucs.csv
    python eval_model.py --preds results/nih/preds.csv --compare pretrained/preds.csv

pretrained/preds.csv is reproduce-chexnet's published test predictions (fetched once by
`python fetch_reference.py`); nih_labels.csv holds the 2020 labels they were scored on.

A predictions file has an id column (`Image Index` for NIH, `Path` for CheXphoto) and one
`prob_<Finding>` column per finding, as reproduce-chexnet writes; this project's `preds.csv`
also carries the ground truth (a `<Finding>` column each), so it can be re-scored alone.

--ci adds 95% bootstrap confidence intervals (1,000 resamples of patients where the image
ids name them: NIH `NNNNNNNN_NNN.png`, CheXphoto `.../patientNNNNN/...`; else of images).
--thresholds reports F1, precision, recall and specificity at 0.5 and at Youden's threshold
chosen on the validation predictions (`val_preds.csv` next to --preds, written by
retrain.py): the test fold never chooses a threshold. --compare B.csv is a paired comparison
of two runs on the same images: AUC difference with its bootstrap CI and DeLong's test, per
finding and for the mean AUC (the same resamples), and a verdict on each: REPRODUCED when the
95% CI of the difference lies within +-M (--margin, default 0.01), DIFFERENT when it excludes
0 and reaches past M, INCONCLUSIVE otherwise. This is equivalence by CI inclusion (TOST at the
CI level); M is a choice to state with the result, not a property of the data.

--by sex,age,view,followup: subgroup AUCs with patient-bootstrap CIs and the gap of each
subgroup to the rest of the test fold (same resamples for both sides), written to
subgroups.csv beside --out; the attributes come from --labels (Data_Entry_2017*.csv or a
CheXpert-schema CSV), else from the run folder's config.json. It also reports under-diagnosis
(the false-positive rate of "No Finding" per subgroup) at the F1-maximising threshold chosen on
the validation predictions (underdiagnosis.csv). --calibration: ECE (equal-mass bins), Brier
score and reliability diagrams, and temperature scaling fitted on the validation predictions,
written to preds_calibrated.csv next to --preds. Neither ever fits anything on the test fold;
without validation predictions --nofinding-rate sets a labelled fallback threshold.
"""
from __future__ import annotations

import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from chexnet.files import check_outputs
from chexnet.cli import FRACTION, at_least, command, integer, number
from chexnet.analysis import metrics, subgroups
from chexnet.data import DataError
from chexnet.scoring import (
    PROB_PREFIX, format_auc_table, patients_of, read_preds, score, truth_and_scores,
)


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preds", required=True, help="predictions CSV (prob_<Finding> columns)")
    parser.add_argument("--labels", help="labels file: nih_labels.csv, Data_Entry_2017*.csv(.gz) "
                        "or a CheXpert-schema CSV; default: the ground truth inside --preds")
    parser.add_argument("--out", help="where to write the AUC table (default: aucs.csv next to "
                        "--preds; --ci adds <name>_ci.csv beside it)")
    parser.add_argument("--no-published", action="store_true", help="leave out the published "
                        "NIH columns (e.g. for the synthetic demo, where they mean nothing)")
    parser.add_argument("--ci", action="store_true", help="95%% bootstrap confidence intervals")
    parser.add_argument("--n-boot", type=at_least(1), default=1000)
    parser.add_argument("--seed", type=integer(0), default=0)
    parser.add_argument("--roc", metavar="PNG", help="write ROC curves per finding to PNG")
    parser.add_argument("--thresholds", action="store_true", help="F1/precision/recall/"
                        "specificity at 0.5 and at Youden's threshold chosen on --val-preds")
    parser.add_argument("--val-preds", help="validation predictions for --thresholds (default: "
                        "val_preds.csv next to --preds)")
    parser.add_argument("--compare", metavar="PREDS_B", help="paired comparison with another "
                        "run's predictions on the same images (diff = A - B), with a "
                        "reproduction verdict on the mean AUC")
    parser.add_argument("--margin", type=number(0, 0.5, low_open=True), metavar="M",
                        default=metrics.DEFAULT_MARGIN, help="--compare's equivalence margin "
                        "in AUC (default %(default)g): REPRODUCED when the 95%% CI of the "
                        "difference lies within +-M")
    parser.add_argument("--by", metavar="ATTRS", help="subgroup AUCs and under-diagnosis by "
                        "these comma-separated attributes: sex, age, view, followup (or all)")
    parser.add_argument("--age-bands", default="0,20,40,60,80", metavar="EDGES",
                        help="age band edges for --by age (default 0,20,40,60,80: 0-19 ... 80+)")
    parser.add_argument("--followup-bands", default="0,1,5,10,20", metavar="EDGES",
                        help="follow-up number band edges for --by followup (default 0,1,5,10,20)")
    parser.add_argument("--nofinding-rate", type=FRACTION, metavar="FRACTION",
                        help="without validation predictions: call this fraction of the test "
                        "images normal for the under-diagnosis rates (a threshold set on the test "
                        "scores, reported as such), e.g. the training fold's No Finding rate")
    parser.add_argument("--calibration", action="store_true", help="ECE, Brier score, "
                        "reliability diagrams; temperature scaling fitted on --val-preds, "
                        "written to preds_calibrated.csv")
    args = parser.parse_args(argv)
    check_outputs(output_paths(args), input_paths(args))
    return _run(args)


def output_paths(args: argparse.Namespace) -> dict[str, Path | None]:
    """Every file this command line writes, by the option that makes it (checked by
    files.check_outputs before anything is read)."""
    folder = Path(args.preds).parent
    aucs = Path(args.out) if args.out else folder / "aucs.csv"
    beside = {"thresholds": ["thresholds.csv"], "compare": ["compare.csv"],
              "calibration": ["calibration.csv", "reliability.png", "preds_calibrated.csv"]}
    paths = {"--out": aucs, "--roc": Path(args.roc) if args.roc else None}
    if args.ci:
        paths["--out (its _ci.csv)"] = aucs.with_name(aucs.stem + "_ci.csv")
    for flag, names in beside.items():
        if getattr(args, flag):
            paths.update({f"--{flag} ({name})": folder / name for name in names})
    if args.by:
        paths.update({f"--by ({name})": aucs.parent / name
                      for name in ("subgroups.csv", "underdiagnosis.csv")})
    return paths


def input_paths(args: argparse.Namespace) -> dict[str, str | Path | None]:
    uses_validation = args.thresholds or args.by or args.calibration
    val = args.val_preds or (Path(args.preds).parent / "val_preds.csv" if uses_validation
                             else None)
    return {"--preds": args.preds, "--labels": args.labels, "--val-preds": val,
            "--compare": args.compare}


def _run(args: argparse.Namespace) -> int:
    preds_path = Path(args.preds)
    folder = preds_path.parent
    y_true, y_score, findings, ids = truth_and_scores(preds_path, args.labels)
    # Every input is checked before any file is written: a failing --compare must not leave
    # a fresh aucs.csv behind as if the command had worked.
    pair = metrics.align_preds(preds_path, args.compare) if args.compare else None
    groups = patients_of(ids)
    table, n = score(preds_path, args.labels, published=not args.no_published)
    print(f"AUC on {n} images ({args.preds}):")
    print(format_auc_table(table))
    if "CheXNet paper" in table.columns:
        print("Published columns are on their own test splits; differences of 0.01 are within "
              "split-to-split variation.")
    out = Path(args.out) if args.out else folder / "aucs.csv"
    table.to_csv(out, index=False)
    print(f"wrote {out}")
    if args.ci:
        unit = "patients" if groups is not None else "images (ids name no patients)"
        ci = metrics.bootstrap_auc(y_true, y_score, args.n_boot, args.seed, groups,
                                   findings=findings, with_mean=True)
        print(f"\n95% bootstrap CIs ({args.n_boot} resamples of {unit}, seed {args.seed}):")
        print(metrics.format_ci_table(ci))
        ci_out = out.with_name(out.stem + "_ci.csv")
        ci.to_csv(ci_out, index=False)
        print(f"wrote {ci_out}")
    if args.roc:
        curves = metrics.roc_curves(y_true, y_score, findings)
        aucs = table.set_index("label")["auc"].to_dict()
        metrics.plot_roc(curves, aucs, args.roc)
        print(f"wrote {args.roc}")
    if args.thresholds:
        val_path = Path(args.val_preds) if args.val_preds else folder / "val_preds.csv"
        if not val_path.is_file():
            raise DataError(f"{val_path}: validation predictions not found. Thresholds are "
                            "chosen on the validation fold, never on test: pass --val-preds.")
        v_true, v_score, v_findings, _ = truth_and_scores(val_path, args.labels)
        if v_findings != findings:
            raise DataError(f"{val_path}: findings differ from {preds_path}.")
        report = metrics.threshold_report(v_true, v_score, y_true, y_score, findings)
        print("\nThreshold metrics on the test predictions (Youden threshold chosen on "
              f"{val_path.name}):")
        print(metrics.format_ci_table(report))
        report.to_csv(folder / "thresholds.csv", index=False)
        print(f"wrote {folder / 'thresholds.csv'}")
    if pair is not None:
        truth = pair.y_true if pair.y_true is not None else y_true
        cmp = metrics.compare_runs(truth, pair.score_a, pair.score_b, pair.findings,
                                   args.n_boot, args.seed, patients_of(pair.ids),
                                   margin=args.margin)
        print(f"\nPaired comparison on {len(pair.ids)} images, diff = AUC of A ({args.preds}) "
              f"minus AUC of B ({args.compare}); DeLong's test for correlated ROC curves:")
        print(metrics.format_ci_table(cmp))
        print(verdict_line(cmp, args.margin))
        cmp.to_csv(folder / "compare.csv", index=False)
        print(f"wrote {folder / 'compare.csv'}")
    validation = _validation(args, folder, findings) if args.by or args.calibration else None
    if args.by:
        _subgroup_outputs(args, out.parent, y_true, y_score, findings, ids, groups, validation)
    if args.calibration:
        _calibration_outputs(args, y_true, y_score, findings, validation)
    return 0


def _validation(args: argparse.Namespace, folder: Path, findings: list[str]
                ) -> tuple[np.ndarray, np.ndarray, Path] | None:
    """(y_true, y_score, path) of the validation predictions (--val-preds, else val_preds.csv
    next to --preds), or None when there are none."""
    val_path = Path(args.val_preds) if args.val_preds else folder / "val_preds.csv"
    if not val_path.is_file():
        return None
    v_true, v_score, v_findings, _ = truth_and_scores(val_path, args.labels)
    if v_findings != findings:
        raise DataError(f"{val_path}: findings differ from {args.preds}.")
    return v_true, v_score, val_path


def verdict_line(cmp: pd.DataFrame, margin: float) -> str:
    """The one-line answer to "is A's mean AUC B's?", from compare_runs' `mean` row."""
    mean = cmp.set_index("label").loc["mean"]
    interval = (f"[{mean['diff_ci_low']:+.4f}, {mean['diff_ci_high']:+.4f}]"
                if mean["verdict"] != "n/a" else "undefined")
    why = {metrics.REPRODUCED: f"lies within +-{margin:g}",
           metrics.DIFFERENT: f"excludes 0 and reaches past +-{margin:g}",
           metrics.INCONCLUSIVE: f"holds 0 and reaches past +-{margin:g}: too few images "
                                 "to tell"}.get(mean["verdict"], "cannot be judged")
    return (f"{mean['verdict']}: mean AUC {mean['auc_a']:.4f} (A) vs {mean['auc_b']:.4f} (B), "
            f"difference {mean['diff']:+.4f}, 95% CI {interval} {why} (equivalence by CI "
            f"inclusion, i.e. TOST at the CI level, margin {margin:g} chosen by --margin).")


def _subgroup_outputs(args: argparse.Namespace, out_dir: Path, y_true: np.ndarray,
                      y_score: np.ndarray, findings: list[str], ids: list[str],
                      groups: np.ndarray | None, validation: tuple | None) -> None:
    """--by: subgroups.csv and underdiagnosis.csv in out_dir, both printed."""

    wanted = (list(subgroups.ATTRIBUTES) if args.by == "all"
              else [a.strip() for a in args.by.split(",") if a.strip()])
    unknown = [a for a in wanted if a not in subgroups.ATTRIBUTES]
    if unknown or not wanted:
        raise DataError(f"--by {args.by}: unknown attribute(s) {unknown}; choose from "
                        f"{', '.join(subgroups.ATTRIBUTES)} (comma-separated) or all.")
    edges = (subgroups.parse_edges(args.age_bands, "--age-bands"),
             subgroups.parse_edges(args.followup_bands, "--followup-bands"))
    candidates = ([[Path(args.labels)]] if args.labels
                  else subgroups.metadata_files(Path(args.preds).parent))
    attrs, notes = subgroups.find_attributes(ids, candidates, *edges)
    if attrs is None:
        raise DataError("--by needs subgroup columns (Patient Gender, Patient Age, View "
                        "Position, Follow-up # or Sex, Age, AP/PA): pass --labels with a "
                        "Data_Entry_2017*.csv or a CheXpert-schema CSV. "
                        + " ".join(notes))
    print(f"\n{attrs.describe()}")
    absent = [a for a in wanted if a not in attrs.available]
    if absent:
        print(f"left out (not in {attrs.source}): {', '.join(absent)}", file=sys.stderr)
    present = [a for a in wanted if a in attrs.available]
    if not present:
        raise DataError(f"{attrs.source}: none of --by {args.by} is available.")
    units = groups if groups is not None else attrs.patients
    table = subgroups.subgroup_auc(y_true, y_score, attrs.table[present], units, findings,
                                   args.n_boot, args.seed, progress=True)
    unit = "patients" if units is not None else "images"
    print(f"Mean AUC per subgroup, gap = subgroup minus the rest of the test fold, 95% CIs "
          f"from the same {args.n_boot} resamples of {unit} (seed {args.seed}):")
    print(subgroups.format_subgroups(table))
    table.to_csv(out_dir / "subgroups.csv", index=False)
    print(f"wrote {out_dir / 'subgroups.csv'} (every finding)")
    _underdiagnosis_output(args, out_dir, y_true, y_score, findings, attrs.table[present], units,
                           validation)


def _underdiagnosis_output(args: argparse.Namespace, out_dir: Path, y_true: np.ndarray,
                           y_score: np.ndarray, findings: list[str], attributes: pd.DataFrame,
                           units: np.ndarray | None, validation: tuple | None) -> None:
    """--by: underdiagnosis.csv at the validation F1 threshold (or --nofinding-rate's)."""

    truth, score, how = subgroups.no_finding(y_true, y_score, findings)
    if validation is not None:
        v_truth, v_score, _ = subgroups.no_finding(validation[0], validation[1], findings)
        threshold = subgroups.f1_threshold(v_truth, v_score)
        rule = f"the F1-maximising threshold on {validation[2].name} (validation fold)"
    elif args.nofinding_rate is not None:
        threshold = subgroups.rate_threshold(score, args.nofinding_rate)
        rule = (f"NO VALIDATION PREDICTIONS: a threshold set on the TEST fold's scores (not its "
                f"labels) so that {args.nofinding_rate:.1%} of the images are called normal "
                "(--nofinding-rate); compare subgroups with it, not the absolute rate")
    else:
        print("\nunder-diagnosis: skipped. Its threshold is chosen on validation predictions "
              "(val_preds.csv next to --preds, or --val-preds), never on the test fold; "
              "--nofinding-rate sets a labelled fallback.", file=sys.stderr)
        return
    if not np.isfinite(threshold):
        print("\nunder-diagnosis: skipped, the validation fold has one No Finding class.",
              file=sys.stderr)
        return
    under = subgroups.underdiagnosis(truth, score, threshold, attributes, units, args.n_boot,
                                     args.seed)
    print(f"\nUnder-diagnosis: images with a finding that the model calls 'No Finding' "
          f"(score >= {threshold:.4f}, {rule}; {how}):")
    print(subgroups.format_underdiagnosis(under))
    under.to_csv(out_dir / "underdiagnosis.csv", index=False)
    print(f"wrote {out_dir / 'underdiagnosis.csv'}")


def _calibration_outputs(args: argparse.Namespace, y_true: np.ndarray, y_score: np.ndarray,
                         findings: list[str], validation: tuple | None) -> None:
    """--calibration: calibration.csv and reliability.png next to --preds, and
    preds_calibrated.csv when validation predictions fit the temperatures."""

    folder = Path(args.preds).parent
    cal = subgroups.calibrate(y_true, y_score, findings, *(validation[:2] if validation
                                                            else (None, None)))
    print(f"\nCalibration of the test predictions (ECE: {subgroups.N_BINS} equal-mass bins); "
          + cal.note)
    print(format_auc_table(cal.table))
    cal.table.to_csv(folder / "calibration.csv", index=False)
    subgroups.plot_reliability(y_true, y_score, findings, cal.calibrated,
                               out_png=folder / "reliability.png")
    print(f"wrote {folder / 'calibration.csv'} and {folder / 'reliability.png'}")
    if cal.calibrated is not None:
        preds, _, _ = read_preds(args.preds)
        for j, f in enumerate(findings):
            preds[PROB_PREFIX + f] = cal.calibrated[:, j]
        preds.to_csv(folder / "preds_calibrated.csv", index=False)
        print(f"wrote {folder / 'preds_calibrated.csv'} (temperature-scaled; AUCs unchanged)")


if __name__ == "__main__":
    sys.exit(main())
