"""How much a trained model's test AUC suffers from photo-like corruptions
(chexnet/datatools/corruptions.py).

    python photo_corruptions.py --run results/NAME [--kinds blur jpeg ...] \\
        [--severities 1 3 5] --out robustness.csv [--plot robustness.png]

Re-scores a run's checkpoint on its test fold with each corruption applied to the image before
the standard Resize + CenterCrop + normalisation, and writes, per corruption and severity, each
finding's AUC, the clean AUC and the drop, plus a `mean` row.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from chexnet.files import check_outputs, run_files
from chexnet.cli import at_least, command, device_arg, integer
from chexnet.analysis import cam
from chexnet.analysis import heatmaps
from chexnet import train as training
from chexnet.runs import pick_device, run_test_table
from chexnet.datatools.corruptions import CLEAN, KINDS, SEVERITIES, corrupt, image_rng
from chexnet.data import ImageFileDataset, DataError, load_xray, reference_geometry
from chexnet.scoring import per_label_auc


class CorruptedDataset(ImageFileDataset):
    """An ImageFileDataset whose images are corrupted (as PIL L) before the transform."""

    def __init__(self, base: ImageFileDataset, kind: str, severity: int, seed: int = 0):
        super().__init__(base.paths, base.targets.numpy(), base.image_ids, base.findings,
                         base.transform)
        if kind != CLEAN and kind not in KINDS:
            raise ValueError(f"unknown corruption {kind!r}: expected one of {KINDS}")
        self.kind, self.severity, self.seed = kind, severity, seed

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        gray = load_xray(self.paths[i])
        if self.kind != CLEAN:
            gray = corrupt(gray, self.kind, self.severity,
                           image_rng(self.seed, self.kind, self.severity, self.image_ids[i]))
        return self.transform(gray), self.targets[i], self.image_ids[i]


def robustness(run_dir: str | Path, kinds: Sequence[str] = KINDS,
               severities: Sequence[int] = (1, 3, 5), seed: int = 0, device: str = "auto",
               max_images: int | None = None, data: str | None = None, workers: int = 0,
               batch_size: int = 64) -> pd.DataFrame:
    """AUCs of a run's checkpoint on its test fold, clean and under each corruption.

    Args:
        run_dir: folder written by retrain.py.
        kinds: corruptions (KINDS).
        severities: severities 1-5 to apply.
        seed: corruption seed.
        device: auto | cpu | cuda.
        max_images: score only the first N test images (the same ones for every corruption).
        data: dataset folder, if it moved since training.
        workers: data loader processes.
        batch_size: images per forward pass.

    Returns:
        Long table: corruption, severity, label (each finding, then `mean`), auc, clean_auc,
        drop (= clean_auc - auc); the clean rows have corruption `clean`, severity 0.
        The mean is over the findings with a defined clean AUC.

    Raises:
        DataError: unusable run folder or data, unknown kinds or severities.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise DataError(f"unknown corruption(s) {unknown}: expected {', '.join(KINDS)}")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise DataError(f"severities {bad}: expected integers 1 to 5")
    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        raise DataError(f"{checkpoint}: not found; --run takes a folder written by retrain.py.")
    model, findings, size, _ = cam.load_trained_model(checkpoint)
    cfg, test = run_test_table(run_dir, data)
    if test.empty:
        raise DataError(f"{run_dir / 'config.json'}: the recorded dataset has no test fold.")
    if max_images is not None:
        test = test.iloc[:max_images]
    base = ImageFileDataset.from_table(test.reset_index(), findings, None,
                                 reference_geometry(size))
    dev = pick_device(device)
    model = model.to(dev)
    rows: list[dict] = []
    clean: dict[str, float] = {}
    plan = [(CLEAN, 0)] + [(k, s) for k in kinds for s in severities]
    for kind, severity in plan:
        loader = DataLoader(CorruptedDataset(base, kind, severity, seed), batch_size=batch_size,
                            num_workers=workers)
        _, probs, targets, _ = training.evaluate(model, loader, dev,
                                                desc=f"{kind} {severity}")
        aucs = per_label_auc(targets, probs, findings, warn=kind == CLEAN)
        if kind == CLEAN:
            clean = aucs
        for f in findings:
            rows.append({"corruption": kind, "severity": severity, "label": f, "auc": aucs[f],
                         "clean_auc": clean[f]})
        defined = [f for f in findings if not math.isnan(clean[f])]
        rows.append({"corruption": kind, "severity": severity, "label": "mean",
                     "auc": float(np.mean([aucs[f] for f in defined])) if defined else math.nan,
                     "clean_auc": float(np.mean([clean[f] for f in defined])) if defined
                     else math.nan})
        print(f"{kind:>20s} {severity}: mean AUC {rows[-1]['auc']:.4f}", flush=True)
    table = pd.DataFrame(rows)
    table["drop"] = table["clean_auc"] - table["auc"]
    return table


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean AUC and its drop per corruption x severity (the `mean` rows, one row each)."""
    means = table[table["label"] == "mean"]
    return means[["corruption", "severity", "auc", "drop"]].rename(
        columns={"auc": "mean_auc"}).reset_index(drop=True)


def plot_robustness(table: pd.DataFrame, out: str | Path) -> Path:
    """Lines of mean AUC against severity, one per corruption, starting from the clean AUC."""
    plt = heatmaps._pyplot()
    means = table[table["label"] == "mean"]
    clean = float(means.loc[means["corruption"] == CLEAN, "auc"].iloc[0])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind in [k for k in KINDS if k in set(means["corruption"])]:
        part = means[means["corruption"] == kind].sort_values("severity")
        ax.plot([0] + part["severity"].tolist(), [clean] + part["auc"].tolist(), marker="o",
                label=kind)
    ax.axhline(clean, color="gray", linestyle=":", linewidth=1, label="clean")
    ax.axhline(0.5, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("mean AUC over findings")
    ax.set_xticks(range(6))
    ax.legend(fontsize=8)
    ax.set_title("Test-fold AUC under photo-like corruptions", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@command
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder written by retrain.py")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), metavar="KIND",
                   help=f"corruptions (default all): {' '.join(KINDS)}")
    p.add_argument("--severities", nargs="+", type=integer(1, 5), default=[1, 3, 5])
    p.add_argument("--out", default="robustness.csv", help="CSV, one row per corruption x "
                   "severity x finding (+ mean)")
    p.add_argument("--plot", help="PNG of mean AUC against severity")
    p.add_argument("--seed", type=integer(0), default=0)
    p.add_argument("--device", type=device_arg, default="auto")
    p.add_argument("--max-images", type=at_least(1), help="score only the first N test images")
    p.add_argument("--data", help="dataset folder, if it moved since training")
    p.add_argument("--workers", type=integer(0), default=0)
    args = p.parse_args(argv)
    check_outputs({"--out": args.out, "--plot": args.plot}, run_files(args.run))
    table = robustness(args.run, args.kinds, args.severities, args.seed, args.device,
                       args.max_images, args.data, args.workers)
    table.to_csv(args.out, index=False)
    print(summary_table(table).to_string(index=False, na_rep="n/a",
                                         float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {plot_robustness(table, args.plot)}")
    return 0
