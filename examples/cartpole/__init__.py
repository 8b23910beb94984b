"""CartPole-v1 trained with distributed ES: see cartpole.py."""

from examples.cartpole.cartpole import CartPole, make_policy

__all__ = ["CartPole", "make_policy"]
