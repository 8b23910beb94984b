"""Fine-tuning a Hugging Face model (a tiny randomly initialised Llama, saved and loaded the way
a pretrained checkpoint is) by low-rank ES through the embedded server and two worker processes:
the population's batched greedy decoding gives every member what its own model would, with no
cache shared between members; the reward improves; the export is a plain state dict."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evochi_torch import ESConfig
from evochi_torch.cli import main as cli_main
from evochi_torch.codec import save_state_dict
from evochi_torch.harness import RunConfig
from evochi_torch.lowrank import noise_for
from evochi_torch.lowrank_policy import LowRankPolicy
from evochi_torch.population import PopulationPolicy, flatten_params, load_flat
from examples.finetune.finetune import LENGTH, Args, accuracy, greedy, prompts, run, tiny_llama


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(3)
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    return path


def _members(model, config: ESConfig, count: int):
    center = flatten_params(model)
    table = noise_for(config, [tuple(p.shape) for p in model.parameters()])
    offsets = torch.arange(count) * 977
    signs = torch.where(torch.arange(count) % 2 == 0, 1.0, -1.0)
    return center, table, offsets, signs


def test_batched_greedy_decoding_gives_each_member_its_own_generate(checkpoint) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    config = ESConfig(population_size=8, sigma=0.5, perturbation="lowrank", rank=2)
    center, table, offsets, signs = _members(model, config, 6)
    members = torch.arange(6)
    policy = LowRankPolicy(model, center, table, offsets, signs, config.sigma, members)
    prompt = prompts(0, 0, 5)
    tokens, _ = greedy(policy, prompt.expand(6, *prompt.shape), LENGTH)
    # sigma 0.5 makes the members decode differently: a cache or weights shared between
    # members would show here.
    assert len({tuple(t.flatten().tolist()) for t in tokens}) > 1
    explicit = table.materialize(center, offsets, signs, config.sigma, members)
    for b in range(6):
        own = load_flat(tiny_llama().eval(), explicit[b])
        with torch.no_grad():
            generated = own.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=LENGTH,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        assert torch.equal(tokens[b], generated[:, -LENGTH:]), b
        torch.testing.assert_close(
            policy.member(b)(prompt).logits, own(prompt).logits, atol=1e-4, rtol=1e-4
        )


def test_population_policy_passes_options_and_gives_members(checkpoint) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    params = flatten_params(model)[None].repeat(3, 1)
    params[1] += 0.05 * torch.randn(params.shape[1], generator=torch.Generator().manual_seed(0))
    policy = PopulationPolicy(model, params)
    x = prompts(1, 0, 2)
    out = policy(x.expand(3, *x.shape), use_cache=False)
    assert out.past_key_values is None
    with torch.no_grad():
        for b in range(3):
            expected = load_flat(tiny_llama().eval(), params[b])(x).logits
            torch.testing.assert_close(out.logits[b], expected, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(policy.member(b)(x).logits, expected)
    with pytest.raises(IndexError, match="member 3 of a batch of 3"):
        policy.member(3)


@pytest.mark.timeout(300)
def test_finetuning_a_saved_checkpoint_improves_and_exports_a_state_dict(
    checkpoint, tmp_path
) -> None:
    before = accuracy(AutoModelForCausalLM.from_pretrained(checkpoint).eval())
    args = Args(
        model=str(checkpoint),
        run=RunConfig(max_epochs=40, eval_every=20, runs_dir=tmp_path / "runs", quiet=True),
    )
    result = run(args)
    assert result.state.config.perturbation == "lowrank"
    assert not result.crashed
    after = result.last["center_score"]
    assert after >= before + 0.05, (before, after)
    rewards = [row["reward_mean"] for row in result.rows]
    assert max(rewards[-5:]) > max(rewards[:5]) + 0.03, rewards

    out = tmp_path / "model.safetensors"
    worker = "examples.finetune:Echo"
    assert cli_main(["export", str(result.run_dir), str(out), "--state-dict", worker]) == 0
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    model.load_state_dict(load_file(out))
    assert torch.equal(flatten_params(model), result.state.params)
    assert accuracy(model) == pytest.approx(after)


def test_a_tied_head_exports_as_a_state_dict_the_model_loads(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = tiny_llama()
    config = base.config
    config.tie_word_embeddings = True
    tied = LlamaForCausalLM(config).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    path = save_state_dict(tmp_path / "tied.safetensors", tied, epoch=7)
    fresh = LlamaForCausalLM(config).eval()
    fresh.load_state_dict(load_file(path))
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(flatten_params(fresh), flatten_params(tied))


def test_gpt2_conv1d_weights_take_the_shared_path(caplog, monkeypatch) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from evochi_torch import lowrank_policy

    monkeypatch.setattr(lowrank_policy, "_WARNED", set())  # warned once per process

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                        attn_implementation="eager")  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    for rank in (1, 3):
        es = ESConfig(population_size=8, sigma=0.1, perturbation="lowrank", rank=rank)
        center, table, offsets, signs = _members(model, es, 4)
        members = torch.arange(4)
        policy = LowRankPolicy(model, center, table, offsets, signs, es.sigma, members)
        x = torch.randint(0, 32, (4, 2, 6))
        with caplog.at_level("WARNING", logger="evochi_torch.lowrank"):
            out = policy(x, use_cache=False).logits
        assert "materialised" not in caplog.text
        explicit = table.materialize(center, offsets, signs, es.sigma, members)
        for b in range(4):
            own = load_flat(GPT2LMHeadModel(config).eval(), explicit[b])
            with torch.no_grad():
                torch.testing.assert_close(out[b], own(x[b]).logits, atol=1e-4, rtol=1e-4)
