"""modules_forge/main_thread.py: Forge runs every txt2img / img2img on one "main thread"; the gradio
worker that took the queue lock waits for the result. So a script runs on a thread that does NOT
hold the queue lock, while the lock is held (by the waiting worker)."""

import threading


def run_and_wait_result(func, *args, **kwargs):
    outcome = {}

    def work():
        try:
            outcome["result"] = func(*args, **kwargs)
        except BaseException as exc:  # handed back to the waiting caller
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="forge-main-thread", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")
