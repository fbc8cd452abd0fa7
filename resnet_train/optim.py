"""The optax optimizer a TrainConfig describes: SGD or AdamW, weight decay by rule, warm-up + cosine, and for
fine-tuning, frozen parameters and a scaled learning rate for the backbone (``optax.multi_transform``)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from parity.checks.optim import torch_sgd
from resnet_arch import BN_PARAMS, HEAD

from .config import FREEZE_BACKBONE, FREEZE_BN, FREEZE_NONE, TrainConfig

# The parameter groups of a fine-tuning run: the classifier, the rest of the network, and what stays fixed.
HEAD_GROUP, BACKBONE_GROUP, FROZEN_GROUP = "head", "backbone", "frozen"


def schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up from 0 to config.lr over warmup_epochs, then cosine decay to 0 at the last step."""
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(total, warmup + 1), end_value=0.0)


def decay_mask(params: Any) -> Any:
    """True for kernels (ndim >= 2), False for BatchNorm scales/biases and the fc bias, as nanoGPT does."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


# A BatchNorm is the module that holds a ``scale``; ``--freeze bn`` fixes its scale and bias (not, say, the
# squeeze-and-excitation biases, which are 1-d too).
BN_SCALE = BN_PARAMS["weight"]
BN_LEAVES = frozenset(BN_PARAMS.values())


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A leaf's tree path as module and parameter names (linen dicts and NNX states alike: an NNX Variable's
    ``.value`` attribute is left out)."""
    return tuple(
        str(getattr(entry, "key", getattr(entry, "idx", entry)))
        for entry in path
        if not isinstance(entry, jax.tree_util.GetAttrKey)
    )


def param_groups(config: TrainConfig) -> Any:
    """params -> the group of each leaf: the classifier's, the backbone's, or frozen (``--freeze``: every
    BatchNorm scale and bias, or the whole backbone)."""

    def groups(params: Any) -> Any:
        leaves = [_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        batch_norms = {names[:-1] for names in leaves if names[-1] == BN_SCALE}

        def group(path: tuple[Any, ...], _: Any) -> str:
            names = _names(path)
            if names[0] == HEAD:
                return HEAD_GROUP
            is_bn = names[-1] in BN_LEAVES and names[:-1] in batch_norms
            if config.freeze == FREEZE_BACKBONE or (config.freeze == FREEZE_BN and is_bn):
                return FROZEN_GROUP
            return BACKBONE_GROUP

        return jax.tree_util.tree_map_with_path(group, params)

    return groups


def keep_frozen(config: TrainConfig, new: Any, old: Any) -> Any:
    """``new`` parameters with every frozen leaf ``old``'s own array, so frozen weights stay bit for bit."""
    if config.freeze == FREEZE_NONE:
        return new
    groups = param_groups(config)(old)
    return jax.tree.map(lambda g, n, o: o if g == FROZEN_GROUP else n, groups, new, old)


def trainable(config: TrainConfig, grads: Any) -> Any:
    """``grads`` without the frozen parameters' leaves (None in their place): what the step's finiteness check
    looks at, so the frozen part's backward pass is never computed."""
    if config.freeze == FREEZE_NONE:
        return grads
    groups = param_groups(config)(grads)
    return jax.tree.map(lambda g, x: None if g == FROZEN_GROUP else x, groups, grads)


def _base(config: TrainConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    mask = None if config.decay_bn_bias else decay_mask
    if config.optimizer == "adamw":
        return optax.adamw(lr, b1=config.momentum, weight_decay=config.weight_decay, mask=mask)
    return torch_sgd(lr, config.momentum, config.weight_decay, nesterov=config.nesterov, decay_mask=mask)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimizer over `params`; decay applies to every param or, by default, only to kernels.

    With ``--freeze`` or ``--backbone-lr-scale``, one optimizer per parameter group: the classifier's at the
    schedule, the backbone's at ``backbone_lr_scale`` times it, and none for frozen parameters
    (``optax.set_to_zero``: no state, no decay, no change).
    """
    lr = schedule(config, steps_per_epoch)
    if config.freeze == FREEZE_NONE and config.backbone_lr_scale == 1.0:
        return _base(config, lr)
    scale = config.backbone_lr_scale
    transforms = {
        HEAD_GROUP: _base(config, lr),
        BACKBONE_GROUP: _base(config, lambda step: scale * lr(step)),
        FROZEN_GROUP: optax.set_to_zero(),
    }
    return optax.multi_transform(transforms, param_groups(config))
