"""Reading the standalone app's log in tests: the tracebacks that are real errors."""

from __future__ import annotations

# A browser page closing while gradio 3.41 waits on its queue websocket logs a traceback that ends
# in this (also in a real A1111 with current uvicorn): the client left, the app did nothing wrong.
CLIENT_GONE = ("WebSocketDisconnect", "ClientDisconnect")


def app_errors(log_text: str) -> list[str]:
    """The last line (the exception) of each traceback in the log, except clients disconnecting."""
    errors, in_traceback = [], False
    for line in log_text.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            in_traceback = False
            if not any(name in line.split(":")[0] for name in CLIENT_GONE):
                errors.append(line)
    return errors
