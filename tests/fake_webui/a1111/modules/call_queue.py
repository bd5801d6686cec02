"""modules/call_queue.py: the lock every generation and built-in API call runs under."""

from modules import fifo_lock

queue_lock = fifo_lock.FIFOLock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)
    return f
