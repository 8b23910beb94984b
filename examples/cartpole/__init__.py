"""CartPole-v1 trained with distributed ES: see cartpole.py."""

from examples.cartpole.cartpole import Args, CartPole, run

__all__ = ["Args", "CartPole", "run"]
