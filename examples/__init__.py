"""Runnable examples: `python -m examples.cartpole`, `python -m examples.mujoco`."""
