"""Errors shown to users. Each message says what went wrong and what to do about it."""

from __future__ import annotations


class CaptionerError(Exception):
    """An error with a message meant for the user (no traceback needed)."""


class UnknownModelError(CaptionerError):
    pass


class MissingWeightsError(CaptionerError):
    """Model files are missing. ``str()`` is the command line's message (it names options such as
    ``--clip-weights``); ``ui_message`` says the same to a user of the WebUI, the app or the API:
    where each file goes, and which field of the tab points at a copy instead."""

    def __init__(self, message: str, ui_message: str | None = None):
        super().__init__(message)
        self.ui_message = ui_message or message

    def for_ui(self) -> "MissingWeightsError":
        """The same error whose message is the UI one (the service raises it from every job)."""
        return MissingWeightsError(self.ui_message)


class UnsafeCheckpointError(CaptionerError):
    pass


class CheckpointLayoutError(CaptionerError):
    pass


class ImageLoadError(CaptionerError):
    pass


class TooLargeError(CaptionerError):
    """A request asks for more than the configured limits allow (HTTP 413)."""


class OutputsNotWrittenError(CaptionerError):
    """A run captioned images but could not write some of its combined outputs or its report."""
