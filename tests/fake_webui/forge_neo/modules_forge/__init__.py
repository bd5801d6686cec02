"""modules_forge (Forge Neo): Forge's stand-in (``main_thread`` runs txt2img/img2img on one thread, as
Neo's does), with Neo's own ``forge_canvas`` here."""

import os

__path__.append(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "forge", "modules_forge"))
