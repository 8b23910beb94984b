"""Worker classes for the CUDA-only tests (tests/e2e/test_gpu.py)."""

from __future__ import annotations

from examples.cartpole import CartPole


class CartPoleOnDevice(CartPole):
    """CartPole that fails unless its members really are built and run on its device."""

    def score(self, policy, epoch, members):
        if policy.params.device != self.device or self.device.type != "cuda":
            raise AssertionError(f"members on {policy.params.device}, worker on {self.device}")
        return super().score(policy, epoch, members)
