"""modules/script_callbacks.py (Forge Neo): the A1111 stand-in's callbacks, registered WITHOUT ``name=``.

Neo's ``on_image_saved(callback)`` takes no ``name=`` keyword (A1111 1.10 and Forge have
``on_X(callback, *, name=None)``; the branch ``classic`` of the same repository has no ``name=`` on
any registrar). The stand-in applies the stricter form to every ``on_*`` registrar, so passing
``name=`` anywhere fails here with TypeError. The callback lists, the runners and ``errors`` are the A1111
stand-in's own objects (loaded from its file), so everything else behaves the same.
"""

import importlib.util
import os
import sys

_BASE_NAME = "modules._a1111_script_callbacks"  # under "modules.": the tests' clean-up removes it too
_BASE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "a1111", "modules", "script_callbacks.py")

_spec = importlib.util.spec_from_file_location(_BASE_NAME, _BASE_FILE)
_base = importlib.util.module_from_spec(_spec)
sys.modules[_BASE_NAME] = _base
_spec.loader.exec_module(_base)

from modules._a1111_script_callbacks import *  # noqa: E402,F401,F403  (callback_map, errors, runners...)


def _without_name(registrar):
    """``registrar`` as Neo declares it: the callback only."""
    def register(callback):
        registrar(callback)

    register.__name__ = registrar.__name__
    register.__doc__ = registrar.__doc__
    return register


for _key in [key for key in vars(_base) if key.startswith("on_")]:
    globals()[_key] = _without_name(getattr(_base, _key))
