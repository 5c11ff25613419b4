"""Fault-injection suite (issue 8): kill -9, failing saves, NaN/inf, dead or stalled ranks,
untrusted inputs, a soak run and bad configs — all on real processes, checkpoints and gloo.
Shared launch/inspection helpers live in :mod:`faults._helpers`; the report is docs/faults.md."""
