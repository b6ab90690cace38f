"""reproduce-chexnet's `cxr_dataset.py`: its `CXRDataset`, with its constructor.

    import cxr_dataset as CXR
    dataset = CXR.CXRDataset(path_to_images="/data/nih/images", fold="train",
                             transform=data_transforms["train"])

`CXRDataset(path_to_images, fold, transform=None, sample=0, finding="any")` means what it means
in reproduce-chexnet (the class and its one documented difference: chexnet/data.py), so code
written against it runs here unchanged. retrain.py itself reads its batches through
chexnet/loaders.py (the uint8 cache or `data.ImageFileDataset`), not through this class.
"""
from chexnet.data import (
    CXRDataset, DataError, ImageFileDataset, ImageReadError, build_transform, chexphoto_table,
    load_xray, nih_table, normalize_uint8, patient_split, read_chexpert_csv, read_nih_labels,
)

__all__ = [
    "CXRDataset", "DataError", "ImageFileDataset", "ImageReadError", "build_transform",
    "chexphoto_table", "load_xray", "nih_table", "normalize_uint8", "patient_split",
    "read_chexpert_csv", "read_nih_labels",
]
