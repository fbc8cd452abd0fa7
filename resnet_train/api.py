"""What the loop needs of a Flax API's training: the interface both step modules implement (``steps`` for
linen, ``nnx_steps`` for NNX), and the module a config's ``--api`` picks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import jax
import optax

from resnet_arch import NNX

from .config import TrainConfig

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the project runs on 3.10
    from typing_extensions import Self

Array = jax.Array


class TrainStateLike(Protocol):
    """The fields every train state has (the arrays a checkpoint saves, the dataset statistics)."""

    @property
    def step(self) -> Array: ...

    @property
    def params(self) -> Any: ...

    @property
    def batch_stats(self) -> Any: ...

    @property
    def opt_state(self) -> Any: ...

    @property
    def skipped(self) -> Array: ...

    @property
    def mean(self) -> tuple[float, ...]: ...

    @property
    def std(self) -> tuple[float, ...]: ...

    def variables(self) -> dict[str, Any]: ...

    def replace(self, **changes: Any) -> Self: ...


class StepFunctions(Protocol):
    """A step module: its fresh state (from given variables, if any), its pure train and eval steps (the loop jits
    them), its eval forward."""

    def create_train_state(
        self,
        config: TrainConfig,
        num_classes: int,
        tx: optax.GradientTransformation,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        init: dict[str, Any] | None = None,
    ) -> Any: ...

    def train_step(
        self, state: Any, images_u8: Array, labels: Array, config: TrainConfig
    ) -> tuple[Any, dict[str, Array]]: ...

    def eval_step(self, state: Any, images_u8: Array, labels: Array, mask: Array) -> dict[str, Array]: ...

    def eval_forward(
        self, config: TrainConfig, num_classes: int, dtype: Any = None, precision: Any = None
    ) -> Callable[[dict[str, Any], Array], Array]: ...


def step_functions(api: str) -> StepFunctions:
    """The step module of a config's ``api`` (linen or NNX); only that one is imported (flax.nnx costs a second)."""
    if api == NNX:
        from . import nnx_steps

        return nnx_steps
    from . import steps

    return steps
