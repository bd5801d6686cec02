"""The gradio tab shared by the WebUI extension and the standalone app (``python -m captioners ui``).

Importing this package imports gradio; the rest of ``captioners`` never does.
"""

from captioners.ui.tab import TabHooks, build_tab

__all__ = ["TabHooks", "build_tab"]
