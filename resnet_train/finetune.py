"""Starting a run from pretrained weights (``--init-from``): the architecture they fix, the variables a run
starts from (the classifier replaced when its class count is not the dataset's), and what the run records
about them.

The weights are read with the converter (``parity.conversion``), so every file and layout it reads is a
source: ``.pth``/``.safetensors``/``.msgpack`` files and model-hub directories, in the seed's, torchvision's,
timm's or transformers' key names, with or without ``module.``/``_orig_mod.`` prefixes. torch and the
converter are imported only when a source is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resnet_arch import HEAD

log = logging.getLogger(__name__)

# config.json's record of the source (beside the --init-from field): enough to trace the run to its weights
# and to export in their layout without reading them again.
SOURCE_ENTRY = "init_from_source"
_HASH_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    """What a run records about its source weights."""

    sha256: str  # of the file read (a hub directory's weights file)
    file: str  # that file's path
    layout: str  # the key names the weights came in (parity.conversion.names.LAYOUTS)
    hub_dir: bool  # a model-hub directory (config.json beside the weights)
    arch: str  # the weights' architecture, described
    classes: int  # the weights' classifier's class count

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: Any) -> SourceRecord | None:
        """The record a run's config.json holds, or None when it holds none (or a damaged one)."""
        try:
            return cls(**saved)
        except TypeError:
            return None


def _flag_value(name: str, value: Any) -> str:
    """How a field's value is written on the command line (``--no-small-stem``, ``--arch resnet50``)."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


def check_architecture(
    source: str, found: dict[str, Any], given: dict[str, Any], described: str, presets: Mapping[str, str] | None = None
) -> None:
    """ValueError naming both when a given arch or small_stem disagrees with the source weights'; ``presets``
    maps a field a --preset set (not a flag) to the preset's name, which the sentence then blames."""
    for name, value in given.items():
        if value != found[name]:
            flag = _flag_value(name, value)
            flag = f"--preset {presets[name]}'s {flag}" if presets and name in presets else flag
            raise ValueError(
                f"--init-from {source} holds {described}, which is {_flag_value(name, found[name])}: "
                f"{flag} disagrees (leave it out: the architecture comes from the weights)"
            )


def _saved_run(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's config.json, if it has a readable one."""
    from .config import saved_config
    from .runlog import CONFIG_FILE

    try:
        return saved_config(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else None
    except (OSError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class _Source:
    """Source weights read and checked once, with what the converter warned about while reading them."""

    key: tuple[str, int, int]  # the path read, its mtime and size: a file changed since is read again
    framework: str
    tensors: Any
    hub_config: dict[str, Any]
    weights: Any  # parity.conversion.weights.Weights
    notes: tuple[str, ...]


# The source read at flag parsing (for the architecture), kept for the run's setup to take: one read per run.
_pending: dict[str, _Source] = {}


def _weights_file(path: Path) -> Path:
    """The file a source's weights are in: itself, or a hub directory's weights file."""
    from parity.conversion.hub import WEIGHTS_FILES

    if not path.is_dir():
        return path
    return next((path / name for name in WEIGHTS_FILES if (path / name).is_file()), path)


def _key(source: str) -> tuple[str, int, int]:
    stat = _weights_file(Path(source)).stat()
    return str(Path(source).resolve()), stat.st_mtime_ns, stat.st_size


def _read(source: str) -> _Source:
    """Read and check the weights at ``source``. The converter's warnings (a ``module.`` prefix stripped, fresh
    BatchNorm statistics) become notes the run logs, one line each: a pretrained source with a wrapper's
    prefix is an ordinary input to fine-tune from, not a fault."""
    from parity.conversion.convert import check_flax_variables, check_state_dict
    from parity.conversion.files import TORCH, read_checkpoint
    from parity.conversion.hub import read_hub_dir
    from parity.conversion.validate import ConversionError

    path = Path(source)
    ckpt, hub_config = read_hub_dir(path) if path.is_dir() else (read_checkpoint(path), {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if ckpt.framework == TORCH:
                weights = check_state_dict(ckpt.tensors, config=hub_config)
            else:
                weights = check_flax_variables(ckpt.tensors)
        except ConversionError as e:
            raise ConversionError(f"{path}: {e}") from None
    notes = tuple(f"--init-from {source}: {w.message}" for w in caught)
    return _Source(_key(source), ckpt.framework, ckpt.tensors, hub_config, weights, notes)


def _take(source: str) -> _Source:
    """The weights flag parsing read, if they are still the file's; else read them now."""
    kept = _pending.pop(source, None)
    return kept if kept is not None and kept.key == _key(source) else _read(source)


def source_architecture(
    source: str, given: dict[str, Any], resume_dir: Path | None, presets: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """arch and small_stem of the weights at ``source``; a ``given`` value that disagrees is a ValueError
    naming both (``presets``: the given fields a --preset set, see check_architecture). Resuming a run
    started from the same source (``resume_dir``), they are the run's own and the weights are not read
    again; otherwise the weights read are kept for ``read_source``."""
    saved = _saved_run(resume_dir) if resume_dir is not None else None
    _pending.clear()
    if saved is not None and saved.get("init_from") == source and {"arch", "small_stem"} <= set(saved):
        found = {"arch": saved["arch"], "small_stem": saved["small_stem"]}
        described = f"{saved['arch']} (as the run in {resume_dir} recorded)"
        check_architecture(source, found, given, described, presets)
        return found
    read = _read(source)
    spec = read.weights.spec
    if spec.name is None:
        raise ValueError(
            f"--init-from {source}: {spec.describe()} is none of the builders resnet-train trains (--arch choices)"
        )
    found = {"arch": spec.name, "small_stem": spec.small_stem}
    check_architecture(source, found, given, spec.describe(), presets)
    _pending[source] = read
    return found


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _layout(framework: str, tensors: Any, hub_config: dict[str, Any]) -> str:
    """The layout the source's keys are in; torchvision's names beside a timm config.json are timm's."""
    from parity.conversion.files import TORCH
    from parity.conversion.names import SEED, TIMM, TORCHVISION, WRAPPER_PREFIXES, recognise

    if framework != TORCH:  # a Flax file: its paths are the seed's module paths
        return SEED
    keys = list(tensors)
    for prefix in WRAPPER_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            keys = [k.removeprefix(prefix) for k in keys]
    layout = recognise(keys)[0]
    return TIMM if layout == TORCHVISION and isinstance(hub_config.get("architecture"), str) else layout


def read_source(source: str, arch: str, small_stem: bool, num_classes: int) -> tuple[dict[str, Any], SourceRecord]:
    """The float32 variables a run starts from and the record of where they came from.

    The weights are the ones flag parsing read (read now if it did not, or if the file changed since). They
    must be ``arch`` with ``small_stem`` (ValueError naming both otherwise). Their classifier is left out of
    the variables when its class count is not ``num_classes`` (the run initialises a fresh one); one log
    line says which.
    """
    import jax.numpy as jnp

    read = _take(source)
    for note in read.notes:
        log.warning("%s", note)
    weights = read.weights
    spec = weights.spec
    check_architecture(
        source,
        {"arch": spec.name, "small_stem": spec.small_stem},
        {"arch": arch, "small_stem": small_stem},
        spec.describe(),
    )
    variables = weights.to_flax(jnp.float32)
    weights_file = _weights_file(Path(source))
    record = SourceRecord(
        file_sha256(weights_file),
        str(weights_file),
        _layout(read.framework, read.tensors, read.hub_config),
        Path(source).is_dir(),
        spec.describe(),
        spec.num_classes,
    )
    if spec.num_classes == num_classes:
        log.info(
            "--init-from %s: %s, %s layout; classifier kept (%d classes)",
            source,
            record.arch,
            record.layout,
            num_classes,
        )
    else:
        variables["params"] = {k: v for k, v in variables["params"].items() if k != HEAD}
        log.info(
            "--init-from %s: %s, %s layout; classifier replaced: the weights' %d classes -> a freshly initialised "
            "one for the dataset's %d",
            source,
            record.arch,
            record.layout,
            spec.num_classes,
            num_classes,
        )
    return variables, record


def with_init(fresh: dict[str, Any], init: dict[str, Any]) -> dict[str, Any]:
    """``fresh`` variables with every top-level module ``init`` holds replaced by ``init``'s (the classifier
    stays fresh where ``init`` has none)."""
    return {collection: {**tree, **init.get(collection, {})} for collection, tree in fresh.items()}


def saved_record(run_dir: Path) -> SourceRecord | None:
    """The source record a run directory's config.json holds, if any."""
    saved = _saved_run(run_dir)
    return SourceRecord.from_dict(saved.get(SOURCE_ENTRY)) if saved is not None else None


def record_json(record: SourceRecord | None) -> dict[str, Any]:
    """config.json's extra entry for a run's source (nothing without one)."""
    return {} if record is None else {SOURCE_ENTRY: record.to_dict()}
