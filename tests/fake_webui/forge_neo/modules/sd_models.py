"""modules/sd_models.py (Forge Neo): the backend holds the models.

Neo has no ``send_model_to_cpu`` / ``send_model_to_device`` / ``reload_model_weights`` (code that
calls them fails with AttributeError here, as there); ``unload_model_weights()`` asks the backend to
unload everything. Before a checkpoint loads, ``model_data.sd_model`` is a placeholder object, not
None (Neo's ``FakeInitialModel``).
"""

from backend import memory_management

calls = []


class FakeInitialModel:
    """Neo's stand-in for "no checkpoint loaded yet" (the token counter reads it)."""

    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ""


model_data = SdModelData()


def unload_model_weights(sd_model=None, info=None):
    calls.append("unload_model_weights")
    memory_management.unload_all_models()
