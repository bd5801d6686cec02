"""modules/shared_cmd_options.py: the parsed command line (the fields extensions read)."""

import argparse

cmd_opts = argparse.Namespace(
    lowvram=False, medvram=False, medvram_sdxl=False, use_cpu=[], no_half=False, precision="autocast",
    api=True, nowebui=False, api_auth=None, listen=False, port=None, server_name=None, data_dir=".",
    models_dir=None, hide_ui_dir_config=False, skip_load_model_at_start=True, disable_extension_access=False,
)
