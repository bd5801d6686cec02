"""Errors shown to users. Each message says what went wrong and what to do about it."""


class CaptionerError(Exception):
    """An error with a message meant for the user (no traceback needed)."""


class UnknownModelError(CaptionerError):
    pass


class MissingWeightsError(CaptionerError):
    pass


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
