"""Where lmms-eval's classes load the model: ``device`` / ``device_map`` per base, and CPU data parallel.

lmms-eval's classes default to ``device="cuda"`` and hard-code ``cuda:<rank>`` (and DDP) whenever
accelerate runs several processes; here a CPU-only machine and several CPU processes work too.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Optional

import torch

__all__ = ["map_device", "one_process_accelerator"]


def _is_cuda(device) -> bool:
    return str(device).split(":")[0] == "cuda"


def map_device(base: Optional[str], kwargs: dict) -> tuple[dict, bool]:
    """``device`` / ``device_map`` for lmms-eval's class ``base``; and whether this is CPU data parallel.

    lmms-eval's classes default to ``device="cuda"`` and ``device_map`` ``"cuda"`` (Qwen2-VL),
    ``"auto"`` (Qwen2.5-VL, Qwen3-VL) or ``""`` (LlavaHf, which transformers 5 rejects in a single
    process). Here, for every base: no ``device`` on a machine without CUDA means ``cpu``; a
    non-CUDA device that the user did not pair with a ``device_map`` gets ``device_map=device``;
    LlavaHf's ``""`` becomes the device in a single process. Several processes (``accelerate launch``)
    on a non-CUDA device are CPU data parallel (see :func:`one_process_accelerator`).
    """
    from accelerate import PartialState

    kwargs = dict(kwargs)
    processes = PartialState().num_processes
    device = kwargs.get("device")
    if device is None and not torch.cuda.is_available():
        device = kwargs["device"] = "cpu"
    on_cuda = device is None or _is_cuda(device)
    device_map = kwargs.get("device_map")
    if not on_cuda and device_map in (None, ""):
        kwargs["device_map"] = str(device)
    elif base == "llava_hf" and device_map in (None, "") and processes <= 1:
        kwargs["device_map"] = str(device or "cuda")
    return kwargs, processes > 1 and not on_cuda


class _OneProcessView:
    """An ``Accelerator`` seen as a single process (lmms-eval's ``__init__`` then loads on ``device``)."""

    def __init__(self, accelerator):
        object.__setattr__(self, "_real", accelerator)

    num_processes = 1
    process_index = 0
    local_process_index = 0
    is_main_process = True
    is_local_main_process = True

    @property
    def distributed_type(self):
        from accelerate import DistributedType

        return DistributedType.NO

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextmanager
def one_process_accelerator(module_name: str):
    """While lmms-eval's class defined in ``module_name`` runs ``__init__``, its ``Accelerator()`` says
    one process.

    Yields a list that receives the real accelerator; the caller then sets ``rank`` / ``world_size``
    from it, so lmms-eval's evaluator still shards the documents over all processes and the
    statistics are gathered over them at the end.
    """
    module = importlib.import_module(module_name)
    real = getattr(module, "Accelerator")
    made: list = []

    def factory(*args, **kwargs):
        accelerator = real(*args, **kwargs)
        made.append(accelerator)
        return _OneProcessView(accelerator)

    module.Accelerator = factory
    try:
        yield made
    finally:
        module.Accelerator = real
    if not made:  # the parent never asked: make one for rank / world size
        made.append(real())
