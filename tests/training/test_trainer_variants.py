"""The trainer across the whole family (issue 12): exact resume of every registered architecture with dead latents,
AuxK and k-annealing active; the inference budget of every batch-dependent variant; the trainer's dead-latent
counter, Adam betas, RNG restore, Feature Choice's k-annealed capacities and firing-rate EMA, all against
references recomputed here."""

import pytest
import torch

from saes import ARCHITECTURES, build_sae
from tests.training.test_trainer import HOOK, interrupt_at_step_9, job
from training.caching import CacheConfig, cache_activations
from training.checkpoint import latest_checkpoint, load_checkpoint
from training.run import train
from training.trainer import DeadLatentCounter, LoopConfig, Trainer

RESUME_LOOP = LoopConfig(lr=1e-3, warmup_steps=5, dead_tokens=512, k_anneal_steps=10, sparsity_warmup_steps=10)
"""512 tokens = 2 batches: latents die early, so AuxK acts; k anneals and the sparsity coefficient warms up across
the interruption."""


@pytest.fixture(scope="module")
def grad_cache_cfg(tiny_model, tmp_path_factory):
    """A 4-shard cache with gradients: gradient_topk trains from it, every other variant ignores them."""
    cfg = CacheConfig(model="tiny", hooks=[HOOK], tokens=6144, context_length=64, shard_tokens=1536, gradients=True,
                      out=tmp_path_factory.mktemp("gcache") / "tiny")
    cache_activations(cfg, model=tiny_model, progress=False)
    return cfg


def final_state(run_dir) -> dict:
    """Every tensor of the final checkpoint: parameters and buffers (thresholds, EMAs), optimiser moments, counter."""
    state = load_checkpoint(latest_checkpoint(run_dir))["saes"]["sae"]
    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    tensors["tokens_since_fired"] = state["tokens_since_fired"]
    for index, moments in state["optimizer"]["state"].items():
        tensors |= {f"adam.{index}.{k}": v for k, v in moments.items()}
    return tensors


SMALL_PENALTY = {"jumprelu": {"sparsity_coef": "0.01"}, "relu_l1": {"l1_coef": "0.01"}}
RESUME_CASES = [pytest.param(name, SMALL_PENALTY.get(name, {}), id=name) for name in sorted(ARCHITECTURES)] + [
    pytest.param("feature_choice", {"aux_zipf": "true", "capacity": "zipf"}, id="feature_choice-aux_zipf")]


@pytest.mark.parametrize("architecture, options", RESUME_CASES)
def test_every_architecture_resumes_bit_identically(architecture, options, tiny_model, grad_cache_cfg, tmp_path,
                                                    monkeypatch):
    def cfg(name):
        return job(grad_cache_cfg, tmp_path / name, architectures=[architecture], epochs=1, loop=RESUME_LOOP,
                   expansion=16, k=[2],  # 1024 latents, 2 per token: hundreds are dead by the interruption
                   sae_options=options)

    full = cfg("full")
    train(full, model=tiny_model, progress=False)
    interrupted = cfg("interrupted")
    at_interrupt = interrupt_at_step_9(interrupted, tiny_model, monkeypatch)
    assert at_interrupt["step"] == 8
    counter = at_interrupt["saes"]["sae"]["tokens_since_fired"]
    if architecture not in ("feature_choice", "jumprelu", "relu_l1"):  # no AuxK, or every latent gets tokens
        assert bool((counter >= RESUME_LOOP.dead_tokens).any()), "no dead latent at the interruption: AuxK idle"
    train(interrupted, model=tiny_model, progress=False)
    a, b = final_state(full.run_dir), final_state(interrupted.run_dir)
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{architecture}: resumed run differs in {different}"


BATCH_DEPENDENT = [("batchtopk", {}), ("mutual_choice", {}), ("abstopk", {"selection": "batch"}),
                   ("feature_choice", {})]


@pytest.mark.parametrize("architecture, options", BATCH_DEPENDENT, ids=[a for a, _ in BATCH_DEPENDENT])
def test_default_training_infers_at_k_on_held_out_tokens(architecture, options, tiny_model, tiny_cache,
                                                         tiny_cache_cfg, tmp_path):
    """Issue 12 §1: `train` with default loop settings gives held-out L0 within ±10 % of k (120 steps here)."""
    cfg = job(tiny_cache_cfg, tmp_path / architecture, architectures=[architecture], k=[16], expansion=4, epochs=5,
              loop=LoopConfig(), checkpoint_every=0, sae_options={k: f'"{v}"' for k, v in options.items()})
    summary = train(cfg, model=tiny_model, progress=False)["sae"]
    assert summary["steps"] >= 100 and summary["eval_split"] == "held-out shards"
    assert abs(summary["l0"] - 16) <= 0.1 * 16, f"{architecture}: held-out L0 {summary['l0']:.2f} at k=16"


def test_dead_latent_counter_inside_the_trainer_counts_tokens_since_firing():
    sae = build_sae("topk", d_in=8, d_sae=32, k=2)
    trainer = Trainer({"a": (sae, "x")}, LoopConfig(lr=1e-3, dead_tokens=40), 10)
    generator = torch.Generator().manual_seed(0)
    reference = torch.zeros(32, dtype=torch.long)
    for step in range(6):
        codes = trainer.train_step({"x": torch.randn(16, 8, generator=generator)})["a"]["_codes"]
        fired = (codes != 0).any(0)
        reference = torch.where(fired, 0, reference + 16)  # reference: tokens since each latent last fired
        assert torch.equal(trainer.states["a"].counter.tokens_since_fired, reference)
    assert torch.equal(trainer.states["a"].counter.dead_mask, reference >= 40)


def test_dead_mask_boundary_is_at_the_threshold():
    counter = DeadLatentCounter(d_sae=3, threshold=20)
    counter.update(torch.tensor([[1.0, 0.0, 0.0]] * 10))
    assert counter.dead_mask.tolist() == [False, False, False]  # 10 tokens without firing: alive
    counter.update(torch.tensor([[1.0, 1.0, 0.0]] * 10))
    assert counter.tokens_since_fired.tolist() == [0, 0, 20]
    assert counter.dead_mask.tolist() == [False, False, True]  # exactly 20 tokens: dead (>=, §1.4)


def test_auxk_gradient_reaches_only_dead_latents():
    sae = build_sae("topk", d_in=8, d_sae=32, k=2, aux_k=4)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 17, 30]] = True
    out = sae(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) + 1, dead_mask=dead)
    out.losses["auxk"].backward()
    rows = sae.W_dec.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert rows and set(rows) <= {3, 17, 30}


def test_adam_betas_follow_the_variant_unless_overridden():
    jump = build_sae("jumprelu", d_in=8, d_sae=16)
    topk = build_sae("topk", d_in=8, d_sae=16, k=2)
    trainer = Trainer({"j": (jump, "x"), "t": (topk, "x")}, LoopConfig(), 10)
    assert trainer.states["j"].optimizer.param_groups[0]["betas"] == (0.0, 0.999)  # Rajamanoharan et al.
    assert trainer.states["t"].optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    chosen = Trainer({"j": (jump, "x")}, LoopConfig(adam_betas=(0.5, 0.9)), 10)
    assert chosen.states["j"].optimizer.param_groups[0]["betas"] == (0.5, 0.9)


def test_trainer_state_restores_the_global_rng():
    trainer = Trainer({"a": (build_sae("topk", d_in=8, d_sae=16, k=2), "x")}, LoopConfig(), 10)
    torch.manual_seed(123)
    state = trainer.state_dict()
    expected = torch.rand(4)
    torch.manual_seed(999)
    trainer.load_state_dict(state)
    assert torch.equal(torch.rand(4), expected)


def test_feature_choice_capacities_follow_k_annealing():
    sae = build_sae("feature_choice", d_in=8, d_sae=32, k=2)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive: each latent fills its capacity, so L0 = k exactly
    trainer = Trainer({"a": (sae, "x")}, LoopConfig(lr=1e-4, k_anneal_steps=4), 20)
    seen = [trainer.train_step({"x": torch.randn(64, 8)})["a"]["l0"] for _ in range(5)]
    assert seen == [6.0, 5.0, 4.0, 2.0, 2.0]  # round(8 - 6 (step + 1) / 4), half to even: 6.5 -> 6, 3.5 -> 4


def test_aux_zipf_firing_frequency_is_an_ema_of_training_rates():
    sae = build_sae("feature_choice", d_in=8, d_sae=32, k=2, capacity="zipf", aux_zipf=True, aux_zipf_decay=0.9)
    trainer = Trainer({"a": (sae, "x")}, LoopConfig(lr=1e-3), 10)
    generator = torch.Generator().manual_seed(0)
    reference = None
    for _ in range(4):
        record = trainer.train_step({"x": torch.randn(64, 8, generator=generator)})["a"]
        rate = (record["_codes"] != 0).float().mean(0)  # share of the batch's tokens each latent kept
        reference = rate if reference is None else 0.9 * reference + 0.1 * rate
        torch.testing.assert_close(sae.firing_freq, reference)
