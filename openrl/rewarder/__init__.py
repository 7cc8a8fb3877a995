"""Reward workers (CPU): user reward functions, run as competing consumers of a work queue.

- `child`: the worker process that loads a reward function and calls it;
- `pool`: a pool of those processes with per-call timeouts, a memory cap, and replacement
  of any worker that crashes or hangs;
- `service`: the rewarder process (bus consumer, heartbeats) around one pool;
- `builtin`: exact match, a math final-answer checker, and text-to-SQL by execution.

Nothing here imports torch; importing this package imports nothing else.
"""
