"""modules/shared_state.py: the job state the WebUI's progress bar and Interrupt button use."""

import time

from modules import devices


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    sampling_step = 0
    sampling_steps = 0
    textinfo = None
    time_start = None

    def __init__(self):
        self.history = []  # test helper: ("begin", job) / ("end", job)

    def interrupt(self):
        self.interrupted = True

    def stop_generating(self):
        # What A1111 1.10's Interrupt button does first while a job of several items runs
        # (ui_toprow.interrupt_function, with the default "interrupt after current" option).
        self.stopping_generation = True

    def skip(self):
        self.skipped = True

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0

    def dict(self):
        return {"skipped": self.skipped, "interrupted": self.interrupted, "job": self.job,
                "job_count": self.job_count, "job_no": self.job_no, "sampling_step": self.sampling_step,
                "sampling_steps": self.sampling_steps}

    def begin(self, job: str = "(unknown)"):
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job
        self.history.append(("begin", job))
        devices.torch_gc()

    def end(self):
        self.history.append(("end", self.job))
        self.job = ""
        self.job_count = 0
        devices.torch_gc()

    @property
    def busy(self) -> bool:
        """Test helper: between begin() and end()."""
        return bool(self.job)
