"""Supervised feature dictionaries as a yardstick for SAEs, after Makelov, Lange, Nanda 2024, "Towards Principled
Evaluations of Sparse Autoencoders for Interpretability and Control" (arXiv 2405.08366; docs/methods.md §10.7).

For a task whose prompts carry known attributes (IOI: the indirect object's name `io`, the subject's name `s`, and
the name order `order`, ABBA vs BABA), the supervised (mean-difference) dictionary of activations a(p) at one hook and
position is

    u_{A,v} = mean(a | attribute A = v) - mean(a),      a(p) ≈ mean(a) + Σ_A u_{A, v_A(p)}.

The SAE is then scored against it, with the model's logit difference (answer minus wrong name) as the read-out:

- sufficiency: replace a(p) by a reconstruction (the supervised one, or the SAE's x̂): (LD(recon) − LD(mean)) /
  (LD(clean) − LD(mean)), 1 = the reconstruction carries all the task needs, 0 = no better than the mean;
- necessity: remove the reconstruction's content, a − (recon − mean recon): (LD(clean) − LD(removed)) /
  (LD(clean) − LD(mean)), 1 = nothing the task uses is left outside the reconstruction (also per attribute);
- control: edit one attribute, IO a -> b. Supervised: a − u_{io,a} + u_{io,b}. SAE: the greedy feature edit with a
  budget of k features — starting from the prompt's codes z, repeatedly set the one code z_j to its value z'_j on the
  counterfactual prompt (the same prompt with IO = b) that brings the decoded change closest to the target change
  (x̂(z') − x̂(z) by default, or the supervised u_{io,b} − u_{io,a}), the SAE's error term kept. Success = the model's
  top answer among the task's names moves to b.

`score_dictionaries` works on any activations and read-out (the tests use a planted toy); `ioi_setup` and
`supervised_scores(run_dir)` run it on the model's IOI prompts for the report card.
"""
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from saes.base import SAE

Readout = Callable[[Tensor], Tensor]
"""Activations [N, d] placed at the hook/position -> logits over the candidate answers [N, n_candidates]."""

CONVENTIONS = {
    "logit_diff": "mean over prompts of logit(answer) - logit(wrong) at the last position, among the candidates",
    "sufficiency": "(LD(recon) - LD(mean)) / (LD(clean) - LD(mean)); mean = the activation's mean over the prompts",
    "necessity": "(LD(clean) - LD(a - recon + mean recon)) / (LD(clean) - LD(mean))",
    "control": "fraction of prompts whose top candidate becomes the edit's target value",
    "sae_edit": "greedy: set at most k codes to their counterfactual values, each step the one closest to the target "
                "change; SAE error term kept",
}


# ---- the supervised dictionary --------------------------------------------------------------------------------
@dataclass
class SupervisedDictionary:
    """mean [d] and u_{A,v} = mean(a | A = v) − mean(a) for every attribute A and observed value v."""

    mean: Tensor
    vectors: dict[str, dict] = field(default_factory=dict)

    def component(self, attribute: str, values: Sequence) -> Tensor:
        """u_{A, v_p} for every prompt p: [N, d]."""
        table = self.vectors[attribute]
        missing = sorted({str(v) for v in values if v not in table})
        if missing:
            raise ValueError(f"Attribute {attribute!r} has no dictionary vector for {', '.join(missing[:5])}: build "
                             "the dictionary on prompts where these values occur.")
        return torch.stack([table[v] for v in values])

    def reconstruct(self, attributes: dict[str, Sequence], which: Sequence[str] | None = None) -> Tensor:
        """mean + Σ_A u_{A, v_A(p)} over `which` attributes (default all): [N, d]."""
        names = list(which) if which is not None else list(self.vectors)
        n = len(next(iter(attributes.values())))
        out = self.mean.expand(n, -1).clone()
        for name in names:
            out += self.component(name, attributes[name])
        return out

    def atoms(self) -> tuple[list[tuple[str, object]], Tensor]:
        """((attribute, value) labels, [n_atoms, d]) of every dictionary vector."""
        labels = [(a, v) for a, table in self.vectors.items() for v in table]
        return labels, torch.stack([self.vectors[a][v] for a, v in labels])


def supervised_dictionary(acts: Tensor, attributes: dict[str, Sequence]) -> SupervisedDictionary:
    """The mean-difference dictionary of activations [N, d] given each prompt's attribute values (N per attribute)."""
    acts = acts.float()
    mean = acts.mean(0)
    vectors: dict[str, dict] = {}
    for name, values in attributes.items():
        if len(values) != len(acts):
            raise ValueError(f"Attribute {name!r} has {len(values)} values for {len(acts)} activations.")
        table = {}
        for value in dict.fromkeys(values):  # first-seen order
            mask = torch.tensor([v == value for v in values])
            table[value] = acts[mask].mean(0) - mean
        vectors[name] = table
    return SupervisedDictionary(mean, vectors)


# ---- the SAE's greedy feature edit ----------------------------------------------------------------------------
def raw_decoder(sae: SAE) -> Tensor:
    if sae.cfg.token_norm != "none":
        raise ValueError("The feature edit needs a linear decoder: this SAE normalises each token "
                         f"({sae.cfg.token_norm}); use an SAE with token_norm 'none'.")
    return sae.W_dec.detach().float() / float(sae.input_scale)


@torch.no_grad()
def greedy_edit(sae: SAE, codes: Tensor, cf_codes: Tensor, target: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """At most k exchanges z_j <- z'_j (j where the codes differ), each step the one that most reduces
    ||target − Σ (z'_j − z_j) d_j||. codes, cf_codes [N, d_sae], target [N, d] raw space.
    Returns (the decoded change [N, d], features used per prompt [N])."""
    D = raw_decoder(sae)  # [d_sae, d]
    diff = (cf_codes - codes).float()
    candidate = diff != 0
    norms2 = (D * D).sum(-1)
    current = torch.zeros_like(target, dtype=torch.float32)
    chosen = torch.zeros_like(candidate)
    used = torch.zeros(len(codes), dtype=torch.long)
    rows = torch.arange(len(codes))
    for _ in range(k):
        proj = (target - current) @ D.T  # [N, d_sae]
        gain = 2 * diff * proj - diff * diff * norms2
        gain = gain.masked_fill(~candidate | chosen, -torch.inf)
        best_gain, best = gain.max(-1)
        ok = best_gain > 0
        if not bool(ok.any()):
            break
        step = diff[rows, best, None] * D[best]  # [N, d]
        current = current + torch.where(ok[:, None], step, 0.0)
        chosen[rows[ok], best[ok]] = True
        used += ok.long()
    return current, used


# ---- scoring ----------------------------------------------------------------------------------------------------
def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else float("nan")


def score_dictionaries(acts: Tensor, attributes: dict[str, Sequence], readout: Readout, candidates: Sequence, *,
                       answer: str = "io", wrong: str = "s", sae: SAE | None = None, edit: str = "io",
                       edit_to: Sequence | None = None, cf_acts: Tensor | None = None,
                       ks: Sequence[int] = (1, 2, 4, 8), sae_edit_target: str = "counterfactual") -> dict:
    """Sufficiency, necessity and control of the supervised dictionary and (with `sae`) of the SAE.

    acts [N, d]; attributes {name: N values}; readout(acts) -> [N, len(candidates)] logits; the answer / wrong
    attributes' values and `edit_to` (N target values of attribute `edit`) must be among `candidates`. cf_acts: the
    activations of the counterfactual prompts (attribute `edit` set to edit_to), needed for the SAE edit."""
    if sae_edit_target not in ("counterfactual", "supervised"):
        raise ValueError(f"sae_edit_target must be 'counterfactual' or 'supervised', got {sae_edit_target!r}.")
    acts = acts.float()
    n = len(acts)
    index = {c: i for i, c in enumerate(candidates)}
    try:
        ans = torch.tensor([index[v] for v in attributes[answer]])
        wrg = torch.tensor([index[v] for v in attributes[wrong]])
        tgt = torch.tensor([index[v] for v in edit_to]) if edit_to is not None else None
    except KeyError as error:
        raise ValueError(f"Value {error.args[0]!r} is not among the {len(candidates)} candidates.") from None
    rows = torch.arange(n)

    def ld(x: Tensor) -> float:
        logits = readout(x).float()
        return float((logits[rows, ans] - logits[rows, wrg]).mean())

    def control(x: Tensor) -> tuple[float, float]:
        logits = readout(x).float()
        origin = torch.tensor([index[v] for v in attributes[edit]])
        return (float((logits.argmax(-1) == tgt).float().mean()),
                float((logits[rows, tgt] - logits[rows, origin]).mean()))

    sd = supervised_dictionary(acts, attributes)
    mean = sd.mean.expand(n, -1)
    clean, ablated = ld(acts), ld(mean)
    span = clean - ablated
    recon = sd.reconstruct(attributes)
    supervised = {
        "sufficiency": _ratio(ld(recon) - ablated, span),
        "necessity": _ratio(clean - ld(acts - (recon - sd.mean)), span),
        "necessity_by_attribute": {a: _ratio(clean - ld(acts - sd.component(a, attributes[a])), span)
                                   for a in attributes},
    }
    out = {"n_prompts": n, "attributes": {a: len(t) for a, t in sd.vectors.items()},
           "logit_diff": {"clean": clean, "mean_ablation": ablated}, "supervised": supervised,
           "conventions": dict(CONVENTIONS), "reliable": bool(abs(span) >= 0.1 * abs(clean) and span != 0)}
    if not out["reliable"]:
        out["note"] = (f"Mean-ablating this activation moves the logit difference by only {span:+.3g} (clean "
                       f"{clean:.3g}): the task barely reads it here, so sufficiency and necessity, ratios over that "
                       "difference, are unstable. Try a later layer or another position.")
    edited_sd = None
    if tgt is not None:
        edited_sd = acts - sd.component(edit, attributes[edit]) + sd.component(edit, edit_to)
        supervised["control"], supervised["control_logit_diff"] = control(edited_sd)
        if cf_acts is not None:
            out["counterfactual_patch_control"] = control(cf_acts.float())[0]
    if sae is None:
        return out
    with torch.no_grad():
        codes = sae.encode(acts)
        x_hat = sae.decode(codes).float()
    labels, atoms = sd.atoms()
    D = raw_decoder(sae)
    cos = torch.nn.functional.normalize(atoms, dim=-1) @ torch.nn.functional.normalize(D, dim=-1).T  # [atoms, d_sae]
    best = cos.max(-1).values
    scores = {
        "sufficiency": _ratio(ld(x_hat) - ablated, span),
        "necessity": _ratio(clean - ld(acts - (x_hat - x_hat.mean(0))), span),
        "best_cosine": {a: float(best[[i for i, (b, _) in enumerate(labels) if b == a]].mean()) for a in sd.vectors},
        "l0": float((codes != 0).float().sum(-1).mean()),
    }
    out["sae"] = scores
    if tgt is not None and cf_acts is not None:
        with torch.no_grad():
            cf_codes = sae.encode(cf_acts.float())
            target = (sae.decode(cf_codes).float() - x_hat if sae_edit_target == "counterfactual"
                      else edited_sd - acts)
        scores["edit_target"] = sae_edit_target
        scores["control"], scores["control_logit_diff"], scores["features_used"] = {}, {}, {}
        for k in ks:
            change, used = greedy_edit(sae, codes, cf_codes, target, k)
            scores["control"][k], scores["control_logit_diff"][k] = control(acts + change)
            scores["features_used"][k] = float(used.float().mean())
    return out


def supervised_figure(scores: dict):
    """The report card's picture of `score_dictionaries` output: sufficiency and necessity of the supervised
    dictionary beside the SAE's, and IO-edit control against the SAE's feature budget k, with the supervised edit
    and the counterfactual-patch ceiling as reference lines."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("sufficiency and necessity (1 = all the task reads)",
                                                        "control: IO edit success vs SAE features edited"))
    sup, sae = scores["supervised"], scores.get("sae") or {}
    for name, part in (("supervised dictionary", sup), ("SAE", sae)):
        if part:
            fig.add_trace(go.Bar(x=["sufficiency", "necessity"], y=[part["sufficiency"], part["necessity"]],
                                 name=name, legendgroup=name), row=1, col=1)
    if sae.get("control"):
        ks = sorted(sae["control"], key=int)
        fig.add_trace(go.Scatter(x=[int(k) for k in ks], y=[sae["control"][k] for k in ks], mode="lines+markers",
                                 name="SAE greedy edit", legendgroup="SAE"), row=1, col=2)
    for key, value, dash, where in (
            ("supervised edit", sup.get("control"), "dash", "top left"),
            ("counterfactual patch (ceiling)", scores.get("counterfactual_patch_control"), "dot", "bottom right")):
        if value is not None:
            fig.add_hline(y=value, line_dash=dash, annotation_text=f"{key} {value:.2f}", annotation_position=where,
                          row=1, col=2)
    ks = sorted(int(k) for k in sae.get("control", {}))
    fig.update_xaxes(title_text="k (features edited)", type="log", tickvals=ks or None, row=1, col=2)
    fig.update_yaxes(title_text="fraction of prompts", range=[0, 1.05], row=1, col=2)
    where = f"{scores.get('hook', '')} @ {scores.get('position_name', '')}"
    note = "" if scores.get("reliable", True) else " (unreliable: the task barely reads this activation)"
    fig.update_layout(title=f"Supervised IOI dictionary vs the SAE at {where}, {scores['n_prompts']} prompts{note}")
    return fig


# ---- IOI on a model ---------------------------------------------------------------------------------------------
@dataclass
class IOISetup:
    """IOI prompts with their attributes, a counterfactual per prompt (IO replaced by another name at its position),
    and where the activations are read."""

    tokens: Tensor  # [N, T]
    cf_tokens: Tensor  # [N, T]
    attributes: dict[str, list]  # io, s: name token ids; order: "ABBA" / "BABA"
    edit_to: list[int]  # the counterfactual IO name per prompt
    candidates: list[int]  # every name token id of the batch
    positions: dict[str, int]  # end, s2: the same for every prompt
    prompts: list[str]
    report: dict


def ioi_setup(model, n_prompts: int = 64, seed: int = 0) -> IOISetup:
    """The model's IOI batch (analysis/tasks.py) with attributes and counterfactuals. Every prompt has the same
    length and template, so the END and S2 positions are shared (IO's depends on the order)."""
    from analysis.tasks import build_task, evaluate_task

    task = build_task("ioi", model.tokenizer, n_prompts, seed)
    io, s = task.ids[:, 0].tolist(), task.ids[:, 1].tolist()
    tokens = task.clean
    io_pos = [(row == a).nonzero()[0, 0].item() for row, a in zip(tokens, io)]
    s_pos = [(row == b).nonzero()[:, 0].tolist() for row, b in zip(tokens, s)]
    order = ["ABBA" if p < q[0] else "BABA" for p, q in zip(io_pos, s_pos)]
    rng = random.Random(seed)
    names = sorted(set(io))  # counterfactual targets: names seen as IO (so u_{io,b} exists)
    edit_to = [rng.choice([c for c in names if c not in (a, b)]) for a, b in zip(io, s)]
    cf = tokens.clone()
    cf[torch.arange(len(tokens)), torch.tensor(io_pos)] = torch.tensor(edit_to)
    positions = {"end": tokens.shape[1] - 1}
    if len({q[-1] for q in s_pos}) == 1 and all(len(q) == 2 for q in s_pos):
        positions["s2"] = s_pos[0][-1]  # the subject's second mention
    return IOISetup(tokens, cf, {"io": io, "s": s, "order": order}, edit_to, sorted(set(io) | set(s)), positions,
                    task.prompts, evaluate_task(model, task))


def _flat(act: Tensor) -> Tensor:
    return act.reshape(*act.shape[:2], -1)  # [N, T, d] (hook_z's heads concatenated)


@torch.no_grad()
def hook_acts(model, tokens: Tensor, hook: str, position: int) -> Tensor:
    """Activations at `hook` and `position`: [N, d] (hook_z flattened head-major)."""
    device = next(model.parameters()).device
    _, cache = model.run_with_cache(tokens.to(device), names_filter=[hook])
    return _flat(cache[hook])[:, position].float().cpu()


def model_readout(model, tokens: Tensor, hook: str, position: int, candidates: list[int]) -> Readout:
    """Run the prompts with the activation at (hook, position) replaced; logits of the candidates, last position."""
    device = next(model.parameters()).device
    ids = torch.tensor(candidates, device=device)

    @torch.no_grad()
    def readout(x: Tensor) -> Tensor:
        def patch(act: Tensor, hook) -> Tensor:
            act = act.clone()
            act[:, position] = x.to(act.device, act.dtype).reshape(act[:, position].shape)
            return act

        logits = model.run_with_hooks(tokens.to(device), fwd_hooks=[(hook, patch)])
        return logits[:, -1, ids].float().cpu()

    return readout


def ioi_scores(model, sae: SAE | None, hook: str, position: str | int = "end", n_prompts: int = 64, seed: int = 0,
               ks: Sequence[int] = (1, 2, 4, 8), sae_edit_target: str = "counterfactual") -> dict:
    """score_dictionaries on the model's IOI prompts at (hook, position): position 'end', 's2' or an index."""
    setup = ioi_setup(model, n_prompts, seed)
    pos = setup.positions[position] if isinstance(position, str) else int(position) % setup.tokens.shape[1]
    acts = hook_acts(model, setup.tokens, hook, pos)
    cf_acts = hook_acts(model, setup.cf_tokens, hook, pos)
    if sae is not None and sae.cfg.d_in != acts.shape[-1]:
        raise ValueError(f"The SAE reads width {sae.cfg.d_in}, but {hook} has width {acts.shape[-1]}.")
    readout = model_readout(model, setup.tokens, hook, pos, setup.candidates)
    out = score_dictionaries(acts, setup.attributes, readout, setup.candidates, sae=sae, edit="io",
                             edit_to=setup.edit_to, cf_acts=cf_acts, ks=ks, sae_edit_target=sae_edit_target)
    tok = model.tokenizer
    return out | {"task": "ioi", "hook": hook, "position": pos, "position_name": position,
                  "token_at_position": tok.decode([int(setup.tokens[0, pos])]),
                  "model_does_task": setup.report["does_task"], "task_message": setup.report["message"],
                  "example_prompt": setup.prompts[0],
                  "example_edit": f"IO {tok.decode([setup.attributes['io'][0]])!r} -> "
                                  f"{tok.decode([setup.edit_to[0]])!r}"}


def supervised_scores(run_dir: str | Path, task: str = "ioi", position: str | int = "end", n_prompts: int = 64,
                      seed: int = 0, ks: Sequence[int] = (1, 2, 4, 8), model=None, device: str = "cpu",
                      sae_edit_target: str = "counterfactual") -> dict:
    """The report-card entry for an SAE trained on task data: its run folder's SAE scored against the supervised
    IOI dictionary at the SAE's own hook. `model`: a loaded model or a name; default the run's model."""
    from saes import load_sae

    if task != "ioi":
        raise ValueError(f"Supervised dictionaries are built for IOI's attributes (io, s, order); got task {task!r}.")
    run_dir = Path(run_dir)
    sae = load_sae(run_dir, device=device)
    hook = sae.cfg.hook_name or sae.cfg.metadata.get("hook_name", "")
    if not hook:
        raise ValueError(f"{run_dir}'s SAE does not say which hook it reads (cfg hook_name).")
    if model is None or isinstance(model, str):
        from analysis.circuit_graph import run_model_name
        from training.model import load_model

        model = load_model(model or run_model_name(run_dir), device=device)
    return ioi_scores(model, sae, hook, position, n_prompts, seed, ks, sae_edit_target)
