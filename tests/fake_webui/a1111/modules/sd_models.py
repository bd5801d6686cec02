"""modules/sd_models.py (A1111): the loaded checkpoint and moving it between devices."""

from modules import devices, lowvram

calls = []


class SdModelData:
    def __init__(self):
        self.sd_model = None  # None while no checkpoint is loaded (reading it never loads one)
        self.loaded_sd_models = []


model_data = SdModelData()


def send_model_to_cpu(m):
    calls.append(("send_model_to_cpu", m))
    if m is not None:
        if m.lowvram:
            lowvram.send_everything_to_cpu()
        else:
            m.to(devices.cpu)
    devices.torch_gc()


def send_model_to_device(m):
    calls.append(("send_model_to_device", m))
    lowvram.apply(m)
    if not m.lowvram:
        m.to(devices.device)


def unload_model_weights(sd_model=None, info=None):
    raise AssertionError("unload_model_weights() without a model reads shared.sd_model (loads a checkpoint)")
