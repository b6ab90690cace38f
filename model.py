"""reproduce-chexnet's `model.py`: the DenseNet-121 network, now in chexnet/model.py; the
training loop that reproduce-chexnet kept here is chexnet/train.py (run it with retrain.py).

Kept at the top level so that code written against reproduce-chexnet keeps its import;
new code imports `chexnet.model`.
"""
from chexnet.model import (
    WeightsUnavailable, build_model, load_weights_file, masked_bce_with_logits,
)

__all__ = ["WeightsUnavailable", "build_model", "load_weights_file", "masked_bce_with_logits"]
