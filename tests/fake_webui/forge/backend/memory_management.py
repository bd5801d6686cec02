"""backend/memory_management.py (Forge): the models Forge keeps on the GPU."""

calls = []


def unload_all_models():
    calls.append("unload_all_models")


def soft_empty_cache(force=False):
    calls.append("soft_empty_cache")


def free_memory(memory_required, device, keep_loaded=[], free_all=False):
    calls.append("free_memory")
