"""MuJoCo locomotion (HalfCheetah, Hopper, Walker2d, Ant) with distributed ES: see mujoco.py."""

from examples.mujoco.mujoco import (
    PRESETS,
    Ant,
    EnvSettings,
    HalfCheetah,
    Hopper,
    MuJoCoES,
    Walker2d,
    make_policy,
)

__all__ = [
    "PRESETS",
    "Ant",
    "EnvSettings",
    "HalfCheetah",
    "Hopper",
    "MuJoCoES",
    "Walker2d",
    "make_policy",
]
