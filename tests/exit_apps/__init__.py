"""Applications stopped the way an orchestrator stops them (tests/test_process_end.py):
each records ``HITS`` hits and ``MISSES`` misses in ``REGION`` per request or task, with
``setup()`` at import and default settings, and (the task queues) pushes one entry per
finished task to the ground-truth list ``TRUTH`` in the broker's Redis."""

TRUTH = "exit-test:done"
