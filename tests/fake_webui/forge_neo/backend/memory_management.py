"""backend/memory_management.py (Forge Neo): the models Neo keeps on the GPU.

As Forge's, with Neo's signatures: ``free_memory(memory_required, device, keep_loaded=[])`` has no
``free_all``; ``unload_all_models()`` frees everything on ``get_torch_device()``.
"""

import torch

calls = []


def get_torch_device():
    return torch.device("cpu")  # the tests run as Neo does with --cpu


def unload_all_models():
    calls.append("unload_all_models")


def soft_empty_cache(force=False):
    calls.append("soft_empty_cache")


def free_memory(memory_required, device, keep_loaded=[]):
    calls.append("free_memory")
