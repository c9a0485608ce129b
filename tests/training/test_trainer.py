"""The trainer (issue 5): exact resume, many SAEs per pass, 2-process gloo equivalence, non-finite guard,
W&B offline run, JSONL metrics."""
import dataclasses
import json
import weakref

import pytest
import torch
import torch.multiprocessing as mp

from saes import build_sae, load_sae
from training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from training.run import TrainConfig, train
from training.trainer import LoopConfig, NonFiniteLossError, Trainer, train_sae
from training.wandb_offline import offline_runs, read_history

HOOK = "blocks.1.hook_resid_post"


def job(cache_cfg, run_dir, **changes) -> TrainConfig:
    base = TrainConfig(cache=cache_cfg, hooks=[HOOK], k=[8], expansion=2,
                       batch_size=256, epochs=2, checkpoint_every=1024, wandb="off", run_dir=run_dir,
                       loop=LoopConfig(lr=1e-3, warmup_steps=5))
    return dataclasses.replace(base, **changes)


def weights(folder):
    sae = load_sae(folder)
    return {k: v.clone() for k, v in sae.state_dict().items()}


def interrupt_at_step_9(cfg: TrainConfig, model, monkeypatch) -> dict:
    """Run the job until Ctrl-C at step 9, restore the real step, and return the newest checkpoint's state."""
    real_step = Trainer.train_step

    def dies_at_step_9(self, batch):
        if self.step == 9:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, model=model, progress=False)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    return load_checkpoint(latest_checkpoint(cfg.run_dir))


def test_resume_is_bit_identical(tiny_model, tiny_cache, tiny_cache_cfg, tmp_path, monkeypatch):
    full = job(tiny_cache_cfg, tmp_path / "full")
    train(full, model=tiny_model, progress=False)
    interrupted = job(tiny_cache_cfg, tmp_path / "interrupted")
    at_interrupt = interrupt_at_step_9(interrupted, tiny_model, monkeypatch)
    assert at_interrupt["step"] == 8  # every 1024 tokens = 4 steps
    summary = train(interrupted, model=tiny_model, progress=False)["sae"]
    a, b = weights(full.run_dir), weights(interrupted.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary["steps"] == json.loads((full.run_dir / "summary.json").read_text())["steps"]
    lines = (interrupted.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(summary["steps"]))
    assert len(list_checkpoints(interrupted.run_dir)) == 2  # keep_checkpoints


def test_many_saes_per_pass_equal_separate_runs(tiny_model, tiny_cache, tiny_cache_cfg, tmp_path):
    sweep = job(tiny_cache_cfg, tmp_path / "sweep", k=[4, 8], architectures=["topk"], epochs=1)
    summaries = train(sweep, model=tiny_model, progress=False)
    assert set(summaries) == {"topk-k4-blocks_1_hook_resid_post", "topk-k8-blocks_1_hook_resid_post"}
    for k in (4, 8):
        alone = job(tiny_cache_cfg, tmp_path / f"alone{k}", k=[k], epochs=1)
        train(alone, model=tiny_model, progress=False)
        a = weights(tmp_path / "sweep" / f"topk-k{k}-blocks_1_hook_resid_post")
        b = weights(alone.run_dir)
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_model, tiny_cache, tiny_cache_cfg,
                                                                         tmp_path, monkeypatch):
    cfg = job(tiny_cache_cfg, tmp_path / "nan", epochs=1)
    real_step = Trainer.train_step

    def poisoned(self, batch):
        if self.step == 6:
            batch = {h: x * float("nan") for h, x in batch.items()}
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match=r"step 6.*last good checkpoint is .*step_00000004"):
        train(cfg, model=tiny_model, progress=False)
    good = load_checkpoint(latest_checkpoint(cfg.run_dir))
    assert all(torch.isfinite(t).all() for t in good["saes"]["sae"]["model"].values())


def test_wandb_offline_run_and_jsonl_agree(tiny_model, tiny_cache, tiny_cache_cfg, tmp_path):
    cfg = job(tiny_cache_cfg, tmp_path / "wb", wandb="offline", log_every=5, epochs=1)
    summary = train(cfg, model=tiny_model, progress=False)["sae"]
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == summary["steps"]
    assert {"loss", "mse", "fvu", "l0", "dead_frac", "lr", "tokens", "tokens_per_s", "data_s", "sae_s"} <= set(rows[0])
    (run_file,) = offline_runs(cfg.run_dir)
    config, history = read_history(run_file)
    assert config["architectures"] == ["topk"] and config["k"] == [8]
    logged = [row for row in history if "fvu" in row]
    assert [row["_step"] for row in logged] == [s for s in range(1, summary["steps"] + 1)
                                                if s % 5 == 0 or s == summary["steps"]]
    assert logged[-1]["fvu"] == pytest.approx(rows[-1]["fvu"])
    assert logged[-1]["per_token_l0/_type"] == "histogram"
    assert sum(logged[-1]["per_token_l0/values"]) == cfg.batch_size  # one count per token of the step
    density_counts = sum(logged[-1].get("log10_feature_density/values", []))  # latents that fired in the window
    assert density_counts + logged[-1].get("silent_latents", 0) == 2 * 64  # one count per latent (d_sae = 2 x 64)


def test_schedules_warm_up_sparsity_and_anneal_k():
    sae = build_sae("topk", d_in=8, d_sae=64, k=4)
    sae.sparsity_coef = 2.0
    t = Trainer({"a": (sae, "x")}, LoopConfig(lr=1e-3, warmup_steps=4, sparsity_warmup_steps=4, k_anneal_steps=4), 40)
    seen = []
    for _ in range(5):
        t.train_step({"x": torch.randn(32, 8)})
        seen.append((sae.cfg.k, sae.sparsity_coef, t.states["a"].optimizer.param_groups[0]["lr"]))
    assert [k for k, _, _ in seen] == [13, 10, 7, 4, 4]  # from min(4k, d_sae) = 16 down to 4
    assert [c for _, c, _ in seen] == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert [lr for _, _, lr in seen] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def _gloo_worker(rank: int, world: int, init_file: str, batches: list, result_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sae = build_sae("topk", d_in=16, d_sae=64, k=4, aux_k=0)
        trainer = Trainer({"a": (sae, "x")}, LoopConfig(lr=1e-2, warmup_steps=2, dead_tokens=64), len(batches))
        half = batches[0].shape[0] // world
        for batch in batches:
            trainer.train_step({"x": batch[rank * half:(rank + 1) * half]})
        if rank == 0:
            torch.save({"state": sae.state_dict(), "counter": trainer.states["a"].counter.tokens_since_fired},
                       result_file)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(128, 16, generator=generator) for _ in range(6)]
    single = build_sae("topk", d_in=16, d_sae=64, k=4, aux_k=0)
    trainer = Trainer({"a": (single, "x")}, LoopConfig(lr=1e-2, warmup_steps=2, dead_tokens=64), len(batches))
    for batch in batches:
        trainer.train_step({"x": batch})
    result = tmp_path / "rank0.pt"
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), batches, str(result)), nprocs=2, join=True)
    distributed = torch.load(result, weights_only=True)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(distributed["state"][name], value, atol=2e-6, rtol=1e-5)
    assert torch.equal(distributed["counter"], trainer.states["a"].counter.tokens_since_fired)


def test_on_the_fly_source_trains_through_the_same_interface(tiny_model, tiny_cache_cfg, tmp_path):
    cfg = job(tiny_cache_cfg, tmp_path / "live", source="model", epochs=1, checkpoint_every=0,
              cache=dataclasses.replace(tiny_cache_cfg, tokens=4096, out=None))
    summary = train(cfg, model=tiny_model, progress=False)["sae"]
    assert 10 <= summary["steps"] <= 4096 // 256  # fewer than 16: special tokens are masked out
    assert not (tiny_cache_cfg.out.parent / "live").exists() and "fvu" not in summary  # nothing cached
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    assert load_sae(cfg.run_dir).cfg.hook_name == HOOK


def test_non_finite_step_is_skipped_on_the_device_and_raised_at_the_next_read():
    """The guard costs no sync per step: a NaN step changes no weight or Adam moment, and the error (naming it) comes
    at the next read of the device flag, or from state_dict() before a checkpoint could hold anything after it."""
    sae = build_sae("topk", d_in=8, d_sae=32, k=4)
    trainer = Trainer({"a": (sae, "x")}, LoopConfig(lr=1e-3, warmup_steps=1), 20, sync_every=5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        trainer.train_step({"x": torch.randn(16, 8, generator=generator)})
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    optimizer = trainer.states["a"].optimizer
    moments = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in sae.parameters()]
    trainer.train_step({"x": torch.full((16, 8), float("nan"))})  # step 3: no error yet, nothing read back
    for name in ("W_enc", "b_enc", "b_dec"):
        assert torch.equal(sae.state_dict()[name], before[name]), name
    torch.testing.assert_close(sae.W_dec, before["W_dec"], atol=1e-6, rtol=0)  # renormalising unit rows again
    for p, saved in zip(sae.parameters(), moments):
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in saved.items())
    with pytest.raises(NonFiniteLossError, match="step 3"):
        trainer.state_dict()
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 3"):
        trainer.train_step({"x": torch.randn(16, 8, generator=generator)})  # step 4 ends at the read (every 5)


@pytest.mark.parametrize("architecture, fields", [
    ("topk", dict(k=4, multi_topk=True)), ("batchtopk", dict(k=4)), ("abstopk", dict(k=4)),
    ("hierarchical_topk", dict(k_max=4)), ("gradient_topk", dict(k=4))])
def test_training_steps_read_nothing_back_from_the_device(architecture, fields, monkeypatch):
    """Between reads (every sync_every steps) a step of the fast path, AuxK on dead latents included, never converts
    a tensor to a Python number: on a GPU nothing waits for the device."""
    sae = build_sae(architecture, d_in=8, d_sae=64, **fields)
    trainer = Trainer({"a": (sae, "x")}, LoopConfig(lr=1e-3, warmup_steps=1, dead_tokens=32), 50, sync_every=100)
    generator = torch.Generator().manual_seed(0)

    def batch():
        x = torch.randn(16, 8, generator=generator)
        return (x, torch.randn(16, 8, generator=generator)) if sae.uses_grad else x

    for _ in range(3):  # latents die after 32 tokens: AuxK runs from step 2 on
        trainer.train_step({"x": batch()})
    trainer.sync()

    def refuse(*args, **kwargs):
        raise AssertionError("a training step read a tensor back to the host")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    records = [trainer.train_step({"x": batch()})["a"] for _ in range(3)]
    monkeypatch.undo()
    assert "auxk" in records[-1] and bool(trainer.states["a"].counter.dead_mask.any())
    from training.trainer import to_host
    assert all(isinstance(v, (int, float)) for v in to_host(records)[-1].values())


@pytest.mark.parametrize("architecture, fields", [
    ("topk", dict(k=4)), ("hierarchical_topk", dict(k_max=4)),
    ("matryoshka_batchtopk", dict(k=4, group_sizes=[16, 48]))])
def test_reused_pre_activation_buffer_changes_no_weight(architecture, fields):
    """The trainer lends each SAE one [batch, d_sae] buffer for its fast-path pre-activations: training with it is
    bit-identical to fresh tensors, the buffer is reused while the batch size stays, and the SAE holds it only
    during the forward."""
    saes = [build_sae(architecture, d_in=8, d_sae=64, seed=1, **fields) for _ in range(2)]
    trainers = [Trainer({"a": (sae, "x")}, LoopConfig(lr=1e-3, warmup_steps=1, dead_tokens=32), 20) for sae in saes]
    trainers[1].states["a"].pre_acts_buffer = None  # the reference: a fresh tensor every step
    buffer = trainers[0].states["a"].pre_acts_buffer
    generator = torch.Generator().manual_seed(0)
    addresses = []
    for tokens in (16, 16, 12, 12, 16):  # AuxK from step 2 on; the buffer follows the batch size
        x = torch.randn(tokens, 8, generator=generator)
        for trainer in trainers:
            trainer.train_step({"x": x})
        assert buffer.tensor.shape == (tokens, 64) and saes[0].pre_acts_buffer is None
        addresses.append(buffer.tensor.data_ptr())
    assert addresses[0] == addresses[1] and addresses[2] == addresses[3]
    for name, value in saes[1].state_dict().items():
        assert torch.equal(saes[0].state_dict()[name], value), name


def test_train_sae_keeps_no_step_output_between_reads(monkeypatch):
    """Records wait for the next read (every sync_every steps) as device scalars: a step's output (codes, residual,
    selection) is freed by the next step, not kept until the read."""
    outputs = []
    train_step = Trainer.train_step

    def spy(self, batch):
        assert all(output() is None for output in outputs[:-1]), "an earlier step's output is still alive"
        records = train_step(self, batch)
        outputs.append(weakref.ref(records["sae"]._out))
        return records

    monkeypatch.setattr(Trainer, "train_step", spy)
    generator = torch.Generator().manual_seed(0)
    history = train_sae(build_sae("topk", d_in=8, d_sae=32, k=4), [torch.randn(16, 8, generator=generator)] * 6, 6,
                        progress=False, sync_every=100)
    assert len(outputs) == 6 and [row["step"] for row in history] == list(range(6))


def test_step_records_give_sparse_firings_and_per_token_l0():
    sae = build_sae("batchtopk", d_in=8, d_sae=32, k=3)
    trainer = Trainer({"a": (sae, "x")}, LoopConfig(lr=1e-3), 10)
    record = trainer.train_step({"x": torch.randn(24, 8)})["a"]
    codes = record["_codes"]
    assert codes.shape == (24, 32) and int((codes != 0).sum()) <= 3 * 24
    assert torch.equal(record["_fired"], (codes != 0).sum(0))
    assert torch.equal(record["_l0"], (codes != 0).sum(-1))
    assert not any(key.startswith("_") for key in json.loads(json.dumps(to_plain(record))))


def to_plain(record):
    from training.trainer import to_host

    return to_host([record])[0]
