"""The contract every SAE variant honours (architecture.md "The SAE contract"; docs/methods.md Appendix A).

Storage convention (docs/methods.md §0.3): one row per latent, `W_enc [d_sae, d_in]`, `W_dec [d_sae, d_in]`.
Input normalisation (§1.1, `dataset_scalar`): the SAE trains on `input_scale * x`; `fold_input_scale` moves the
scalar into the weights so an exported SAE runs on raw activations with identical codes.
A variant supplies `select` (pre-activations -> codes) and optionally `aux_losses`; the rest is shared here.
"""
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saes import ops
from saes import sparse_topk as fast


TOKEN_NORMS = ("none", "layer_norm", "constant_norm_rescale")
LAYER_NORM_EPS = 1e-5  # SAELens's and OpenAI's LayerNorm epsilon, added to the std (not the variance)


def token_stats(x: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, divisor, scale) of each token for `mode`: x_norm = (x - mean) / divisor, out = y * scale + mean.

    They differ only by LayerNorm's epsilon, as in SAELens and OpenAI's code. x: [n, d] -> three [n, 1]."""
    if mode == "layer_norm":
        mean = x.mean(-1, keepdim=True)
        std = (x - mean).std(-1, keepdim=True)
        return mean, std + LAYER_NORM_EPS, std
    norm = x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5  # constant_norm_rescale
    return torch.zeros_like(norm), norm, norm


@dataclass
class SAEConfig:
    """Fields every variant shares. Variants subclass this and add their own."""

    d_in: int
    """Width of the activations the SAE reads (d_model for the residual stream)."""
    d_sae: int
    """Number of latents."""
    hook_name: str = ""
    """Hook point the SAE was trained on, e.g. blocks.15.hook_resid_post."""
    model_name: str = ""
    """Model the activations came from."""
    input_scale: float = 1.0
    """Dataset scalar s of docs/methods.md §1.1: the SAE works on s*x. 1.0 once folded."""
    aux_k: int | None = None
    """Dead latents used by AuxK (§1.5); None means d_in // 2, 0 disables AuxK."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (§1.5)."""
    dtype: str = "float32"
    """Parameter dtype."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (cache key, run name); saved in cfg.json."""
    token_norm: str = "none"
    """Per-token input normalisation of an imported SAE (SAELens `normalize_activations`, OpenAI's LayerNorm):
    'none'; 'layer_norm' (x -> (x - mean) / (std + 1e-5), reconstruction * std + mean, std with Bessel's
    correction); 'constant_norm_rescale' (x -> x sqrt(d_in) / ||x||, reconstruction divided by the same factor).
    Inference only: the trainer never trains with it."""

    def validate(self) -> None:
        """Raise ValueError naming the field when the configuration cannot work."""
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}.")
        if not (self.input_scale > 0 and torch.isfinite(torch.tensor(self.input_scale))):
            raise ValueError(f"input_scale must be a positive finite number, got {self.input_scale}.")
        if self.aux_k is not None and self.aux_k < 0:
            raise ValueError(f"aux_k must be >= 0 (0 disables AuxK), got {self.aux_k}.")
        if self.token_norm not in TOKEN_NORMS:
            raise ValueError(f"token_norm must be one of {', '.join(TOKEN_NORMS)}, got {self.token_norm!r}.")
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"dtype must be one of float32, bfloat16, float16, float64, got {self.dtype!r}.")

    @property
    def effective_aux_k(self) -> int:
        return self.d_in // 2 if self.aux_k is None else self.aux_k

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SAEConfig":
        """Build from a dict, ignoring keys this config does not define (e.g. SAELens-only fields)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def check_k(k: int, d_sae: int, name: str = "k") -> None:
    """Shared validation for every variant with a per-token budget."""
    if not 0 < k <= d_sae:
        raise ValueError(f"{name} must satisfy 0 < {name} <= d_sae={d_sae}, got {name}={k}.")


class SAEOutput:
    """What `forward` returns. Losses are already weighted: `loss` is their sum.

    x_hat [batch, d_in] is in raw (unscaled) space; pre_acts [batch, d_sae] in the scaled space (None for MP-SAE).
    The fast path of the TopK family (saes/sparse_topk.py) returns its codes as `values` at the pairs of `selection`
    (`indices [batch, m]`, or flat `indices [N]` with `offsets [batch]` for batch-level rules) and builds the dense
    `codes` [batch, d_sae] only when something reads them; the dense path passes `codes` directly.
    """

    def __init__(self, x_hat, codes: Tensor | None, pre_acts: Tensor | None, losses: dict[str, Tensor],
                 metrics: dict[str, Tensor], *, values: Tensor | None = None, selection=None):
        if codes is None and (values is None or selection is None):
            raise ValueError("SAEOutput needs dense codes, or values with their selection.")
        self._x_hat, self.pre_acts, self.losses, self.metrics = x_hat, pre_acts, losses, metrics
        self._codes, self.values, self.selection = codes, values, selection

    @property
    def x_hat(self) -> Tensor:
        """Reconstruction [batch, d_in] in raw space (the fast path computes it on first use: a callable)."""
        if callable(self._x_hat):
            self._x_hat = self._x_hat()
        return self._x_hat

    @property
    def codes(self) -> Tensor:
        """Dense codes [batch, d_sae]; may be negative when the SAE is `signed`. Built on first use on the fast path
        (differentiable through `values`)."""
        if self._codes is None:
            self._codes = self.selection.to_dense(self.values)
        return self._codes

    @property
    def indices(self) -> Tensor | None:
        """Latent of each entry of `values` (fast path), else None."""
        return None if self.selection is None else self.selection.indices

    @property
    def offsets(self) -> Tensor | None:
        """Flat layout only: where each token's entries start in `values`/`indices` [batch]."""
        return None if self.selection is None else self.selection.offsets

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]


class SAE(nn.Module):
    """Shared parameters, init (§1.2), decoding, loss template, step hooks and normalisation folding."""

    architecture: ClassVar[str] = ""
    config_cls: ClassVar[type[SAEConfig]] = SAEConfig
    signed: ClassVar[bool] = False
    """True when codes can be negative (AbsTopK, some MP modes): consumers must not assume z >= 0."""
    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows kept at unit norm with gradient projection (§1.3)."""
    uses_grad: ClassVar[bool] = False
    """True when training needs the per-token gradient stored in the activation cache (g-SAE, §8)."""
    batch_dependent: ClassVar[bool] = False
    """True when train-mode selection depends on the whole batch (BatchTopK, Mutual/Feature Choice)."""
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    """Adam (beta1, beta2) of the variant's paper; the trainer uses them unless --loop.adam-betas overrides."""
    trainable: ClassVar[bool] = True
    """False for inference-only classes that exist to load other libraries' SAEs (e.g. gated)."""
    tied: ClassVar[bool] = False
    """True when the encoder is the dictionary itself (MP-SAE, §7.1): no W_enc/b_enc parameters exist or are saved."""
    pre_acts_buffer: "fast.PreActsBuffer | None" = None
    """Where the fast path writes its pre-activations; lent by the trainer for one forward (saes/sparse_topk.py)."""

    def __init__(self, cfg: SAEConfig, seed: int | None = 0):
        super().__init__()
        if not isinstance(cfg, self.config_cls):
            raise ValueError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(cfg).__name__}.")
        cfg.validate()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float32)
        W_dec = self.initial_decoder_norm * W_dec / W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(dtype))  # [d_sae, d_in]
        if not self.tied:
            self.W_enc = nn.Parameter(W_dec.clone().to(dtype))  # [d_sae, d_in]; tied init, untied training
            self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        self.register_buffer("input_scale", torch.tensor(float(cfg.input_scale)))

    initial_decoder_norm: ClassVar[float] = 1.0

    # ---- encoding -------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"{self.architecture} SAE expects activations of width d_in={self.cfg.d_in}, got {x.shape[-1]}: "
                "train or load an SAE for this hook, or check the cache you are reading."
            )

    def _check_trainable(self) -> None:
        if not self.trainable or self.cfg.token_norm != "none":
            raise ValueError(f"This {self.architecture} SAE is inference-only (an imported layout or normalisation, "
                             f"token_norm={self.cfg.token_norm!r}, that the trainer has no counterpart for): analyse "
                             "it, or train a new SAE of a trainable architecture.")

    def pre_acts(self, x_scaled: Tensor) -> Tensor:
        """u = W_enc (s*x - b_dec) + b_enc. x_scaled: [batch, d_in] -> [batch, d_sae]."""
        return (x_scaled - self.b_dec) @ self.W_enc.T + self.b_enc

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        """Codes from pre-activations: the variant's selection rule. [batch, d_sae] -> [batch, d_sae]."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Inference-mode codes of raw activations; never batch-dependent. [..., d_in] -> [..., d_sae]."""
        self._check_input(x)
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1]).to(self.W_enc.dtype)
        if self.cfg.token_norm != "none":
            mean, divisor, scale = token_stats(x_flat, self.cfg.token_norm)
            x_flat = (x_flat - mean) / divisor
            self._token_stats = (shape[:-1], mean, scale)  # decode un-normalises the codes of this call
        x_scaled = x_flat * self.input_scale
        codes = self.select(self.pre_acts(x_scaled), train=False, x_scaled=x_scaled, grad=None)
        return codes.reshape(*shape[:-1], self.cfg.d_sae)

    def _per_token(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, scale) of the last encode, shaped like `codes` [..., 1], for a per-token-normalised SAE."""
        stats = getattr(self, "_token_stats", None)
        if stats is None or tuple(stats[0]) != tuple(codes.shape[:-1]):
            raise ValueError(
                f"This SAE normalises each token ({self.cfg.token_norm}), so decoding needs the statistics of the "
                "tokens the codes came from: decode the codes of the latest encode call (same shape), or use "
                "reconstruct(x).")
        _, mean, scale = stats
        return mean.reshape(*codes.shape[:-1], 1), scale.reshape(*codes.shape[:-1], 1)

    # ---- decoding -------------------------------------------------------------------------------------
    def decode_no_bias(self, codes: Tensor) -> Tensor:
        """sum_i z_i d_i in raw space, without b_dec (AuxK, steering, attribution). [..., d_sae] -> [..., d_in]."""
        out = (codes.to(self.W_dec.dtype) @ self.W_dec) / self.input_scale
        if self.cfg.token_norm != "none":
            out = out * self._per_token(codes)[1]
        return out

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction in raw space. [..., d_sae] -> [..., d_in]."""
        out = (codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale
        if self.cfg.token_norm != "none":
            mean, scale = self._per_token(codes)
            out = out * scale + mean
        return out

    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)): the inference-mode reconstruction of raw activations. [..., d_in] -> [..., d_in]."""
        return self.decode(self.encode(x))

    # ---- training -------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *, dead_mask: Tensor | None = None, grad: Tensor | None = None) -> SAEOutput:
        """Train-mode pass: codes, reconstruction, weighted losses and metrics. x: [batch, d_in] raw."""
        self._check_input(x)
        self._check_trainable()
        if self.fast_path:
            return self._fast_forward(x, dead_mask=dead_mask, grad=grad)
        x_scaled = x.to(self.W_enc.dtype) * self.input_scale
        pre_acts = self.pre_acts(x_scaled)
        codes = self.select(pre_acts, train=True, x_scaled=x_scaled, grad=grad)
        x_hat_scaled = codes @ self.W_dec + self.b_dec
        losses = {"mse": ops.mse_sum(x_scaled, x_hat_scaled)}
        losses.update(self.aux_losses(pre_acts, codes, x_scaled, x_hat_scaled, dead_mask))
        metrics = {
            "fvu": ops.fvu(x_scaled, x_hat_scaled).detach(),
            "l0": (codes != 0).sum(-1).float().mean().detach(),
        }
        return SAEOutput(x_hat_scaled / self.input_scale, codes, pre_acts, losses, metrics)

    def aux_losses(
        self, pre_acts: Tensor, codes: Tensor, x_scaled: Tensor, x_hat_scaled: Tensor, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        """Extra weighted loss terms. Default: AuxK on dead latents (§1.5)."""
        if dead_mask is None or self.cfg.effective_aux_k == 0 or not bool(dead_mask.any()):
            return {}
        aux = ops.auxk_loss(pre_acts, x_scaled - x_hat_scaled, self.W_dec, dead_mask, self.cfg.effective_aux_k)
        return {"auxk": self.cfg.aux_coef * aux}

    # ---- fast path (TopK family, saes/sparse_topk.py) ---------------------------------------------------------
    def select_sparse(self, pre_acts: Tensor, *, x_scaled: Tensor, grad: Tensor | None) -> fast.Selection:
        """The train-mode rule of `select` as (token, latent) pairs, from detached pre-activations [batch, d_sae].
        A variant with a fast path defines it in the same class as its `select`."""
        raise NotImplementedError

    @property
    def fast_path(self) -> bool:
        """Training takes the fast path: the config asks for kernel 'sparse' and the class that defines `select`
        also defines `select_sparse` (a subclass that changes `select` alone falls back to the dense path)."""
        if getattr(self.cfg, "kernel", "dense") != "sparse":
            return False
        cls = type(self)
        return _owner(cls, "select") is _owner(cls, "select_sparse")

    def _fast_forward(self, x: Tensor, *, dead_mask: Tensor | None, grad: Tensor | None) -> SAEOutput:
        """`forward` through saes/sparse_topk.py: the same selection, values, losses and gradients as the dense path,
        with the encoder backward and the decode touching only the selected latents."""
        x_scaled = x.to(self.W_enc.dtype) * self.input_scale
        x_centered, pre_acts = fast.encoder_pre_acts(x_scaled, self.b_dec, self.W_enc, self.b_enc,
                                                     self.pre_acts_buffer)
        selection = self.select_sparse(pre_acts, x_scaled=x_scaled, grad=grad)
        values = fast.gather_pre_acts(pre_acts, x_centered, self.b_dec, self.W_enc, self.b_enc, selection,
                                      relu=not self.signed)
        sq_error, residual, total = fast.decode_error(values, self.W_dec, selection, x_centered, self.b_dec,
                                                      center=x_centered.detach().mean(0))  # total: §1.7
        losses = {"mse": sq_error / x.shape[0]}  # ops.mse_sum
        losses.update(self.fast_aux_losses(pre_acts, x_centered, residual, dead_mask))
        with fast.serial(x.device):
            l0 = ((values.detach() != 0).sum() / selection.batch).float()
        metrics = {"fvu": (sq_error.detach() / total.clamp_min(torch.finfo(total.dtype).tiny)), "l0": l0}  # ops.fvu
        return SAEOutput(lambda: (x_scaled - residual) / self.input_scale, None, pre_acts, losses, metrics,
                         values=values, selection=selection)

    def fast_aux_losses(self, pre_acts: Tensor, x_centered: Tensor, residual: Tensor,
                        dead_mask: Tensor | None) -> dict[str, Tensor]:
        """`aux_losses` of the fast path (residual: s·x - x̂, detached): AuxK on the dead latents only, with no host
        sync. With a dead mask that has no dead latent the term is present and exactly 0 (the dense path leaves it
        out)."""
        if dead_mask is None or self.cfg.effective_aux_k == 0:
            return {}
        aux = fast.fast_auxk(pre_acts, x_centered, residual, self.b_dec, self.W_enc, self.b_enc,
                             self.W_dec, dead_mask, self.cfg.effective_aux_k, signed=self.signed)
        return {"auxk": self.cfg.aux_coef * aux}

    def after_backward(self) -> None:
        """Before the optimiser step: project the radial gradient out of unit-norm decoder rows (§1.3)."""
        if self.unit_norm_decoder:
            ops.project_out_radial_grad(self.W_dec)

    def after_step(self) -> None:
        """After the optimiser step: renormalise decoder rows (§1.3)."""
        if self.unit_norm_decoder:
            ops.normalise_rows(self.W_dec.data)

    @torch.no_grad()
    def init_b_dec(self, x: Tensor, method: str = "geometric_median") -> None:
        """b_dec from a sample of raw activations (§1.2), in the scaled space. x: [n, d_in]."""
        x_scaled = x.float() * self.input_scale
        if method == "geometric_median":
            value = ops.geometric_median(x_scaled)
        elif method == "mean":
            value = x_scaled.mean(0)
        elif method == "zeros":
            value = torch.zeros(self.cfg.d_in)
        else:
            raise ValueError(f"b_dec init must be geometric_median, mean or zeros, got {method!r}.")
        self.b_dec.copy_(value.to(self.b_dec.dtype))

    # ---- export ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """W_enc <- s W_enc, W_dec <- W_dec / s, b_dec <- b_dec / s; then s = 1 (§1.1)."""
        s = self.input_scale.to(self.W_enc.dtype)
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self.fold_extra(float(s))
        self.input_scale.fill_(1.0)
        self.cfg.input_scale = 1.0

    @torch.no_grad()
    def fold_b_dec_into_encoder(self) -> None:
        """Make u = W_enc x + b_enc (an encoder that does not subtract b_dec, SAELens `apply_b_dec_to_input:
        false`) exact under our u = W_enc (x - b_dec) + b_enc: b_enc <- b_enc + W_enc b_dec (in float64)."""
        if self.tied:
            raise ValueError(f"A tied {self.architecture} SAE has no encoder bias to absorb b_dec: it cannot load "
                             "with apply_b_dec_to_input false.")
        shift = self.W_enc.double() @ self.b_dec.double()  # [d_sae]
        self.b_enc.copy_((self.b_enc.double() + shift).to(self.b_enc.dtype))

    def fold_extra(self, scale: float) -> None:
        """Variant hook for folding state beyond the four tensors (e.g. thresholds kept in the scaled space)."""

    def export_inference(self) -> "SAE":
        """A copy ready for inference on raw activations: normalisation folded, thresholds exported."""
        exported = copy.deepcopy(self)
        exported.fold_input_scale()
        return exported

    def extra_tensors(self) -> dict[str, Tensor]:
        """Tensors saved beside the four SAELens ones (e.g. `threshold`)."""
        return {}

    def load_extra_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `extra_tensors`."""


def _owner(cls: type, name: str) -> type | None:
    """The first class of cls's MRO that defines `name` itself."""
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


def require_nonnegative(sae: SAE, what: str) -> None:
    """Refuse signed codes (AbsTopK, signed MP; §4.4) in code that assumes z >= 0, instead of silently
    dropping the negative half. `what` names the caller, e.g. "max-activating examples"."""
    if sae.signed:
        raise ValueError(
            f"{what} assumes non-negative codes, but this {sae.architecture!r} SAE is signed (codes can be < 0): "
            "use its signed-aware counterpart (rank by |z|, collect top-positive and top-negative examples separately)."
        )
