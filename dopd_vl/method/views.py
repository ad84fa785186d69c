"""The view vocabulary (docs/design.md §1.1): the one definition of the five views' names.

A view is one model scoring the student's response under one prompt: the student itself (plain,
with gradient), the teacher and the privileged student with the context p, the teacher without
it, and the initial student (ExOPD's reference). Objectives name their targets from here, the
modality adapters decide from here which prompts carry p, and the diagnostics score a fixed set.
"""

from __future__ import annotations

__all__ = ["VIEWS", "SCORING_VIEWS", "PRIVILEGED_VIEWS", "TEACHER_VIEWS", "DIAGNOSTIC_VIEWS"]

VIEWS = ("student", "teacher_priv", "student_priv", "teacher_plain", "reference")
"""Every view; `reference` is the initial student on the plain prompt (ExOPD)."""
SCORING_VIEWS = VIEWS[1:]
"""The views scored without gradient as targets or signals, in the order they are computed."""
PRIVILEGED_VIEWS = frozenset({"teacher_priv", "student_priv"})
"""Views whose prompt carries the privileged context p."""
TEACHER_VIEWS = frozenset({"teacher_priv", "teacher_plain"})
"""Views scored by the teacher (the others by a student: live, frozen or EMA)."""
DIAGNOSTIC_VIEWS = ("teacher_priv", "student_priv", "teacher_plain")
"""Views scored for the diagnostics (docs/design.md §1.11), whatever the objective routes on."""
