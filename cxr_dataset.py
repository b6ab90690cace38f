"""reproduce-chexnet's `cxr_dataset.py`: the chest X-ray datasets, now in chexnet/data.py.

Kept at the top level so that code written against reproduce-chexnet
(`from cxr_dataset import CXRDataset`) keeps working; new code imports `chexnet.data`.
"""
from chexnet.data import (
    CXRDataset, DataError, ImageReadError, build_transform, chexphoto_table, load_xray,
    nih_table, normalize_uint8, patient_split, read_chexpert_csv, read_nih_labels,
)

__all__ = [
    "CXRDataset", "DataError", "ImageReadError", "build_transform", "chexphoto_table",
    "load_xray", "nih_table", "normalize_uint8", "patient_split", "read_chexpert_csv",
    "read_nih_labels",
]
