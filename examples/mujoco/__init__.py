"""MuJoCo locomotion (HalfCheetah, Hopper, Walker2d, Ant, Humanoid) with distributed ES."""

from examples.mujoco.mujoco import (
    SETTINGS,
    Ant,
    Args,
    HalfCheetah,
    Hopper,
    Humanoid,
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
    "Humanoid",
    "MuJoCoES",
    "MuJoCoSettings",
    "Walker2d",
    "run",
]
