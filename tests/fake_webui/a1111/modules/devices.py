"""modules/devices.py: device attributes and torch_gc."""

import torch

cpu = torch.device("cpu")
device = device_interrogate = device_gfpgan = device_esrgan = device_codeformer = cpu
dtype = dtype_vae = dtype_unet = dtype_inference = torch.float32
gc_calls = []


def get_optimal_device_name():
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_optimal_device():
    return torch.device(get_optimal_device_name())


def get_device_for(task):
    return device_interrogate if task == "interrogate" else get_optimal_device()


def torch_gc():
    gc_calls.append(1)
