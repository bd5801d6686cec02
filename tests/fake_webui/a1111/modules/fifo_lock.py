"""modules/fifo_lock.py: a first-in first-out lock (here a plain lock that counts its uses)."""

import threading


class FIFOLock:
    def __init__(self):
        self._lock = threading.Lock()
        self.acquisitions = 0

    def acquire(self, blocking=True):
        got = self._lock.acquire(blocking)
        if got:
            self.acquisitions += 1
        return got

    def release(self):
        self._lock.release()

    def locked(self):
        return self._lock.locked()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
