"""MuJoCo locomotion (HalfCheetah, Hopper, Walker2d, Ant) with distributed ES: see mujoco.py."""

from examples.mujoco.mujoco import (
    SETTINGS,
    Ant,
    Args,
    HalfCheetah,
    Hopper,
    MuJoCoES,
    MuJoCoSettings,
    Walker2d,
    run,
)

__all__ = [
    "SETTINGS",
    "Ant",
    "Args",
    "HalfCheetah",
    "Hopper",
    "MuJoCoES",
    "MuJoCoSettings",
    "Walker2d",
    "run",
]
