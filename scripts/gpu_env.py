"""Print the machine and library versions behind a GPU check: card, driver, torch, jax, flax, optax, orbax."""

from __future__ import annotations

import platform
import subprocess

NVIDIA_SMI = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]


def main() -> None:
    try:
        card = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        card = f"nvidia-smi unavailable: {e}"
    print(card or "nvidia-smi: no output")

    import flax
    import jax
    import optax
    import torch

    try:
        import orbax.checkpoint as ocp

        orbax = getattr(ocp, "__version__", "installed")
    except ImportError:
        orbax = "missing"
    print(
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}), jax {jax.__version__}, flax {flax.__version__}, "
        f"optax {optax.__version__}, orbax-checkpoint {orbax}"
    )
    torch_device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"torch device: {torch_device}; jax devices: {jax.devices()}")


if __name__ == "__main__":
    main()
