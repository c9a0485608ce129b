"""One trainer for every registered SAE variant, and for several SAEs trained on the same batches.

Per step and per SAE (docs/methods.md §1.3-§1.6): LR warm-up and linear decay, optional sparsity-coefficient
warm-up (variants with a `sparsity_coef`) and k-annealing (variants with a `k`), forward (bf16 autocast on GPU,
fp32 master weights), non-finite guard, backward, gradient averaging across ranks, the variant's
`after_backward` (gradient projection), clipping, Adam (each variant's paper betas), `after_step` (decoder
renormalisation, firing-rate EMAs), and dead latents counted in tokens (§1.4) feeding AuxK (§1.5).
Batch-dependent variants get their inference threshold calibrated on training batches once training ends (§3.1).
All state needed for a bit-identical resume is in `state_dict()`.
"""
import math
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saes.base import SAE
from saes.thresholds import DEFAULT_CALIBRATION_BATCHES, ThresholdCalibrator
from training import distributed as dist


@dataclass
class LoopConfig:
    lr: float | None = None
    """Adam learning rate; None uses 2e-4 / sqrt(d_sae / 2^14) (docs/methods.md §1.6)."""
    warmup_steps: int = 1000
    """Linear LR warm-up, capped at 10% of the run."""
    decay_start: float = 0.8
    """Fraction of the run after which the LR decays linearly to 0."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens is dead (§1.4)."""
    sparsity_warmup_steps: int = 0
    """Steps over which a variant's sparsity coefficient (JumpReLU, ReLU+L1) ramps from 0 to its value."""
    k_anneal_steps: int = 0
    """Steps over which k anneals linearly from min(4k, d_sae) down to k (TopK family); 0 disables."""
    autocast: str = "auto"
    """'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16' or 'off'. Master weights stay fp32."""
    compile: bool = False
    """torch.compile each SAE's forward."""
    adam_betas: tuple[float, float] | None = None
    """Adam (beta1, beta2); None uses each variant's paper defaults (JumpReLU (0.0, 0.999), others (0.9, 0.999))."""
    calibration_batches: int = DEFAULT_CALIBRATION_BATCHES
    """Training batches, with the final weights frozen, that calibrate the inference threshold of batch-dependent
    variants (BatchTopK, Mutual/Feature Choice, batch AbsTopK; §3.1)."""

    def validate(self) -> None:
        if self.calibration_batches <= 0:
            raise ValueError(f"--loop.calibration-batches must be positive, got {self.calibration_batches}.")
        if self.adam_betas is not None and not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"--loop.adam-betas must both lie in [0, 1), got {self.adam_betas}.")


def default_lr(d_sae: int) -> float:
    return 2e-4 / math.sqrt(d_sae / 2**14)


def lr_factor(step: int, total: int, warmup: int, decay_start: float) -> float:
    """Multiplier of the base LR at `step` (0-based) of `total` steps."""
    warmup = min(warmup, max(total // 10, 1))
    if step < warmup:
        return (step + 1) / warmup
    start = int(decay_start * total)
    if step >= start and total > start:
        return max(0.0, (total - step) / (total - start))
    return 1.0


def ramp(step: int, steps: int) -> float:
    """0 -> 1 linearly over `steps` steps (1 when steps is 0)."""
    return 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)


class DeadLatentCounter:
    """tokens_since_fired per latent (§1.4); a latent fires when its code is non-zero (signed codes included)."""

    def __init__(self, d_sae: int, threshold: int, device: torch.device | str = "cpu"):
        self.threshold = threshold
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, codes: Tensor) -> None:
        """codes: [batch, d_sae]. Across ranks, fired latents and token counts are combined first."""
        fired = (codes != 0).any(0)
        tokens = codes.shape[0]
        if dist.is_distributed():
            fired, tokens = dist.combine_fired(fired, tokens)
        self.tokens_since_fired += tokens
        self.tokens_since_fired[fired] = 0

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.threshold


class NonFiniteLossError(FloatingPointError):
    def __init__(self, name: str, step: int, value: float):
        super().__init__(
            f"The loss of SAE {name!r} became {value} at step {step}; training stopped before updating the weights. "
            "Lower --loop.lr (or raise --loop.warmup-steps) and resume from the last good checkpoint."
        )
        self.step = step


class SAEState:
    """One SAE with its optimiser, dead-latent counter and the hook it reads."""

    def __init__(self, name: str, sae: SAE, hook: str, cfg: LoopConfig, total_steps: int):
        self.name, self.sae, self.hook = name, sae, hook
        self.base_lr = cfg.lr if cfg.lr is not None else default_lr(sae.cfg.d_sae)
        fused = sae.W_dec.is_cuda
        betas = tuple(cfg.adam_betas) if cfg.adam_betas is not None else sae.adam_betas
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=self.base_lr, betas=betas, fused=fused or None)
        self.counter = DeadLatentCounter(sae.cfg.d_sae, cfg.dead_tokens, device=sae.W_dec.device)
        # k-annealing moves the training budget `k`; HierarchicalTopK trains every prefix up to k_max (its `k` is
        # only the inference budget), so it has nothing to anneal.
        self.target_k = None if hasattr(sae.cfg, "k_max") else getattr(sae.cfg, "k", None)
        self.target_sparsity = getattr(sae, "sparsity_coef", None)
        self.forward = torch.compile(sae) if cfg.compile else sae
        self.seconds = 0.0  # time spent in this SAE's steps (its share of a multi-SAE pass)


class Trainer:
    """Trains several SAEs on the same stream of batches; each batch is {hook: x or (x, grad)}."""

    def __init__(self, saes: dict[str, tuple[SAE, str]], cfg: LoopConfig, total_steps: int):
        self.cfg, self.total_steps, self.step = cfg, total_steps, 0
        self.tokens = 0
        self.states = {name: SAEState(name, sae, hook, cfg, total_steps) for name, (sae, hook) in saes.items()}
        device = next(iter(self.states.values())).sae.W_dec.device
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast use TF32
        use_bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
        self.timings = {"sae_seconds": 0.0}

    def _schedule(self, state: SAEState) -> None:
        """Set this step's LR, sparsity coefficient and k."""
        factor = lr_factor(self.step, self.total_steps, self.cfg.warmup_steps, self.cfg.decay_start)
        for group in state.optimizer.param_groups:
            group["lr"] = state.base_lr * factor
        if state.target_sparsity is not None:
            state.sae.sparsity_coef = state.target_sparsity * ramp(self.step, self.cfg.sparsity_warmup_steps)
        if state.target_k is not None and self.cfg.k_anneal_steps > 0:
            start_k = min(4 * state.target_k, state.sae.cfg.d_sae)
            progress = ramp(self.step, self.cfg.k_anneal_steps)
            state.sae.cfg.k = round(start_k + (state.target_k - start_k) * progress)

    def train_step(self, batch: dict[str, Tensor | tuple[Tensor, Tensor]]) -> dict[str, dict[str, float]]:
        """One optimiser step of every SAE on its hook's part of the batch; returns per-SAE records."""
        started = time.perf_counter()
        records = {}
        n_tokens = 0
        for name, state in self.states.items():
            state_started = time.perf_counter()
            x, grad = as_pair(batch[state.hook])
            n_tokens = x.shape[0]
            self._schedule(state)
            with self.autocast:
                out = state.forward(x, dead_mask=state.counter.dead_mask, grad=grad)
            loss = out.loss.float()
            if not torch.isfinite(loss):
                raise NonFiniteLossError(name, self.step, loss.item())
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(state.sae)
            state.sae.after_backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(state.sae.parameters(), self.cfg.grad_clip)
            state.optimizer.step()
            state.sae.after_step()
            dist.average_buffers(state.sae)
            codes = out.codes.detach()
            state.counter.update(codes)
            records[name] = {
                "step": self.step, "loss": loss.item(), **{k: v.item() for k, v in out.losses.items()},
                **{k: v.item() for k, v in out.metrics.items()},
                "dead_frac": state.counter.dead_mask.float().mean().item(),
                "lr": state.optimizer.param_groups[0]["lr"],
            }
            records[name]["_codes"] = codes  # for histograms; dropped before writing
            state.seconds += time.perf_counter() - state_started
        self.step += 1
        self.tokens += n_tokens * dist.world_size()
        for record in records.values():
            record["tokens"] = self.tokens
        self.timings["sae_seconds"] += time.perf_counter() - started
        return records

    # ---- exact resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step, "tokens": self.tokens, "total_steps": self.total_steps,
            "rng": torch.get_rng_state(),
            "saes": {name: {"model": s.sae.state_dict(), "cfg": s.sae.cfg.to_dict(),
                            "optimizer": s.optimizer.state_dict(),
                            "tokens_since_fired": s.counter.tokens_since_fired.clone()}
                     for name, s in self.states.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        torch.set_rng_state(state["rng"])
        for name, saved in state["saes"].items():
            s = self.states[name]
            s.sae.load_state_dict(saved["model"])
            s.optimizer.load_state_dict(saved["optimizer"])
            s.counter.tokens_since_fired.copy_(saved["tokens_since_fired"])


def as_pair(batch: Tensor | tuple) -> tuple[Tensor, Tensor | None]:
    """Batches are a tensor x [batch, d_in] or a pair (x, grad) for variants that need gradients."""
    if isinstance(batch, Tensor):
        return batch, None
    x, grad = batch
    return x, grad


def train_sae(
    sae: SAE,
    batches: Iterable[Tensor | tuple[Tensor, Tensor]],
    steps: int,
    cfg: LoopConfig | None = None,
    *,
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
    calibration_batches: Iterable[Tensor | tuple[Tensor, Tensor]] | None = None,
) -> list[dict[str, float]]:
    """Train one SAE in place on an iterable of batches for `steps` steps; returns the per-step records.

    A batch-dependent SAE then has its inference threshold calibrated (§3.1) on `calibration_batches`, else on
    `batches` again when it can be iterated twice (a list, a DataLoader), else on what is left of the iterator;
    with no batch left it raises instead of returning an SAE that cannot infer.
    """
    cfg = cfg or LoopConfig()
    cfg.validate()
    trainer = Trainer({"sae": (sae, "x")}, cfg, steps)
    history: list[dict[str, float]] = []
    iterator: Iterator = iter(batches)
    bar = tqdm(range(steps), desc=f"train {sae.architecture}", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        try:
            batch = next(iterator)
        except StopIteration:
            break
        record = trainer.train_step({"x": batch})["sae"]
        record.pop("_codes")
        history.append(record)
        if on_step is not None:
            on_step(record)
        bar.set_postfix(loss=f"{record['loss']:.4g}", fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}")
    if sae.batch_dependent:
        if calibration_batches is None:
            calibration_batches = batches if iter(batches) is not batches else iterator
        calibrator = ThresholdCalibrator(sae)
        for batch in islice(calibration_batches, cfg.calibration_batches):
            calibrator.observe(batch)
        if calibrator.batches == 0:
            raise ValueError(f"train_sae has no batch left to calibrate the {sae.architecture} inference threshold "
                             "on: pass calibration_batches=... (a few training batches) or a re-iterable `batches`.")
        calibrator.finish()
    return history
