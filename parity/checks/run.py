"""Running the parity checks on a pair: eval logits here, the train-mode checks from ``train``.

Each check compares the two frameworks on one random batch (odd sizes welcome) in one precision
mode (``parity.checks.precision``). Errors are relative, ``||flax - torch|| / ||torch||`` over all
compared tensors together; when a check fails its result names the first stage (conv1, conv2_x..
conv5_x, fc) whose outputs diverge.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from resnet_arch import LINEN

from .compare import CheckResult, numpy_of_jax, numpy_of_torch, stage_errors
from .pairs import Batch, Pair, autocast, make_batch, make_pair, pair_result
from .precision import EVAL, GRADIENTS, MODES, RUNNING_STATS, SGD, TRAIN_LOGITS, applied
from .reference import RESNET_TORCH, torch_stages
from .train import check_sgd, check_train


def check_eval(pair: Pair, batch: Batch) -> CheckResult:
    """Eval-mode logits, with every stage's output compared for the diagnosis."""
    model = pair.torch_model.eval()
    with torch.no_grad(), autocast(pair):
        t_stages = torch_stages(model, batch.x_torch)
    f_stages = pair.flax.eval_stages(batch.x_jax)
    stages = stage_errors(t_stages, f_stages)
    logits = ([numpy_of_jax(f_stages["fc"])], [numpy_of_torch(t_stages["fc"])])
    return pair_result(pair, EVAL, *logits, stages, "forward outputs (eval mode)")


def check_pair(
    pair: Pair, size: tuple[int, int], batch_size: int, seed: int = 0, checks: Iterable[str] | None = None
) -> list[CheckResult]:
    """The checks (default: all) that the pair's precision mode has a tolerance for (call inside ``applied``)."""
    wanted = set(pair.mode.tolerances if checks is None else checks) & set(pair.mode.tolerances)
    batch = make_batch(pair, size, batch_size, seed)
    results = [check_eval(pair, batch)] if EVAL in wanted else []
    if wanted & {TRAIN_LOGITS, RUNNING_STATS, GRADIENTS, SGD}:
        train = check_train(pair, batch, with_gradients=bool(wanted & {GRADIENTS, SGD}))
        results += [r for r in train if r.check in wanted]
        if SGD in wanted:
            batches = [batch] + [make_batch(pair, size, batch_size, seed + i) for i in range(1, pair.mode.sgd_steps)]
            results.append(check_sgd(pair, batches, train[0].stage_errors))
    return results


def run_checks(
    arch: str,
    device: str,
    precision: str,
    size: tuple[int, int],
    batch_size: int,
    seed: int = 0,
    checks: Iterable[str] | None = None,
    fused_bn: bool = False,
    api: str = LINEN,
    reference: str = RESNET_TORCH,
) -> list[CheckResult]:
    """Build a random model in both frameworks and run the checks of one precision mode
    (``fused_bn``: the Flax side has the fused train-mode BatchNorm training uses; ``api``: "linen"
    checks ``resnet_flax``, "nnx" ``resnet_flax.nnx``; ``reference``: the torch model, resnet_torch's,
    torchvision's or timm's)."""
    with applied(MODES[precision], device):
        pair = make_pair(arch, precision, device, seed, fused_bn=fused_bn, api=api, reference=reference)
        return check_pair(pair, size, batch_size, seed, checks)
