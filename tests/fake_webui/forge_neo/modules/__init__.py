"""modules (Forge Neo): the A1111 stand-in's modules, except the few Neo changed, which are here.

Forge Neo keeps most of the WebUI API the extension uses, so this package searches its own folder
first and then ``a1111/modules`` (a package ``__path__`` of two folders): a module written here
replaces the A1111 one of that name, every other one is shared.
"""

import os

_A1111_MODULES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "a1111", "modules")
__path__.append(_A1111_MODULES)
