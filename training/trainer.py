"""One trainer for every registered SAE variant, and for several SAEs trained on the same batches.

Per step and per SAE (docs/methods.md §1.3-§1.6): LR warm-up and linear decay, optional sparsity-coefficient
warm-up (variants with a `sparsity_coef`) and k-annealing (variants with a `k`), forward (bf16 autocast on GPU,
fp32 master weights; the TopK family on its fast path, saes/sparse_topk.py), backward with the gradient all-reduce
bucketed and overlapped (DistributedDataParallel when distributed), the variant's `after_backward` (gradient
projection), clipping and Adam in one fused step (each variant's paper betas), `after_step` (decoder
renormalisation, firing-rate EMAs), and dead latents counted in tokens (§1.4) feeding AuxK (§1.5).

Nothing in a step waits for the device: losses and metrics come back as 0-dim device tensors (the logger reads them
in batches), the dead-latent counter stays on the device, and the non-finite guard is a device flag. A step whose
loss or gradient norm is not finite is skipped by the fused Adam step (no weight or moment changes); the flag is read
every `sync_every` steps and whenever a checkpoint is taken (`state_dict`), which then raises NonFiniteLossError
naming the first such step, so a checkpoint never holds weights that saw it.
Batch-dependent variants get their inference threshold calibrated on training batches once training ends (§3.1).
All state needed for a bit-identical resume is in `state_dict()`.
"""
import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saes import sparse_topk as fast

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
    """tokens_since_fired per latent (§1.4); a latent fires when its code is non-zero (signed codes included).

    Kept on the device. A host-side upper bound of the largest count (exact after `refresh`, then grown by each
    step's tokens) lets `dead_mask_if_any` say "no latent can be dead" without reading the device."""

    def __init__(self, d_sae: int, threshold: int, device: torch.device | str = "cpu"):
        self.threshold = threshold
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.silent_bound = 0

    def update(self, codes: Tensor) -> None:
        """codes: dense [batch, d_sae]. Across ranks, fired latents and token counts are combined first."""
        self.update_fired((codes != 0).any(0), codes.shape[0])

    def update_sparse(self, selection: fast.Selection, values: Tensor) -> Tensor:
        """Codes as `values` at the pairs of `selection` (fast path); returns this batch's firings per latent [d_sae]."""
        with fast.serial(values.device):
            counts = selection.latent_total((values != 0).long())
        self.update_fired(counts > 0, selection.batch)
        return counts

    def update_fired(self, fired: Tensor, tokens: int) -> None:
        """fired: bool [d_sae], the latents non-zero on at least one of this rank's `tokens` tokens."""
        if dist.is_distributed():
            fired, tokens = dist.combine_fired(fired, tokens)
        self.tokens_since_fired += tokens
        self.tokens_since_fired.masked_fill_(fired, 0)  # not index_put with a mask: that waits for the device
        self.silent_bound += tokens

    def refresh(self) -> None:
        """Read the largest count back (one device sync), tightening the bound."""
        self.silent_bound = int(self.tokens_since_fired.max()) if self.tokens_since_fired.numel() else 0

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.threshold

    def dead_mask_if_any(self) -> Tensor | None:
        """The dead mask, or None when the bound proves that no latent is dead (no AuxK to compute)."""
        return self.dead_mask if self.silent_bound >= self.threshold else None


class NonFiniteLossError(FloatingPointError):
    def __init__(self, name: str, step: int, value: float, stopped_at: int | None = None):
        what = f"became {value}" if not math.isfinite(value) else f"was {value} but its gradient was not finite"
        later = "" if stopped_at is None or stopped_at <= step + 1 else \
            f" (the steps after it up to {stopped_at - 1} were skipped too if they were not finite)"
        super().__init__(
            f"The loss of SAE {name!r} {what} at step {step}; that step was skipped without updating the weights"
            f"{later} and training stopped before a checkpoint could hold it. Lower --loop.lr (or raise "
            "--loop.warmup-steps) and resume from the last good checkpoint."
        )
        self.step = step


class StepRecord(dict):
    """One SAE's record of one step: step, lr, tokens, loss, each loss term, metrics and dead_frac.

    The losses and metrics are held as 0-dim device tensors: `items()`, `to_host` and the logger read them in
    batches, many steps in one transfer. Indexing (`record["fvu"]`, `.get`) gives a Python number, which reads the
    device there and then: fine now and then, not every step on a GPU.
    Three keys are built on first use and never logged: "_codes" (dense codes [batch, d_sae]; the fast path keeps
    only values and indices), "_fired" (firings per latent in this batch, [d_sae]) and "_l0" (per-token L0 [batch])."""

    def __init__(self, values: dict, out, fired: Tensor | None):
        super().__init__(values)
        self._out, self._fired = out, fired

    def __getitem__(self, key: str):
        value = super().__getitem__(key)
        return value.item() if isinstance(value, Tensor) and value.ndim == 0 else value

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    def __missing__(self, key: str):
        out = self._out
        if key == "_codes":
            value = out.codes.detach()
        elif key == "_fired":
            value = self._fired if self._fired is not None else (self["_codes"] != 0).sum(0)
        elif key == "_l0":
            if out.selection is not None:
                value = out.selection.token_sum((out.values.detach() != 0).long())
            else:
                value = (self["_codes"] != 0).sum(-1)
        else:
            raise KeyError(key)
        self[key] = value
        return value


def to_host(records: list[dict]) -> list[dict]:
    """Plain-number copies of records (keys starting with "_" dropped), every tensor read in one transfer."""
    plain = [{k: v for k, v in record.items() if not k.startswith("_")} for record in records]
    slots = [(i, k) for i, record in enumerate(plain) for k, v in record.items() if isinstance(v, Tensor)]
    if slots:
        stacked = torch.stack([plain[i][k].detach().reshape(()).to("cpu", torch.float64) for i, k in slots])
        for (i, k), value in zip(slots, stacked.tolist()):
            plain[i][k] = value
    return plain


class SAEState:
    """One SAE with its optimiser, dead-latent counter, the hook it reads and its non-finite flag."""

    def __init__(self, name: str, sae: SAE, hook: str, cfg: LoopConfig, total_steps: int):
        self.name, self.sae, self.hook = name, sae, hook
        self.base_lr = cfg.lr if cfg.lr is not None else default_lr(sae.cfg.d_sae)
        self.betas = tuple(cfg.adam_betas) if cfg.adam_betas is not None else sae.adam_betas
        self.params = [p for p in sae.parameters() if p.requires_grad]
        self.optimizer, self.fused = make_adam(self.params, self.base_lr, self.betas)
        device = sae.W_dec.device
        self.counter = DeadLatentCounter(sae.cfg.d_sae, cfg.dead_tokens, device=device)
        # k-annealing moves the training budget `k`; HierarchicalTopK trains every prefix up to k_max (its `k` is
        # only the inference budget), so it has nothing to anneal.
        self.target_k = None if hasattr(sae.cfg, "k_max") else getattr(sae.cfg, "k", None)
        self.target_sparsity = getattr(sae, "sparsity_coef", None)
        module = dist.wrap(sae)  # DDP when distributed: bucketed gradient all-reduce overlapped with backward
        self.bucketed = module is not sae
        self.forward = torch.compile(module) if cfg.compile else module
        self.pre_acts_buffer = None if cfg.compile else fast.PreActsBuffer()  # reused by each step's forward
        self.seconds = 0.0  # time spent in this SAE's steps (its share of a multi-SAE pass)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step whose loss was not finite
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)

    def lend_buffer(self):
        """The fast path's pre-activations go into this SAE's reused buffer during the forward (the step drops
        `pre_acts` right after it)."""
        if self.pre_acts_buffer is None:
            return contextlib.nullcontext()
        return fast.lend_pre_acts_buffer(self.sae, self.pre_acts_buffer)

    def optimizer_step(self, loss: Tensor, grad_clip: float) -> Tensor:
        """Clip the global gradient norm and take the Adam step, skipping it when the loss or the norm is not
        finite; returns that flag (a device bool) without waiting for the device."""
        finite = torch.isfinite(loss)
        grads = [p.grad for p in self.params if p.grad is not None]
        scale = None
        if grad_clip > 0 and grads:
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # clip_grad_norm_'s norm
            finite = finite & torch.isfinite(total)
            scale = (grad_clip / (total + 1e-6)).clamp(max=1.0)
        if self.fused:  # one pass: the fused kernel divides by grad_scale and skips the step when found_inf is 1
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.grad_scale = None if scale is None else (1.0 / scale).float()
            self.optimizer.step()
        else:  # no fused Adam on this device: clip in place, and read the flag (a sync) to skip a bad step
            if scale is not None:
                torch._foreach_mul_(grads, scale)
            if bool(finite):
                self.optimizer.step()
        return finite


def make_adam(params: list, lr: float, betas: tuple[float, float]) -> tuple[torch.optim.Adam, bool]:
    """Fused Adam where PyTorch has it (CPU and CUDA): one pass over each tensor, gradient clipping folded in as
    grad_scale and a non-finite step skipped on the device (found_inf); else the foreach implementation."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True), True
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=betas), False


class Trainer:
    """Trains several SAEs on the same stream of batches; each batch is {hook: x or (x, grad)}.

    `sync_every`: steps between the reads of the device flags (non-finite guard, dead-latent bound); the CLI passes
    its --log-every."""

    def __init__(self, saes: dict[str, tuple[SAE, str]], cfg: LoopConfig, total_steps: int, sync_every: int = 10):
        self.cfg, self.total_steps, self.step = cfg, total_steps, 0
        self.sync_every = max(1, sync_every)
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

    def train_step(self, batch: dict[str, Tensor | tuple[Tensor, Tensor]]) -> dict[str, StepRecord]:
        """One optimiser step of every SAE on its hook's part of the batch; returns per-SAE records whose losses and
        metrics are device tensors (`to_host` reads them). Waits for the device only every `sync_every` steps."""
        started = time.perf_counter()
        records = {}
        n_tokens = 0
        for name, state in self.states.items():
            state_started = time.perf_counter()
            x, grad = as_pair(batch[state.hook])
            n_tokens = x.shape[0]
            self._schedule(state)
            with self.autocast, state.lend_buffer():
                out = state.forward(x, dead_mask=state.counter.dead_mask_if_any(), grad=grad)
            out.pre_acts = None  # the dense [batch, d_sae] pre-activations are not needed past the forward
            loss = out.loss.float()
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not state.bucketed:
                dist.average_gradients(state.sae)
            state.sae.after_backward()
            finite = state.optimizer_step(loss, self.cfg.grad_clip)
            state.sae.after_step()
            dist.average_buffers(state.sae)
            newly_bad = ~finite & (state.bad_step < 0)
            state.bad_step = torch.where(newly_bad, self.step, state.bad_step)
            state.bad_loss = torch.where(newly_bad, loss.detach(), state.bad_loss)
            if out.selection is not None:
                fired = state.counter.update_sparse(out.selection, out.values.detach())
            else:
                fired = None
                state.counter.update(out.codes.detach())
            values = {"step": self.step, "loss": loss.detach(), **{k: v.detach() for k, v in out.losses.items()},
                      **{k: v.detach() for k, v in out.metrics.items()},
                      "dead_frac": state.counter.dead_mask.float().mean(),
                      "lr": state.optimizer.param_groups[0]["lr"]}
            records[name] = StepRecord(values, out, fired)
            state.seconds += time.perf_counter() - state_started
        self.step += 1
        self.tokens += n_tokens * dist.world_size()
        for record in records.values():
            record["tokens"] = self.tokens
        if self.step % self.sync_every == 0:
            self.sync()
        self.timings["sae_seconds"] += time.perf_counter() - started
        return records

    def sync(self) -> None:
        """Read the device flags: raise NonFiniteLossError for the first non-finite step, tighten the dead bound."""
        self.check_finite()
        for state in self.states.values():
            state.counter.refresh()

    def check_finite(self) -> None:
        """Raise NonFiniteLossError naming the first step (over ranks) whose loss or gradient was not finite."""
        for name, state in self.states.items():
            step = state.bad_step.clone()
            if dist.is_distributed():
                step = torch.where(step < 0, torch.iinfo(torch.long).max, step)
                dist.min_over_ranks_(step)
                step = torch.where(step == torch.iinfo(torch.long).max, -1, step)
            first = int(step)
            if first >= 0:
                value = float(state.bad_loss) if int(state.bad_step) == first else float("nan")
                raise NonFiniteLossError(name, first, value, stopped_at=self.step)

    # ---- exact resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a bit-identical resume needs. Raises NonFiniteLossError first if a step was not finite, so a
        checkpoint never holds weights or moments that saw it."""
        self.check_finite()
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
            for group in s.optimizer.param_groups:  # a checkpoint of another Adam implementation keeps ours
                group["fused"], group["foreach"] = (True, None) if s.fused else (None, group.get("foreach"))
            s.counter.tokens_since_fired.copy_(saved["tokens_since_fired"])
            s.counter.refresh()


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
    sync_every: int = 10,
) -> list[dict[str, float]]:
    """Train one SAE in place on an iterable of batches for `steps` steps; returns the per-step records as numbers.

    Records are read from the device every `sync_every` steps (and at the end), not every step; `on_step`, when
    given, gets each record as numbers, which reads the device every step.
    A batch-dependent SAE then has its inference threshold calibrated (§3.1) on `calibration_batches`, else on
    `batches` again when it can be iterated twice (a list, a DataLoader), else on what is left of the iterator;
    with no batch left it raises instead of returning an SAE that cannot infer.
    """
    cfg = cfg or LoopConfig()
    cfg.validate()
    trainer = Trainer({"sae": (sae, "x")}, cfg, steps, sync_every=sync_every)
    history: list[dict[str, float]] = []
    pending: list[dict] = []
    iterator: Iterator = iter(batches)
    bar = tqdm(range(steps), desc=f"train {sae.architecture}", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        try:
            batch = next(iterator)
        except StopIteration:
            break
        record = trainer.train_step({"x": batch})["sae"]
        if on_step is not None:
            (record,) = to_host([record])
            on_step(record)
        pending.append({k: v for k, v in record.items() if not k.startswith("_")})  # not the step's tensors
        if trainer.step % trainer.sync_every == 0:
            history.extend(to_host(pending))
            pending.clear()
            last = history[-1]
            bar.set_postfix(loss=f"{last['loss']:.4g}", fvu=f"{last['fvu']:.3f}", l0=f"{last['l0']:.1f}")
    history.extend(to_host(pending))
    trainer.check_finite()
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
