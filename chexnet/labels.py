"""One home for every label list and dataset schema in the project.

Everything else imports from here: if a finding is renamed or a column moves, this is the
only file to change.
"""
from __future__ import annotations

# The 14 NIH ChestX-ray14 findings, in the order CheXNet and reproduce-chexnet use
# (model output index i is NIH_FINDINGS[i]).
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)

# NIH `Data_Entry_2017*.csv` columns. The last two headers contain commas in the real file,
# so pandas reads them as two extra, oddly named columns; only these matter to us.
NIH_IMAGE_COL = "Image Index"
NIH_FINDINGS_COL = "Finding Labels"
NIH_PATIENT_COL = "Patient ID"
NIH_NO_FINDING = "No Finding"
# The metadata columns reproduce-chexnet's nih_labels.csv carries beside the findings (from
# Data_Entry_2017*.csv), in that file's order around `Patient ID`: they give eval_model.py --by
# its subgroups without another file.
NIH_METADATA_COLS = ("Follow-up #", "Patient Age", "Patient Gender", "View Position")
NIH_ENTRY_REQUIRED = (NIH_IMAGE_COL, NIH_FINDINGS_COL, NIH_PATIENT_COL)

# `BBox_List_2017.csv` spells one finding differently from Data_Entry.
NIH_BBOX_ALIASES = {"Infiltrate": "Infiltration"}

# Folds as stored in the `fold` column of nih_labels.csv (reproduce-chexnet's scheme).
FOLDS: tuple[str, ...] = ("train", "val", "test")
FOLD_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}

# CheXpert / CheXphoto observations, in the CSV's column order.
CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
# The 13 findings the CheXphoto fork trained on: every observation but "No Finding".
CHEXPHOTO_FINDINGS: tuple[str, ...] = tuple(o for o in CHEXPERT_OBSERVATIONS if o != "No Finding")
CHEXPERT_META_COLS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")

# CheXpert label values: 1 positive, 0 negative, -1 uncertain, blank (NaN) not mentioned.
UNCERTAINTY_POLICIES = ("zeros", "ones", "ignore")

# NIH name -> CheXpert name, for the seven findings both label sets share (docs/datasets.md).
# Mass and Nodule map only loosely onto "Lung Lesion" and are deliberately left out.
NIH_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}

# Published per-label test AUCs (docs/datasets.md). Each used its own test split.
PUBLISHED_AUCS = {
    "CheXNet paper": dict(zip(NIH_FINDINGS, (
        0.8094, 0.9248, 0.8638, 0.7345, 0.8676, 0.7802, 0.7680, 0.8887, 0.7901, 0.8878, 0.9371,
        0.8047, 0.8062, 0.9164))),
    "reproduce-chexnet": dict(zip(NIH_FINDINGS, (
        0.8180, 0.9090, 0.8827, 0.7156, 0.8377, 0.7756, 0.7617, 0.8776, 0.8002, 0.8945, 0.9316,
        0.8251, 0.7889, 0.9175))),
    "arnoweng/CheXNet": dict(zip(NIH_FINDINGS, (
        0.8294, 0.9165, 0.8870, 0.7143, 0.8597, 0.7873, 0.7745, 0.8726, 0.8142, 0.8932, 0.9254,
        0.8304, 0.7831, 0.9104))),
}
PUBLISHED_MEAN_AUC = {"CheXNet paper": 0.841, "reproduce-chexnet": 0.838, "arnoweng/CheXNet": 0.843}

# ImageNet normalisation used by torchvision's pretrained DenseNet (and the reference code).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def findings_for(dataset: str) -> tuple[str, ...]:
    """Label list a model trained on `dataset` predicts ('nih', 'demo' or 'chexphoto')."""
    if dataset in ("nih", "demo"):
        return NIH_FINDINGS
    if dataset == "chexphoto":
        return CHEXPHOTO_FINDINGS
    raise ValueError(f"unknown dataset {dataset!r}: expected 'nih', 'demo' or 'chexphoto'")
