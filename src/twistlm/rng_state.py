"""Every random generator's state of a training process, saved and restored without pickle.

Tensors (the sampler's ``torch.Generator``, torch's global CPU and CUDA states) go to ``rng_state_{rank}.safetensors``,
the Python and NumPy Mersenne-Twister states to ``rng_state_{rank}.json``; loading either file cannot run code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

RNG_TENSORS = "rng_state_{rank}.safetensors"
RNG_JSON = "rng_state_{rank}.json"


def capture(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensor states, JSON-able states) of this process."""
    tensors = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def write(directory: Path, rank: int, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(directory) / RNG_TENSORS.format(rank=rank)))
    (Path(directory) / RNG_JSON.format(rank=rank)).write_text(json.dumps(plain))


def restore(directory: Path, rank: int, generator: torch.Generator) -> None:
    """Set ``generator`` and the global generators from rank ``rank``'s files in ``directory``."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(directory) / RNG_TENSORS.format(rank=rank)))
    plain = json.loads((Path(directory) / RNG_JSON.format(rank=rank)).read_text())
    generator.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
