"""The stages of a run, one module each, in the order a job runs them.

`click_logs` (generate, check, read a window) -> `teacher` (train or load) -> `label` (the teacher actor
pool writes soft-label shards) -> `students` (distilled and hard-label) -> `scoring` (every model on
the evaluation days). `training` is the skip-if-done wrapper the teacher and student stages share.
"""
