"""Fine-tuning a pretrained causal language model with distributed ES under a scalar reward.

    python -m examples.finetune                                # a tiny random Llama (no download)
    python -m examples.finetune --model ./my-checkpoint        # any save_pretrained directory
    python -m examples.finetune --model Qwen/Qwen2.5-0.5B      # or a Hub name (needs the network)
    python -m examples.finetune --es.perturbation full --es.population-size 30 --es.sigma 0.001
    evochi-torch worker examples.finetune:Echo --server HOST:PORT
    evochi-torch export runs/echo-lowrank-s0 model.safetensors --state-dict examples.finetune:Echo

The policy is the Hugging Face model itself (`transformers`, the `hf` extra): the training
starts from its weights, and `export --state-dict` writes a plain state dict that
`model.load_state_dict` takes. The task is a stand-in for yours (replace `reward`): echo.
A prompt is `LENGTH` random tokens and a separator; the model continues it greedily for `LENGTH`
tokens, and a member's reward is the fraction of those that repeat the prompt plus the mean
probability it gave the right token (the smooth part ES climbs before the first token is right).

Decoding is greedy, so rewards are deterministic, and runs by full forward passes with
`use_cache=False`: every member's forward pass runs as one batch through the shared weights
(`LowRankPolicy`), and there is no key/value cache that one member could fill and another read.
For `model.generate` or other code that takes one model, `policy.member(b)` is member b's model.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import tyro
from torch import nn

from evochi_torch import ESConfig, PopulationPolicy, TorchESWorker
from evochi_torch.harness import RunConfig, RunResult, Trainer
from evochi_torch.lowrank_policy import LowRankPolicy

LENGTH = 4
ALPHABET = 16  # prompt tokens are ids 0..ALPHABET-1; the separator is ALPHABET


def tiny_llama() -> nn.Module:
    """A 2-layer Llama with a 32-token vocabulary and no special tokens, randomly initialised:
    the default model where no checkpoint can be downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        attn_implementation="eager", bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def load_model(name: str | None) -> nn.Module:
    """`name`: a `save_pretrained` directory or a Hub id; None: `tiny_llama()`. Float32, eager
    attention (a vmap-able forward), evaluation mode."""
    if name is None:
        return tiny_llama().eval()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def prompts(seed: int, epoch: int, size: int) -> torch.Tensor:
    """`size` prompts `[size, LENGTH + 1]` (random tokens, then the separator), a pure
    function of the arguments: every worker scores its members on the same prompts."""
    rng = np.random.default_rng([seed, epoch])
    tokens = torch.as_tensor(rng.integers(0, ALPHABET, (size, LENGTH)))
    return torch.cat([tokens, torch.full((size, 1), ALPHABET)], dim=1)


def greedy(policy: Any, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation of `ids` `[..., T]` by `steps` full forward passes (no cache):
    the tokens `[..., steps]` and the probability of every vocabulary entry at each step
    `[..., steps, V]`. `policy` is a model or a population policy (leading member axis)."""
    tokens, probs = [], []
    for _ in range(steps):
        logits = policy(ids, use_cache=False).logits[..., -1, :]
        p = torch.softmax(logits.float(), dim=-1)
        nxt = p.argmax(-1)
        tokens.append(nxt)
        probs.append(p)
        ids = torch.cat([ids, nxt[..., None]], dim=-1)
    return torch.stack(tokens, dim=-1), torch.stack(probs, dim=-2)


def reward(prompt: torch.Tensor, tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Echo reward per leading index: fraction of exact tokens + mean probability of the
    right token, averaged over the prompts (the last two axes of `tokens`)."""
    target = prompt[..., :LENGTH].expand_as(tokens)
    exact = (tokens == target).float().mean(dim=(-2, -1))
    right = probs.gather(-1, target[..., None]).squeeze(-1).mean(dim=(-2, -1))
    return exact + right


def accuracy(model: nn.Module, size: int = 256) -> float:
    """Fraction of exactly echoed tokens on fixed test prompts (greedy)."""
    test = prompts(2**31 - 1, 0, size)
    with torch.no_grad():
        tokens, _ = greedy(model, test, LENGTH)
    return float((tokens == test[:, :LENGTH]).float().mean())


class Echo(TorchESWorker):
    """Fine-tunes `model` (None: `tiny_llama()`) to echo its prompt."""

    default_config = ESConfig(
        population_size=64, sigma=0.02, learning_rate=0.01, optimizer="adam",
        perturbation="lowrank", rank=2,
    )  # fmt: skip
    model: str | None = None
    prompts_per_member = 32

    def __init__(self, *args: Any, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if model is not None:
            self.model = model

    def make_policy(self) -> nn.Module:
        return load_model(self.model)

    def score(
        self, policy: PopulationPolicy | LowRankPolicy, epoch: int, members: torch.Tensor
    ) -> torch.Tensor:
        prompt = prompts(self.config.seed, self.state.epoch, self.prompts_per_member)
        tokens, probs = greedy(policy, prompt.expand(len(members), *prompt.shape), LENGTH)
        return reward(prompt, tokens, probs)

    def evaluate_center(self, policy: nn.Module) -> float:
        """Exact-token accuracy of the greedy echo on 256 fixed test prompts."""
        return accuracy(policy.eval())


@dataclass
class Args:
    """Fine-tune a causal language model with distributed ES on this machine."""

    model: str | None = None
    """a save_pretrained directory or Hub id; default: a tiny random Llama"""
    es: ESConfig = Echo.default_config
    """the ES hyper-parameters (every ESConfig field)"""
    run: RunConfig = field(default_factory=lambda: RunConfig(max_epochs=300, eval_every=10))
    """workers, epochs, run directory, loggers; the center score is the echo accuracy"""


def run(args: Args) -> RunResult:
    tag = "lowrank" if args.es.perturbation == "lowrank" else "full"
    name = args.run.name or f"echo-{tag}-s{args.es.seed}"
    run_config = dataclasses.replace(args.run, name=name)
    return Trainer(Echo, args.es, run_config, {"model": args.model}).fit()


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(Args, args=argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the trainer said what the run directory kept
        return 130
    print(f"echo accuracy {result.last['center_score']:.4f} after {result.last['epoch']} epochs "
          f"({result.last['seconds']:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
