"""Score a checkpoint trained on one label set on another dataset: NIH <-> CheXphoto.

    python cross_eval.py --checkpoint results/nih_run/checkpoint.pt --dataset chexphoto \\
        --data /data/CheXphoto-v1.1 [--fold test] [--out cross.csv]
    python cross_eval.py --checkpoint results/photo/checkpoint.pt --dataset nih --data /data/nih

An NIH model predicts 14 findings, a CheXphoto model 13 CheXpert observations; seven are the same
finding under two names (labels.NIH_TO_CHEXPERT, e.g. NIH `Effusion` = CheXpert `Pleural
Effusion`). Only those are scored. Mass and Nodule are not merged into Lung Lesion: they map
onto it only loosely (docs/datasets.md), and a max or a sum of two outputs would be a new, untrained
score. Every finding left out is printed with the reason. A model scored on its own label set
(e.g. an NIH model on the demo data) uses every finding both sides have.

The target dataset is read exactly as retrain.py reads it (same folds for the same --seed; for
CheXphoto with train.csv, the test fold is valid.csv). AUCs come with a patient-level bootstrap
95% interval (metrics.bootstrap_auc).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from chexnet.files import check_outputs
from chexnet.cli import at_least, command, device_arg, integer
from chexnet.config import DATASETS, TrainConfig
from chexnet.loaders import load_tables
from chexnet.runs import pick_device
from chexnet.analysis import cam
from chexnet.data import ImageFileDataset, DataError, model_input, reference_geometry
from chexnet.scoring import per_label_auc
from chexnet.labels import CHEXPERT_OBSERVATIONS, NIH_FINDINGS, NIH_TO_CHEXPERT
from chexnet.analysis.metrics import bootstrap_auc

CHEXPERT_TO_NIH = {v: k for k, v in NIH_TO_CHEXPERT.items()}
FOLDS = ("train", "val", "test", "all")
LOOSE = {"Mass": "Lung Lesion", "Nodule": "Lung Lesion"}  # docs/datasets.md: not merged


def _family(names: Sequence[str]) -> str:
    """'CheXpert' when any name is CheXpert-only, else 'NIH' (seven names are in both)."""
    return "CheXpert" if set(names) & (set(CHEXPERT_OBSERVATIONS) - set(NIH_FINDINGS)) else "NIH"


def _no_counterpart(name: str, other: str) -> str:
    """Why finding `name` has no counterpart in the `other` label set."""
    if name in LOOSE:
        return (f"no {other} counterpart: maps only loosely onto {LOOSE[name]} and is not "
                "merged into it (docs/datasets.md)")
    if name == "Lung Lesion":
        return ("no NIH counterpart: Mass and Nodule map only loosely onto it and are not "
                "merged (docs/datasets.md)")
    return f"no {other} counterpart"


def finding_pairs(source: Sequence[str], target: Sequence[str]
                  ) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """Match a model's outputs to a dataset's label columns.

    A source finding pairs with the target column of the same name, else with its
    NIH_TO_CHEXPERT counterpart (either direction).

    Args:
        source: the model's findings, in output order.
        target: the dataset's findings.

    Returns:
        (pairs [(source finding, target finding)] in source order,
         left out [(finding, 'model' | 'dataset', reason)]).
    """
    target_set = set(target)
    pairs: list[tuple[str, str]] = []
    left: list[tuple[str, str, str]] = []
    target_family = _family(target)
    for f in source:
        counterpart = next((c for c in (f, NIH_TO_CHEXPERT.get(f), CHEXPERT_TO_NIH.get(f))
                            if c is not None and c in target_set), None)
        if counterpart is not None:
            pairs.append((f, counterpart))
        elif NIH_TO_CHEXPERT.get(f) or CHEXPERT_TO_NIH.get(f):
            left.append((f, "model", "the dataset has no column "
                         f"{NIH_TO_CHEXPERT.get(f) or CHEXPERT_TO_NIH.get(f)!r}"))
        else:
            left.append((f, "model", _no_counterpart(f, target_family)))
    used = {t for _, t in pairs}
    source_family = _family(source)
    for t in target:
        if t in used:
            continue
        if t in set(source) or NIH_TO_CHEXPERT.get(t) or CHEXPERT_TO_NIH.get(t):
            left.append((t, "dataset", "the model does not predict it"))
        else:
            left.append((t, "dataset", _no_counterpart(t, source_family)))
    return pairs, left


@torch.inference_mode()
def predict_table(model: nn.Module, table: pd.DataFrame, findings: Sequence[str],
                  image_size: int, batch_size: int = 64, device: str | torch.device = "cpu",
                  workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of every model output over the rows of a label table.

    Args:
        model: returns (B, K_model) logits for (B, 3, S, S) images.
        table: rows with `path` and one column per target finding.
        findings: the target finding columns to return as ground truth.
        image_size: S, the model's input size.

    Returns:
        (probabilities (N, K_model), targets (N, len(findings)) with NaN = masked), in row order.
    """
    ds = ImageFileDataset.from_table(table, findings, None, reference_geometry(image_size))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers)
    device = torch.device(device)
    model = model.to(device).eval()
    probs, targets = [], []
    for images, target, _ in loader:
        probs.append(torch.sigmoid(model(model_input(images, device)).float()).cpu().numpy())
        targets.append(target.numpy())
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros((0, len(findings)), np.float32)
    return np.concatenate(probs), np.concatenate(targets)


def cross_evaluate(model: nn.Module, model_findings: Sequence[str], image_size: int,
                   table: pd.DataFrame, target_findings: Sequence[str], fold: str = "test",
                   n_boot: int = 1000, seed: int = 0, device: str | torch.device = "cpu",
                   batch_size: int = 64, workers: int = 0
                   ) -> tuple[pd.DataFrame, list[tuple[str, str, str]]]:
    """Per-finding AUC of a model on another dataset's fold, on the findings both share.

    Args:
        model: returns logits over `model_findings`.
        model_findings: names of its outputs, in order.
        image_size: its input size.
        table: the target dataset's label table (`fold`, `path`, `patient`, finding columns).
        target_findings: the target's finding columns.
        fold: train | val | test | all.
        n_boot: bootstrap replicates for the 95% interval (patient level); 0 for none.
        seed: bootstrap seed.

    Returns:
        (table: model_finding, dataset_finding, auc, ci_low, ci_high, n_pos, n_neg, with a
         `mean` row; left-out findings [(finding, side, reason)]).

    Raises:
        DataError: no shared finding, unknown or empty fold.
    """
    if fold not in FOLDS:
        raise DataError(f"--fold {fold!r}: expected one of {FOLDS}")
    pairs, left = finding_pairs(model_findings, target_findings)
    if not pairs:
        raise DataError(f"the model's findings ({', '.join(model_findings)}) share none with "
                        f"the dataset's ({', '.join(target_findings)}).")
    rows = table if fold == "all" else table[table["fold"] == fold]
    if rows.empty:
        raise DataError(f"the {fold} fold of the dataset is empty ({len(table)} images in all).")
    src = [s for s, _ in pairs]
    tgt = [t for _, t in pairs]
    probs, targets = predict_table(model, rows, tgt, image_size, batch_size, device, workers)
    if probs.shape[1] != len(model_findings):
        raise DataError(f"the model returned {probs.shape[1]} outputs for "
                        f"{len(model_findings)} findings.")
    scores = probs[:, [list(model_findings).index(s) for s in src]]       # (N, P)
    labels = [f"{s} -> {t}" if s != t else s for s, t in pairs]
    if n_boot > 0:
        result = bootstrap_auc(targets, scores, n_boot=n_boot, seed=seed,
                               groups=rows["patient"].to_numpy(), findings=labels,
                               with_mean=True)
    else:
        aucs = per_label_auc(targets, scores, labels, warn=False)
        result = pd.DataFrame({"label": labels, "auc": list(aucs.values()),
                               "ci_low": math.nan, "ci_high": math.nan,
                               "n_pos": (targets == 1).sum(0), "n_neg": (targets == 0).sum(0)})
        defined = result["auc"].notna()
        result = pd.concat([result, pd.DataFrame([{
            "label": "mean", "auc": result.loc[defined, "auc"].mean() if defined.any()
            else math.nan, "ci_low": math.nan, "ci_high": math.nan,
            "n_pos": int(result["n_pos"].sum()), "n_neg": int(result["n_neg"].sum())}])],
            ignore_index=True)
    result.insert(0, "model_finding", src + ["mean"])
    result.insert(1, "dataset_finding", tgt + ["mean"])
    return result.drop(columns=["label"]), left


def load_target(dataset: str, data: str, labels: str | None = None, seed: int = 0,
                uncertainty: str = "zeros", source: str = "all", view: str = "frontal",
                missing: str = "error") -> tuple[pd.DataFrame, list[str]]:
    """The target dataset's label table and findings, read as retrain.py reads it."""
    cfg = TrainConfig(dataset=dataset, data=data, labels=labels, seed=seed,
                               uncertainty=uncertainty, source=source, view=view,
                               missing=missing)
    labels, _ = load_tables(cfg)
    table, findings = labels.frame, list(labels.findings)
    return table, list(findings)


@command
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by retrain.py")
    p.add_argument("--dataset", required=True, choices=DATASETS,
                   help="the dataset to score on")
    p.add_argument("--data", required=True, help="its root folder")
    p.add_argument("--fold", choices=FOLDS, default="test")
    p.add_argument("--out", help="CSV of per-finding AUCs (default: cross_<dataset>.csv next "
                   "to the checkpoint)")
    p.add_argument("--labels", help="NIH labels file (as retrain.py --labels)")
    p.add_argument("--seed", type=integer(0), default=0, help="split seed (as retrain.py --seed)")
    p.add_argument("--uncertainty", choices=("zeros", "ones", "ignore"), default="zeros",
                   help="CheXphoto uncertain labels (valid.csv has none)")
    p.add_argument("--source", default="all",
                   choices=("all", "natural", "synthetic", "digital", "photographic"))
    p.add_argument("--view", default="frontal", choices=("frontal", "lateral", "all"))
    p.add_argument("--missing", choices=("error", "skip"), default="error")
    p.add_argument("--n-boot", type=integer(0), default=1000,
                   help="bootstrap replicates (0: no CI)")
    p.add_argument("--device", type=device_arg, default="auto")
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.add_argument("--workers", type=integer(0), default=0)
    args = p.parse_args(argv)
    check_outputs({"--out": args.out}, {"--checkpoint": args.checkpoint, "--labels": args.labels})
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise DataError(f"{checkpoint}: checkpoint not found.")
    model, model_findings, size, _ = cam.load_trained_model(checkpoint)
    table, target_findings = load_target(args.dataset, args.data, args.labels, args.seed,
                                         args.uncertainty, args.source, args.view,
                                         args.missing)
    result, left = cross_evaluate(model, model_findings, size, table, target_findings,
                                  args.fold, args.n_boot, args.seed,
                                  pick_device(args.device), args.batch_size,
                                  args.workers)
    n_rows = len(table) if args.fold == "all" else int((table["fold"] == args.fold).sum())
    pairs = result[result["model_finding"] != "mean"]
    print(f"{checkpoint} ({len(model_findings)} findings) on {args.dataset} {args.data}, "
          f"{args.fold} fold ({n_rows} images)")
    print(f"used {len(pairs)} findings (model -> dataset): " + ", ".join(
        f"{s} -> {t}" for s, t in zip(pairs["model_finding"], pairs["dataset_finding"])))
    print(f"left out {len(left)}:")
    for name, side, reason in left:
        print(f"  {name} ({'model output' if side == 'model' else 'dataset label'}): {reason}")
    print(result.to_string(index=False, na_rep="n/a", float_format=lambda v: f"{v:.4f}"))
    out = Path(args.out) if args.out else checkpoint.with_name(f"cross_{args.dataset}.csv")
    result.to_csv(out, index=False)
    print(f"wrote {out}")
    return 0
