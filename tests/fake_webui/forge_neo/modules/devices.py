"""modules/devices.py (Forge Neo): the backend decides the device; there is NO ``device_interrogate``.

Neo's devices.py takes ``device`` from ``backend.memory_management.get_torch_device()`` (``--cpu``
makes it the CPU), aliases the GFPGAN/ESRGAN/CodeFormer devices to it, has no interrogate device
(Neo has no interrogators), answers ``get_device_for(...)`` with that one device whatever the task,
and its ``torch_gc()`` is the backend's ``soft_empty_cache()``.
"""

import torch

from backend import memory_management

cpu = torch.device("cpu")
device = memory_management.get_torch_device()
device_gfpgan = device_esrgan = device_codeformer = device
dtype = dtype_vae = dtype_unet = dtype_inference = torch.float32
gc_calls = []


def get_optimal_device_name():
    return device.type


def get_optimal_device():
    return device


def get_device_for(*args, **kwargs):
    return device


def torch_gc():
    gc_calls.append(1)
    memory_management.soft_empty_cache()
