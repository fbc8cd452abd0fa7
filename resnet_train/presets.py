"""Named recipes for `resnet-train --preset NAME`: TrainConfig defaults; flags given beside a preset win.

imagenet-resnet50 is the standard ImageNet ResNet-50 recipe: SGD with Nesterov momentum 0.9, the
learning rate 0.1 per 256 images of global batch (the linear scaling rule), 5 warm-up epochs then
cosine decay, weight decay 1e-4 on kernels only (not BatchNorm or biases), label smoothing 0.1,
bf16 compute, 90 epochs, the ImageNet stem (7x7/2 and max-pool) at 224x224, and torchvision's
training and evaluation transforms (RandomResizedCrop + flip; resize 256 + centre crop 224).
"""

from __future__ import annotations

from typing import Any

# Global batch the per-256 learning rates refer to.
LR_REFERENCE_BATCH = 256

PRESETS: dict[str, dict[str, Any]] = {
    "imagenet-resnet50": {
        "dataset": "imagefolder",
        "arch": "resnet50",
        "small_stem": False,
        "image_size": 224,
        "dtype": "bf16",
        "epochs": 90,
        "batch_size": 256,
        "optimizer": "sgd",
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-4,
        "decay_bn_bias": False,
        "warmup_epochs": 5.0,
        "label_smoothing": 0.1,
        "log_every": 100,
    },
}
# Learning rate per LR_REFERENCE_BATCH images of global batch, scaled linearly with --batch-size.
LR_PER_REFERENCE_BATCH = {"imagenet-resnet50": 0.1}


def preset_values(name: str, **fields: Any) -> dict[str, Any]:
    """The preset's TrainConfig fields with `fields` on top; lr (when not given, or None) follows the batch size."""
    values = {**PRESETS[name], **fields}
    if values.get("lr") is None:
        values["lr"] = LR_PER_REFERENCE_BATCH[name] * values["batch_size"] / LR_REFERENCE_BATCH
    return values
