"""Sparse feature circuits (Marks et al. 2024; docs/methods.md §10.2) with SAEs at one or more hooks.

Nodes: the latents of each SAE, summed over positions, and the SAE error eps = h - x_hat, so h = decode(z) + eps
exactly and splicing changes nothing. Error nodes follow SFC's code (`aggregation="sum"`): one per hook, its effect
summed over positions like a latent's (`error_nodes="per_hook"`, the default); `"per_position"` keeps one error node
per position instead (latents stay summed). Metric m: the task's logit difference (analysis/tasks.py).

Everything is written against a *runner*: `run(replace) -> m [batch]`, which runs the network on the clean input
with the activation of each hook in `replace` ([batch, seq, d], trailing head dims flattened) passed through
`replace[hook]`. `lm_runner` makes one for a TransformerLens model; tests use hand-built linear ones.

Because decode is affine, a node's gradient is the hook gradient projected: dm/dz_i = g . d_i (decoder row in raw
space), dm/deps = g, where g = dm/dh with everything downstream recomputed. Hence
- attribution patching: IE(z_i) = (g_clean . d_i) (z_i,patch - z_i,clean); IE(eps) = g_clean . (eps_patch - eps_clean);
- integrated gradients (S steps, alpha_s = s/S, one hook at a time): interpolating every node of a hook is
  interpolating h itself, h_alpha = (1 - alpha) h_clean + alpha h_patch, so g is averaged over those states;
- exact patching: m with h + (dz_i) d_i minus m clean (validation).
The g of the downstream computation passes through later hooks' SAEs and error nodes as through the plain model,
which is what SFC's code does too (its error term hands the reconstruction's gradient straight to the activation), so
this is not a deviation; it is why AtP, IG and exact patching agree exactly when m is linear. Signed SAEs (negative
codes) need nothing special here.

Edges (SFC `jvp`): IE(u -> d) = g_d . (dd/du) . Delta u, with g_d the *same* gradient the node effects used at the
downstream hook (the clean one for AtP, the IG path mean for IG) and the Jacobian at the clean input.
Evaluation (SFC `ablation.py`): nodes outside the circuit are set to their mean over the *corrupted* prompts of the
batch being evaluated, per position (`ablation_source="clean"`: over the clean prompts; or zero); pass the states
of held-out prompts to measure faithfulness and completeness out of sample.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from analysis.tasks import TaskData, task_metric
from saes.base import SAE

Replace = dict[str, Callable[[Tensor], Tensor]]
Runner = Callable[..., Tensor]  # run(replace, stop_at=None) -> m [batch]

ERROR_NODES = ("per_hook", "per_position")
ABLATIONS = ("mean", "zero")
ABLATION_SOURCES = ("patch", "clean")


class CircuitError(ValueError):
    """Bad circuit input; the message says how to fix it."""


class _Stop(Exception):
    """Raised inside a hook to end a forward early (edges only need the model up to the downstream hook)."""


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CircuitError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")


def lm_runner(model, tokens: Tensor, task: TaskData) -> Runner:
    """run(replace, stop_at=None): the task metric [batch] of `model` on `tokens` with hook activations replaced."""

    def run(replace: Replace, stop_at: str | None = None) -> Tensor:
        def wrap(fn, hook_name):
            def hook_fn(activation: Tensor, hook) -> Tensor:
                shape = activation.shape
                new = fn(activation.reshape(*shape[:2], -1))  # [batch, seq, d]
                if hook_name == stop_at:
                    raise _Stop
                return new.reshape(shape).to(activation.dtype)
            return hook_fn

        with model.hooks(fwd_hooks=[(hook, wrap(fn, hook)) for hook, fn in replace.items()]):
            return task_metric(model(tokens), task)

    return run


def check_hooks(model, saes: dict[str, SAE]) -> list[str]:
    """The SAE hooks in the model's forward order, or a CircuitError naming the missing ones."""
    if not saes:
        raise CircuitError("No SAE given: pass a dict hook -> SAE with at least one entry.")
    names = list(model.hook_dict)
    missing = [hook for hook in saes if hook not in model.hook_dict]
    if missing:
        raise CircuitError(f"The model has no hook {', '.join(map(repr, missing))}: use SAEs trained on this model "
                           f"(their cfg.json hook_name), e.g. hooks like {names[len(names) // 2]!r}.")
    return sorted(saes, key=names.index)


def decoder(sae: SAE) -> Tensor:
    """Decoder rows in raw activation space: [d_sae, d_in]."""
    return (sae.W_dec / sae.input_scale).detach().float()


@torch.no_grad()
def node_states(sae: SAE, h: Tensor) -> tuple[Tensor, Tensor]:
    """Codes [batch, seq, d_sae] and error nodes [batch, seq, d_in] of activations h [batch, seq, d_in]."""
    codes = sae.encode(h).float()
    return codes, h.float() - sae.decode(codes).float()


def capture(run: Runner, hooks: list[str], replace: Replace | None = None, grad: bool = True
            ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """m [batch], the activations at `hooks` and (grad=True) dm/dh at each, everything downstream recomputed."""
    replace = replace or {}
    acts: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}

    def make(hook):
        inner = replace.get(hook)

        def fn(h: Tensor) -> Tensor:
            h = inner(h) if inner is not None else h
            acts[hook] = h.detach().float()
            if not grad:
                return h
            deltas[hook] = torch.zeros_like(h, requires_grad=True)
            return h + deltas[hook]
        return fn

    fns = {**replace, **{hook: make(hook) for hook in hooks}}
    with torch.set_grad_enabled(grad):
        m = run(fns)
        if not grad:
            return m.detach(), acts, {}
        order = [hook for hook in hooks if hook in deltas]
        grads = torch.autograd.grad(m.sum(), [deltas[h] for h in order], allow_unused=True)
    return m.detach(), acts, {h: (torch.zeros_like(deltas[h]) if g is None else g.float()) for h, g in zip(order, grads)}


@dataclass
class HookEffects:
    """Indirect effects at one hook, per prompt and position, and the gradient they were computed with."""

    latent: Tensor  # [batch, seq, d_sae]
    error: Tensor  # [batch, seq]
    grad: Tensor  # [batch, seq, d]: dm/dh of the estimator (clean for AtP, IG path mean for IG); edges reuse it
    error_nodes: str = "per_hook"

    def latent_scores(self) -> Tensor:
        """Per latent: summed over positions, mean over prompts. [d_sae]"""
        return self.latent.sum(1).mean(0)

    def error_scores(self) -> Tensor:
        """Per error node, mean over prompts: [1] summed over positions (per_hook) or [seq] (per_position)."""
        return self.error.sum(1, keepdim=True).mean(0) if self.error_nodes == "per_hook" else self.error.mean(0)

    def error_deltas(self, delta: Tensor) -> Tensor:
        """Per-position error contributions [batch, seq] grouped into this hook's error nodes: [batch, n_error]."""
        return delta.sum(1, keepdim=True) if self.error_nodes == "per_hook" else delta


@dataclass
class States:
    """Clean and patched activations and nodes at every hook."""

    clean_m: Tensor  # [batch]
    patch_m: Tensor  # [batch]
    clean: dict[str, Tensor]  # hook -> h [batch, seq, d]
    patch: dict[str, Tensor]
    grads: dict[str, Tensor]  # hook -> dm/dh at the clean input (empty when collected without gradients)
    codes: dict[str, tuple[Tensor, Tensor]]  # hook -> (clean codes, patch codes)
    errors: dict[str, tuple[Tensor, Tensor]]  # hook -> (clean error, patch error)

    def __len__(self) -> int:
        return self.clean_m.shape[0]


def collect_states(run_clean: Runner, run_patch: Runner, saes: dict[str, SAE], grad: bool = True) -> States:
    """Activations, codes and errors on the clean and patched inputs; grad=False skips the backward pass (enough
    to evaluate a circuit on held-out prompts)."""
    hooks = list(saes)
    clean_m, clean, grads = capture(run_clean, hooks, grad=grad)
    patch_m, patch, _ = capture(run_patch, hooks, grad=False)
    if clean[hooks[0]].shape != patch[hooks[0]].shape:
        raise CircuitError("Clean and patched inputs must have the same shape (align prompts token by token).")
    codes, errors = {}, {}
    for hook, sae in saes.items():
        zc, ec = node_states(sae, clean[hook])
        zp, ep = node_states(sae, patch[hook])
        codes[hook], errors[hook] = (zc, zp), (ec, ep)
    return States(clean_m, patch_m, clean, patch, grads, codes, errors)


def effects_from_grad(sae: SAE, grad: Tensor, states: States, hook: str, error_nodes: str = "per_hook"
                      ) -> HookEffects:
    check_choice("error_nodes", error_nodes, ERROR_NODES)
    zc, zp = states.codes[hook]
    ec, ep = states.errors[hook]
    return HookEffects(latent=(grad @ decoder(sae).T) * (zp - zc), error=(grad * (ep - ec)).sum(-1), grad=grad,
                       error_nodes=error_nodes)


def attribution_patching(saes: dict[str, SAE], states: States, error_nodes: str = "per_hook"
                         ) -> dict[str, HookEffects]:
    """IE_atp = grad_clean . (patch - clean) for every latent and error node (one backward pass in all)."""
    if not states.grads:
        raise CircuitError("These states were collected without gradients: use collect_states(..., grad=True).")
    return {hook: effects_from_grad(sae, states.grads[hook], states, hook, error_nodes) for hook, sae in saes.items()}


def integrated_gradients(run_clean: Runner, saes: dict[str, SAE], states: States, steps: int = 10,
                         error_nodes: str = "per_hook") -> dict[str, HookEffects]:
    """IE_ig with S = steps (alpha_s = s/S, s < S), one hook at a time, the rest recomputed from the clean input."""
    if steps < 1:
        raise CircuitError(f"Integrated gradients needs steps >= 1, got {steps}.")
    out = {}
    for hook, sae in saes.items():
        h_clean, h_patch = states.clean[hook], states.patch[hook]
        total = torch.zeros_like(h_clean)
        for s in range(steps):
            alpha = s / steps
            state = ((1 - alpha) * h_clean + alpha * h_patch)

            def replace(h: Tensor, state=state) -> Tensor:
                return state.to(h.dtype)

            total += capture(run_clean, [hook], {hook: replace})[2][hook]
        out[hook] = effects_from_grad(sae, total / steps, states, hook, error_nodes)
    return out


@torch.no_grad()
def exact_latent_effect(run_clean: Runner, sae: SAE, hook: str, states: States, latent: int) -> Tensor:
    """m(latent patched at every position) - m(clean), per prompt [batch]: exact patching, for validation."""
    zc, zp = states.codes[hook]
    shift = (zp - zc)[..., latent:latent + 1] * decoder(sae)[latent]  # [batch, seq, d_in]
    return run_clean({hook: lambda h: h + shift.to(h.dtype)}).float() - states.clean_m.float()


@torch.no_grad()
def exact_error_effect(run_clean: Runner, hook: str, states: States, position: int | None = None) -> Tensor:
    """m(error node patched) - m(clean), per prompt [batch]; position None patches the error at every position
    (the per-hook error node)."""
    ec, ep = states.errors[hook]
    shift = ep - ec  # [batch, seq, d]
    if position is not None:
        shift = torch.zeros_like(ec)
        shift[:, position] = ep[:, position] - ec[:, position]
    return run_clean({hook: lambda h: h + shift.to(h.dtype)}).float() - states.clean_m.float()


# ---- ablation, faithfulness, completeness -----------------------------------------------------------------------
@dataclass
class Circuit:
    """Which nodes are kept: per hook a latent mask [d_sae] and an error-node mask ([1] per hook or [seq])."""

    latents: dict[str, Tensor]
    errors: dict[str, Tensor]

    def complement(self) -> "Circuit":
        return Circuit({h: ~m for h, m in self.latents.items()}, {h: ~m for h, m in self.errors.items()})

    def full(self, keep: bool = True) -> "Circuit":
        """Every node (keep=True) or none, with this circuit's node layout."""
        return Circuit({h: torch.full_like(m, keep) for h, m in self.latents.items()},
                       {h: torch.full_like(m, keep) for h, m in self.errors.items()})

    def size(self) -> int:
        return int(sum(m.sum() for m in self.latents.values()) + sum(m.sum() for m in self.errors.values()))


def full_circuit(saes: dict[str, SAE], n_error_nodes: int = 1, keep: bool = True) -> Circuit:
    """Every node (or none): n_error_nodes is 1 (per-hook error node) or seq (per position)."""
    return Circuit({h: torch.full((s.cfg.d_sae,), keep) for h, s in saes.items()},
                   {h: torch.full((n_error_nodes,), keep) for h in saes})


def ablation_values(saes: dict[str, SAE], states: States, mode: str = "mean", source: str = "patch"
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """Per hook, what an ablated latent / error node is set to: the batch mean per position of the corrupted
    (source="patch", SFC's `run_with_ablations`) or clean states, or zeros. Values [1, seq, d_sae], [1, seq, d]."""
    check_choice("ablation", mode, ABLATIONS)
    check_choice("ablation_source", source, ABLATION_SOURCES)
    side = 1 if source == "patch" else 0
    out = {}
    for hook in saes:
        z, e = states.codes[hook][side], states.errors[hook][side]
        if mode == "mean":
            out[hook] = (z.mean(0, keepdim=True), e.mean(0, keepdim=True))
        else:
            out[hook] = (torch.zeros_like(z[:1]), torch.zeros_like(e[:1]))
    return out


@torch.no_grad()
def circuit_metric(run_clean: Runner, saes: dict[str, SAE], circuit: Circuit,
                   ablate: dict[str, tuple[Tensor, Tensor]]) -> float:
    """Mean m with every node outside `circuit` ablated (upstream ablations propagate to downstream codes)."""
    def make(hook: str, sae: SAE):
        keep_z = circuit.latents[hook].to(torch.bool)
        keep_e = circuit.errors[hook].to(torch.bool)[None, :, None]  # [1, 1 or seq, 1]
        z_abl, e_abl = ablate[hook]

        def fn(h: Tensor) -> Tensor:
            z, e = node_states(sae, h)
            z = torch.where(keep_z.to(z.device), z, z_abl.to(z.device))
            e = torch.where(keep_e.to(e.device), e, e_abl.to(e.device))
            return (sae.decode(z).float() + e).to(h.dtype)
        return fn

    return run_clean({hook: make(hook, sae) for hook, sae in saes.items()}).float().mean().item()


def faithfulness(m_circuit: float, m_full: float, m_empty: float) -> float:
    """F(C) = (m(C) - m(empty)) / (m(M) - m(empty)); nan when the full model and the empty circuit agree."""
    denominator = m_full - m_empty
    return float("nan") if abs(denominator) < 1e-12 else (m_circuit - m_empty) / denominator


def circuit_from_scores(effects: dict[str, HookEffects], node_threshold: float) -> Circuit:
    """Nodes with |IE| > node_threshold (latents summed over positions, error nodes as their HookEffects say)."""
    return Circuit({h: e.latent_scores().abs() > node_threshold for h, e in effects.items()},
                   {h: e.error_scores().abs() > node_threshold for h, e in effects.items()})


def top_n_circuit(effects: dict[str, HookEffects], n: int) -> Circuit:
    """The n nodes with the largest |IE| over every hook (latents and error nodes ranked together)."""
    scores = [(h, "latent", e.latent_scores().abs()) for h, e in effects.items()]
    scores += [(h, "error", e.error_scores().abs()) for h, e in effects.items()]
    flat = torch.cat([s for _, _, s in scores])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.argsort(descending=True)[:n]] = True
    masks, start = {}, 0
    for hook, kind, s in scores:
        masks[(hook, kind)] = keep[start:start + len(s)]
        start += len(s)
    return Circuit({h: masks[(h, "latent")] for h in effects}, {h: masks[(h, "error")] for h in effects})


def evaluate_circuit(run_clean: Runner, saes: dict[str, SAE], states: States, circuit: Circuit,
                     ablation: str = "mean", ablation_source: str = "patch",
                     reference: tuple[float, float] | None = None) -> dict:
    """Faithfulness of C and completeness (faithfulness of the complement M minus C; want about 0) on the prompts
    of `run_clean` / `states`: pass held-out ones for an out-of-sample score (the circuit's masks carry over).
    `reference` = (m(M), m(empty)) already measured on these prompts saves two forward passes."""
    ablate = ablation_values(saes, states, ablation, ablation_source)
    m_full, m_empty = reference or (circuit_metric(run_clean, saes, circuit.full(True), ablate),
                                    circuit_metric(run_clean, saes, circuit.full(False), ablate))
    m_c = circuit_metric(run_clean, saes, circuit, ablate)
    m_rest = circuit_metric(run_clean, saes, circuit.complement(), ablate)
    return {"m_full": m_full, "m_empty": m_empty, "m_circuit": m_c, "m_complement": m_rest,
            "faithfulness": faithfulness(m_c, m_full, m_empty),
            "completeness": faithfulness(m_rest, m_full, m_empty), "n_nodes": circuit.size(),
            "n_prompts": len(states), "ablation": ablation,
            "ablation_source": ablation_source if ablation == "mean" else None}


def faithfulness_curve(run_clean: Runner, saes: dict[str, SAE], states: States, effects: dict[str, HookEffects],
                       sizes: list[int], ablation: str = "mean", ablation_source: str = "patch") -> list[dict]:
    """Faithfulness and completeness of the top-n circuits (ranked by `effects`), for each n in `sizes`, on the
    prompts of `run_clean` / `states`."""
    circuits = [top_n_circuit(effects, n) for n in sizes]
    if not circuits:
        return []
    first = evaluate_circuit(run_clean, saes, states, circuits[0], ablation, ablation_source)
    reference = (first["m_full"], first["m_empty"])  # the same for every circuit on these prompts
    return [{"n": n, **(first if i == 0 else evaluate_circuit(run_clean, saes, states, c, ablation, ablation_source,
                                                              reference))}
            for i, (n, c) in enumerate(zip(sizes, circuits))]


# ---- edges between consecutive hooks ----------------------------------------------------------------------------
@dataclass
class Edges:
    """Edge effects between two hooks, summed over positions and averaged over prompts (SFC aggregation "sum").
    Rows: the upstream latents `up`, then the upstream error nodes; columns: the downstream latents `down`, then the
    downstream error nodes (1 per hook, or 1 per position)."""

    up: list[int]
    down: list[int]
    weight: Tensor  # [len(up) + n_error_up, len(down) + n_error_down]

    @staticmethod
    def _node(latents: list[int], index: int) -> tuple[str, int]:
        return ("latent", latents[index]) if index < len(latents) else ("error", index - len(latents))

    def items(self):
        """(source, target, weight) with nodes ("latent", i) or ("error", j): j = 0 for a per-hook error node,
        the position for per-position ones."""
        for r in range(self.weight.shape[0]):
            for c in range(self.weight.shape[1]):
                yield self._node(self.up, r), self._node(self.down, c), self.weight[r, c].item()


def edge_effects(run_clean: Runner, saes: dict[str, SAE], states: States, effects: dict[str, HookEffects],
                 upstream: str, downstream: str, up_latents: list[int], down_latents: list[int]) -> Edges:
    """IE(u -> d) = g_d . (dd/du) . Delta u (SFC `jvp`), through the network between the two hooks, for upstream
    latents and error nodes u into downstream latents and error nodes d.

    g_d is effects[downstream].grad, so edges use the same estimator as the nodes (the IG path-mean gradient when
    the nodes are IG); dd/du is taken at the clean input. Both ends are summed over positions, then averaged over
    prompts, so the edges into a node are on the scale of its effect (exactly, for a linear network)."""
    sae_up, sae_down = saes[upstream], saes[downstream]
    eff_up, eff_down = effects[upstream], effects[downstream]
    g = eff_down.grad  # [batch, seq, d_down]
    seq = g.shape[1]
    n_err_up = 1 if eff_up.error_nodes == "per_hook" else seq
    n_err_down = 1 if eff_down.error_nodes == "per_hook" else seq
    weight = torch.zeros(len(up_latents) + n_err_up, len(down_latents) + n_err_down)
    left = g @ decoder(sae_down)[down_latents].T  # [batch, seq, n_down]: g_d . d_j, the gradient at latent j
    captured: dict[str, Tensor] = {}

    def up_fn(h: Tensor) -> Tensor:
        captured["delta"] = torch.zeros_like(h, requires_grad=True)
        return h + captured["delta"]

    def down_fn(h: Tensor) -> Tensor:
        captured["h"] = h
        return h

    zc, zp = states.codes[upstream]
    ec, ep = states.errors[upstream]
    dz = (zp - zc)[..., up_latents]  # [batch, seq, n_up]
    de = ep - ec  # [batch, seq, d_up]
    d_up = decoder(sae_up)[up_latents]  # [n_up, d_up]
    with torch.enable_grad():
        try:
            run_clean({upstream: up_fn, downstream: down_fn}, stop_at=downstream)
        except _Stop:
            pass
        h = captured["h"].float()  # [batch, seq, d_down]
        codes = sae_down.encode(h).float()  # [batch, seq, d_sae_down]
        error = h - sae_down.decode(codes).float()  # [batch, seq, d_down]
        targets = [(codes[..., j] * left[..., i]).sum() for i, j in enumerate(down_latents)]
        error_terms = eff_down.error_deltas((error * g).sum(-1))  # [batch, n_err_down]: g . eps, per node
        targets += [error_terms[:, p].sum() for p in range(n_err_down)]
        for column, target in enumerate(targets):
            (v,) = torch.autograd.grad(target, captured["delta"], retain_graph=True, allow_unused=True)
            v = torch.zeros_like(de) if v is None else v.float()  # [batch, seq, d_up]: d target / d h_up
            if up_latents:
                weight[:len(up_latents), column] = ((v @ d_up.T) * dz).sum(1).mean(0)
            weight[len(up_latents):, column] = eff_up.error_deltas((v * de).sum(-1)).mean(0)
    return Edges(list(up_latents), list(down_latents), weight)
