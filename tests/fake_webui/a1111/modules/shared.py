"""modules/shared.py. ``sd_model`` is a lazy property in the WebUI that loads a checkpoint when read;
here reading it raises, so a test fails if the adapter ever touches it."""

from modules import options, shared_state
from modules.options import OptionInfo, options_section  # noqa: F401  (re-exported as in the WebUI)
from modules.shared_cmd_options import cmd_opts  # noqa: F401

opts = options.Options()
state = shared_state.State()
device = None
sd_model_reads = []


def __getattr__(name):
    if name == "sd_model":
        sd_model_reads.append(name)
        raise AssertionError("shared.sd_model was read: in A1111 this loads a checkpoint")
    raise AttributeError(name)
