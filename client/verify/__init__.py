"""Result verification: a share of each hop's finished windows re-run on another peer and compared.

- ``verifier``: which windows are checked, and the background task that checks them (per session);
- ``hop_check``: one hop's check of one window: read back, bind to signatures, re-run, judge;
- ``compare``: the pure rules: schedule, choice of the re-running peer, tolerance, disagreement;
- ``evidence``: what a hop signed, position by position, and whether tensors read back match it.

Verdicts go to the model's one owner of peer standing (``client/standing.py``), never into a
session's fields: a check sees only the narrow view of its session that it needs.
"""
