"""Inference thresholds of batch-dependent variants, calibrated with the final weights frozen (§3.1, §6.4).

BatchTopK, Mutual Choice, AbsTopK (batch mode) and Feature Choice select over a whole batch in training, which a
single token at inference cannot do. Their papers infer with a threshold θ defined on the *trained* encoder: the
mean, over training batches, of the smallest activation the batch selection kept (Feature Choice: per latent).
An EMA taken during training lags the encoder and left inference L0 far below k on short runs, so θ is measured
once at the end instead, and an SAE whose θ was never measured refuses to encode.

    calibrator = ThresholdCalibrator(sae)
    for x in batches: calibrator.observe(x)     # x: [batch, d_in] raw activations, batches of the training size
    calibrator.finish()                          # writes sae.threshold
"""
from collections.abc import Iterable
from itertools import islice

import torch
from torch import Tensor

from saes.base import SAE

DEFAULT_CALIBRATION_BATCHES = 100


class ThresholdCalibrator:
    """Running mean of the per-batch smallest kept activation of one SAE (global θ, or θ_j per latent)."""

    def __init__(self, sae: SAE):
        if not sae.batch_dependent:
            raise ValueError(f"{sae.architecture} selects per token and has no inference threshold to calibrate.")
        self.sae = sae
        shape = sae.threshold.shape  # [] (one θ) or [d_sae] (θ_j)
        self.total = torch.zeros(shape, dtype=torch.float64, device=sae.threshold.device)
        self.count = torch.zeros(shape, dtype=torch.float64, device=sae.threshold.device)
        self.batches = 0

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Add one training-size batch of raw activations x [batch, d_in] (a (x, grad) pair is accepted)."""
        if isinstance(x, (tuple, list)):
            x = x[0]
        sae = self.sae
        x_scaled = x.to(sae.W_enc.dtype) * sae.input_scale
        pre_acts = sae.pre_acts(x_scaled)
        if sae.fast_path:  # the kept (token, latent) pairs only, no dense [batch, d_sae] codes
            selection = sae.select_sparse(pre_acts, x_scaled=x_scaled, grad=None)
            values = selection.gather(pre_acts)
            smallest = sae.smallest_kept_values(values if sae.signed else values.relu()).double()
        else:
            codes = sae.select(pre_acts, train=True, x_scaled=x_scaled, grad=None)  # [batch, d_sae]
            smallest = sae.smallest_kept(codes).double()  # [] or [d_sae]; inf where nothing was kept
        seen = torch.isfinite(smallest)
        self.total += torch.where(seen, smallest, 0.0)
        self.count += seen
        self.batches += 1

    @torch.no_grad()
    def finish(self) -> SAE:
        """Write θ = total / count into the SAE. A latent that never kept a token gets θ_j = +inf (never fires)."""
        if self.batches == 0:
            raise ValueError(f"No batches to calibrate the {self.sae.architecture} threshold on: pass training "
                             "batches (the batch size used in training) to calibrate_thresholds.")
        if self.sae.threshold.dim() == 0 and self.count.item() == 0:
            raise ValueError(f"The {self.sae.architecture} SAE kept no activation in {self.batches} calibration "
                             "batches: check that the batches are activations of its hook.")
        theta = torch.where(self.count > 0, self.total / self.count.clamp_min(1), torch.inf)
        self.sae.threshold.copy_(theta.to(self.sae.threshold.dtype))
        return self.sae


def calibrate_thresholds(sae: SAE, batches: Iterable[Tensor], max_batches: int = DEFAULT_CALIBRATION_BATCHES) -> SAE:
    """Calibrate a batch-dependent SAE's inference threshold on up to `max_batches` training batches, in place.

    Per-token variants are returned unchanged. Use batches of the size the SAE was trained with: the smallest kept
    activation depends on the batch size.
    """
    if not sae.batch_dependent:
        return sae
    calibrator = ThresholdCalibrator(sae)
    for x in islice(batches, max_batches):
        calibrator.observe(x)
    return calibrator.finish()


def require_calibrated(sae: SAE) -> None:
    """One clear sentence when a batch-dependent SAE is asked to infer before its threshold was calibrated."""
    if bool((sae.threshold < 0).any()):
        raise ValueError(
            f"This {sae.architecture} SAE has no calibrated inference threshold (its training did not finish): run "
            "saes.calibrate_thresholds(sae, training_batches) or train it with `saewb train` / train_sae, which "
            "calibrate at the end."
        )
