"""Scheduled scalars, threestudio style: a constant or ``[start_step, start_value, end_value, end_step]``.

Why: every loss weight (``lambda_*``) and the SDS timestep range of VLM3D/MVDream change linearly over
steps; one function evaluates all of them the same way (linear between the two steps, clamped outside).
A three-element list ``[start_value, end_value, end_step]`` starts at step 0.
"""

from __future__ import annotations

from typing import Sequence

Schedule = float | Sequence[float]


def check_schedule(value: object, key: str) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is a number or a 3/4-element numeric list with end > start step."""
    if isinstance(value, bool):
        raise ValueError(f"key '{key}' must be a number or [start_step, start_value, end_value, end_step], got {value!r}")
    if isinstance(value, (int, float)):
        return
    if not isinstance(value, (list, tuple)) or len(value) not in (3, 4) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) for v in value
    ):
        raise ValueError(f"key '{key}' must be a number or [start_step, start_value, end_value, end_step], got {value!r}")
    start_step, end_step = (0, value[2]) if len(value) == 3 else (value[0], value[3])
    if end_step <= start_step or start_step < 0:
        raise ValueError(f"key '{key}' needs 0 <= start_step < end_step, got {value!r}")


def scheduled(value: Schedule, step: int) -> float:
    """The value of a schedule at ``step`` (threestudio's ``C()`` for integer end steps)."""
    if isinstance(value, (int, float)):
        return float(value)
    v = list(value)
    if len(v) == 3:
        v = [0] + v
    start_step, start_value, end_value, end_step = v
    frac = min(1.0, max(0.0, (step - start_step) / (end_step - start_step)))
    return float(start_value + (end_value - start_value) * frac)


def is_zero(value: Schedule) -> bool:
    """True when the schedule is 0 at every step (the term's models need not be loaded)."""
    if isinstance(value, (int, float)):
        return float(value) == 0.0
    v = list(value)
    return all(float(x) == 0.0 for x in (v[-3:-1] if len(v) == 4 else v[:2]))
