"""A sparse feature circuit for a task, as a graph (JSON) and a layered plotly figure; the `saewb circuits` command.

Layout of `RUN_DIR/circuits/`: `graph.json` (task report, nodes with labels and effects, edges with weights,
faithfulness/completeness, settings), `graph.plotly.json` + `graph.html` (x = hook order, y = rank by |effect|).
"""
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from analysis.circuits import (CircuitError, HookEffects, attribution_patching, check_hooks, circuit_from_scores,
                               collect_states, edge_effects, evaluate_circuit, faithfulness_curve,
                               integrated_gradients, lm_runner)
from analysis.tasks import TASKS, TaskData, build_split, build_task, evaluate_task, split_task
from saes.base import SAE


@dataclass
class CircuitsConfig:
    """Find a sparse feature circuit (Marks et al. 2024) for a task with the run's SAE; write RUN_DIR/circuits/."""

    run_dir: Path = Path("runs/demo")
    """Run folder holding the SAE (cfg.json + sae_weights.safetensors)."""
    task: str = "ioi"
    """Task: ioi, greater_than or sva (analysis/tasks.py)."""
    model: str | None = None
    """Model; default the one the run was trained on (its config.json)."""
    n_prompts: int = 32
    """Prompts the circuit is found on (discovery split)."""
    n_eval_prompts: int = 32
    """Held-out prompts faithfulness and completeness are measured on (evaluation split); 0 measures them on the
    discovery prompts (in-sample)."""
    method: Literal["ig", "atp"] = "ig"
    """Node effects: integrated gradients or attribution patching."""
    ig_steps: int = 10
    """Integrated-gradient steps S."""
    node_threshold: float = 0.1
    """Keep nodes with |indirect effect| above this (in logit-difference units)."""
    edge_threshold: float = 0.01
    """Keep edges with |effect| above this."""
    max_nodes_per_hook: int = 20
    """At most this many latents per hook enter the graph (largest |effect| first)."""
    error_nodes: Literal["per_hook", "per_position"] = "per_hook"
    """One SAE-error node per hook, summed over positions (Marks et al.'s code), or one per position."""
    ablation: Literal["mean", "zero"] = "mean"
    """How nodes outside the circuit are ablated for faithfulness."""
    ablation_source: Literal["patch", "clean"] = "patch"
    """Mean ablation averages over the corrupted prompts (Marks et al.) or the clean ones."""
    seed: int = 0
    """Seed of the task's prompts."""
    device: str = "cpu"
    """Device."""

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r}: choose one of {', '.join(TASKS)}.")
        if self.node_threshold < 0 or self.edge_threshold < 0:
            raise ValueError("node_threshold and edge_threshold must be >= 0.")
        if self.max_nodes_per_hook < 1:
            raise ValueError(f"max_nodes_per_hook must be >= 1, got {self.max_nodes_per_hook}.")
        if self.n_prompts < 2 or self.n_eval_prompts < 0 or self.n_eval_prompts == 1:
            raise ValueError(f"n_prompts must be >= 2 and n_eval_prompts 0 (in-sample) or >= 2, got "
                             f"{self.n_prompts} and {self.n_eval_prompts}.")

    def tasks(self, tokenizer) -> tuple[TaskData, TaskData | None]:
        """(discovery, evaluation) prompts; evaluation None when n_eval_prompts is 0 (in-sample evaluation)."""
        if self.n_eval_prompts == 0:
            return build_task(self.task, tokenizer, self.n_prompts, self.seed), None
        return build_split(self.task, tokenizer, self.n_prompts, self.n_eval_prompts, self.seed)

    def conventions(self) -> dict:
        """What the numbers mean, written next to them (JSON and CLI)."""
        errors = ("one per hook, summed over positions (Marks et al.'s code)" if self.error_nodes == "per_hook"
                  else "one per position")
        method = f"integrated gradients, S={self.ig_steps}" if self.method == "ig" else "attribution patching"
        ablation = ("zero" if self.ablation == "zero" else
                    f"mean over the {'corrupted (Marks et al.)' if self.ablation_source == 'patch' else 'clean'} "
                    "prompts of the evaluated batch, per position")
        return {"error_nodes": errors, "node_effects": method,
                "edges": f"g_down . d(down)/d(up) . delta up with g_down from {method}, Jacobian at the clean input",
                "ablation": ablation,
                "evaluation": ("held-out prompts (evaluation split)" if self.n_eval_prompts
                               else "in-sample (the discovery prompts)")}


def logit_lens_labels(model, sae: SAE, latents: list[int], n_tokens: int = 3) -> dict[int, str]:
    """'#i: tok1|tok2|tok3', the top tokens of the latent's direct path to the logits (through the final norm's
    weight, `training.model.direct_logits`) when the SAE reads d_model, else '#i'."""
    from training.model import direct_logits

    labels = {i: f"#{i}" for i in latents}
    W_U = getattr(model, "W_U", None)
    if W_U is None or not latents or W_U.shape[0] != sae.cfg.d_in:
        return labels
    with torch.no_grad():
        directions = sae.W_dec[latents].detach() / sae.input_scale  # [n, d_model]
        top = direct_logits(model, directions).topk(n_tokens, dim=-1).indices
    for i, row in zip(latents, top.tolist()):
        labels[i] = f"#{i}: " + "|".join(model.tokenizer.decode([t]).strip() or repr(model.tokenizer.decode([t]))
                                         for t in row)
    return labels


def compute_circuit(model, saes: dict[str, SAE], cfg: CircuitsConfig, task: TaskData | None = None,
                    eval_task: TaskData | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """The circuit graph for `cfg.task` (a dict ready for JSON), found on the discovery prompts and evaluated on
    held-out ones. `task` alone is split as cfg says (n_eval_prompts 0: kept whole, evaluated in-sample).
    `progress(message)` is told each stage as it starts (e.g. to fill a status box)."""
    say = progress or (lambda message: None)
    cfg.validate()
    hooks = check_hooks(model, saes)
    saes = {h: saes[h].requires_grad_(False) for h in hooks}
    if task is None:
        task, eval_task = cfg.tasks(model.tokenizer)
    elif eval_task is None and cfg.n_eval_prompts:
        task, eval_task = split_task(task, cfg.n_eval_prompts / (cfg.n_prompts + cfg.n_eval_prompts), cfg.seed)
    say(f"Scoring the model on {len(task)} {task.name} prompts")
    report = evaluate_task(model, task)
    device = next(model.parameters()).device
    run = lm_runner(model, task.clean.to(device), task)
    run_patch = lm_runner(model, task.patch.to(device), task)
    say("Clean and patched activations at " + ", ".join(hooks))
    states = collect_states(run, run_patch, saes)
    say("Node effects (" + (f"integrated gradients, {cfg.ig_steps} steps" if cfg.method == "ig"
                            else "attribution patching") + ")")
    effects: dict[str, HookEffects] = (
        integrated_gradients(run, saes, states, cfg.ig_steps, cfg.error_nodes) if cfg.method == "ig"
        else attribution_patching(saes, states, cfg.error_nodes))
    if eval_task is None:
        run_eval, eval_states = run, states
    else:
        run_eval = lm_runner(model, eval_task.clean.to(device), eval_task)
        eval_states = collect_states(run_eval, lm_runner(model, eval_task.patch.to(device), eval_task), saes,
                                     grad=False)
    circuit = circuit_from_scores(effects, cfg.node_threshold)
    largest = max(max(e.latent_scores().abs().max().item(), e.error_scores().abs().max().item())
                  for e in effects.values())
    if circuit.size() == 0:
        raise CircuitError(f"node_threshold {cfg.node_threshold} selects no node: the largest |effect| is "
                           f"{largest:.4g}; pass --node-threshold below it.")
    say(f"Faithfulness and completeness of {circuit.size()} nodes")
    evaluation = evaluate_circuit(run_eval, saes, eval_states, circuit, cfg.ablation, cfg.ablation_source)
    in_sample = (evaluation if eval_task is None else
                 evaluate_circuit(run, saes, states, circuit, cfg.ablation, cfg.ablation_source))
    tokens = [model.tokenizer.decode([t]) for t in task.clean[0].tolist()]
    nodes, edges, kept = [], [], {}
    for order, hook in enumerate(hooks):
        scores = effects[hook].latent_scores()
        chosen = [i for i in scores.abs().argsort(descending=True).tolist() if circuit.latents[hook][i]]
        kept[hook] = chosen[:cfg.max_nodes_per_hook]
        labels = logit_lens_labels(model, saes[hook], kept[hook])
        by_position = effects[hook].latent.mean(0)  # [seq, d_sae]: where each latent's effect sits
        for rank, i in enumerate(kept[hook]):
            position = int(by_position[:, i].abs().argmax())
            nodes.append({"id": f"{hook}/{i}", "hook": hook, "order": order, "kind": "latent", "latent": i,
                          "effect": scores[i].item(), "rank": rank, "label": labels[i], "position": position,
                          "token": tokens[position]})
        errors = effects[hook].error_scores()  # [1] per hook or [seq] per position
        per_hook = cfg.error_nodes == "per_hook"
        for rank, p in enumerate(p for p in errors.abs().argsort(descending=True).tolist() if circuit.errors[hook][p]):
            nodes.append({"id": error_id(hook, p, per_hook), "hook": hook, "order": order, "kind": "error",
                          "position": None if per_hook else p, "effect": errors[p].item(),
                          "rank": len(kept[hook]) + rank,
                          "label": "error (all positions)" if per_hook else f"error @{p} {tokens[p]!r}"})
    ids = {n["id"] for n in nodes}
    for up, down in zip(hooks, hooks[1:]):
        say(f"Edges {up} -> {down}")
        found = edge_effects(run, saes, states, effects, up, down, kept[up], kept[down])
        for (kind_u, u), (kind_d, d), weight in found.items():
            source = f"{up}/{u}" if kind_u == "latent" else error_id(up, u, cfg.error_nodes == "per_hook")
            target = f"{down}/{d}" if kind_d == "latent" else error_id(down, d, cfg.error_nodes == "per_hook")
            if source in ids and target in ids:
                edges.append((source, target, weight))
    edges = [{"source": s, "target": t, "weight": w} for s, t, w in edges if abs(w) > cfg.edge_threshold]
    nodes.append({"id": "metric", "hook": "logit difference", "order": len(hooks), "kind": "metric", "rank": 0,
                  "effect": states.clean_m.mean().item(), "label": f"{task.name} logit diff"})
    edges += [{"source": n["id"], "target": "metric", "weight": n["effect"]} for n in nodes
              if n.get("order") == len(hooks) - 1 and n["kind"] != "metric"]
    n_total = sum(int(e.latent_scores().ne(0).sum()) + len(e.error_scores()) for e in effects.values())
    sizes = sorted({s for s in (1, 2, 4, 8, 16, 32, 64, 128, circuit.size()) if s <= n_total})
    say(f"Faithfulness curve over {len(sizes)} circuit sizes")
    curve = faithfulness_curve(run_eval, saes, eval_states, effects, sizes, cfg.ablation, cfg.ablation_source)
    split = {"discovery": len(task), "evaluation": len(eval_task) if eval_task is not None else 0,
             "evaluation_prompts": eval_task.prompts[:5] if eval_task is not None else []}
    return {"task": report, "prompts": task.prompts[:5], "tokens": tokens, "hooks": hooks, "settings": asdict(cfg) | {"run_dir": str(cfg.run_dir)},
            "metric": "logit difference (correct - incorrect) at the last position",
            "conventions": cfg.conventions(), "split": split,
            "clean_metric": states.clean_m.mean().item(), "patch_metric": states.patch_m.mean().item(),
            "largest_effect": largest, "evaluation": evaluation, "evaluation_in_sample": in_sample, "curve": curve,
            "nodes": nodes, "edges": edges}


def error_id(hook: str, index: int, per_hook: bool) -> str:
    """Graph id of an error node: one per hook ('hook/err') or per position ('hook/err3')."""
    return f"{hook}/err" if per_hook else f"{hook}/err{index}"


def layered_edges(graph: dict, opacity: float = 1.0):
    """A figure holding a layered graph's edges (x = node order, y = -rank; colour = sign, width = |weight|) and
    each node's position: shared by the circuit figures here, in analysis.patch_free and in the app."""
    import plotly.graph_objects as go

    position = {n["id"]: (n["order"], -n["rank"]) for n in graph["nodes"]}
    fig = go.Figure()
    biggest = max([abs(e["weight"]) for e in graph["edges"]] or [1.0]) or 1.0
    for e in graph["edges"]:
        (x0, y0), (x1, y1) = position[e["source"]], position[e["target"]]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                 opacity=opacity, line=dict(width=0.5 + 4 * abs(e["weight"]) / biggest,
                                                            color="royalblue" if e["weight"] > 0 else "crimson")))
    return fig, position


def graph_figure(graph: dict):
    """Layered plotly graph: x = hook order, y = rank by |effect|; edge colour = sign, width = |weight|."""
    import plotly.graph_objects as go

    fig, position = layered_edges(graph)
    nodes = graph["nodes"]
    fig.add_trace(go.Scatter(
        x=[position[n["id"]][0] for n in nodes], y=[position[n["id"]][1] for n in nodes], mode="markers+text",
        text=[n["label"] for n in nodes], textposition="middle right", showlegend=False,
        hovertext=[f"{n['id']}<br>effect {n['effect']:.4g}" for n in nodes], hoverinfo="text",
        marker=dict(size=12, symbol=["square" if n["kind"] == "error" else "circle" for n in nodes],
                    color=[n["effect"] for n in nodes], colorscale="RdBu", cmid=0, colorbar=dict(title="effect"))))
    ticks = graph["hooks"] + ["logit difference"]
    where = "held-out " if graph.get("split", {}).get("evaluation") else ""
    fig.update_layout(title=f"Circuit for {graph['task']['task']} ({where}faithfulness "
                            f"{graph['evaluation']['faithfulness']:.2f}, {graph['evaluation']['n_nodes']} nodes)",
                      xaxis=dict(tickvals=list(range(len(ticks))), ticktext=ticks), yaxis=dict(showticklabels=False),
                      height=300 + 25 * max(1, max(n["rank"] for n in nodes)))
    return fig


def curve_figure(curve: list[dict], title: str = "Faithfulness and completeness as the circuit grows"):
    import plotly.graph_objects as go

    fig = go.Figure()
    for key in ("faithfulness", "completeness"):
        fig.add_trace(go.Scatter(x=[r["n"] for r in curve], y=[r[key] for r in curve], mode="lines+markers", name=key))
    fig.update_layout(title=title, xaxis=dict(title="nodes in the circuit (top |effect|)", type="log"),
                      yaxis=dict(title="(m(C) - m(empty)) / (m(M) - m(empty))"))
    return fig


def save_circuit(graph: dict, run_dir: str | Path) -> Path:
    out = Path(run_dir) / "circuits"
    out.mkdir(parents=True, exist_ok=True)
    (out / "graph.json").write_text(json.dumps(graph, indent=1))
    fig = graph_figure(graph)
    fig.write_json(str(out / "graph.plotly.json"))
    fig.write_html(str(out / "graph.html"), include_plotlyjs="cdn")
    curve_figure(graph["curve"]).write_html(str(out / "curve.html"), include_plotlyjs="cdn")
    return out


def run_model_name(run_dir: Path) -> str:
    config = next((json.loads((p / "config.json").read_text()) for p in (run_dir, run_dir.parent)
                   if (p / "config.json").is_file()), None)
    if config is None or "cache" not in config:
        raise ValueError(f"No training config.json in {run_dir} or its parent: pass --model.")
    return config["cache"]["model"]


def run_saes(run_dir: Path, device: str = "cpu") -> dict[str, SAE]:
    """{hook: SAE}: the run's SAE, or for a folder of SAEs trained together (`saewb train --hooks A B ...`)
    one SAE per hook point, so the circuit spans several hooks."""
    from saes import load_sae

    folders = [run_dir] if (run_dir / "cfg.json").is_file() else sorted(p.parent for p in run_dir.glob("*/cfg.json"))
    if not folders:
        raise ValueError(f"{run_dir} holds no SAE (cfg.json + sae_weights.safetensors): train one first.")
    saes: dict[str, SAE] = {}
    for folder in folders:
        sae = load_sae(folder, device=device)
        hook = sae.cfg.hook_name or sae.cfg.metadata.get("hook_name", "")
        if hook in saes:
            raise ValueError(f"{run_dir} has several SAEs at {hook}: pass one SAE folder, or a sweep with one SAE "
                             "per hook (e.g. `saewb train --hooks A B --architectures topk --k 32`).")
        saes[hook] = sae
    return saes


def run_circuits(cfg: CircuitsConfig, model=None, progress: Callable[[str], None] | None = None) -> Path:
    """Find, save and print the circuit (`saewb circuits`); `progress(message)` hears each stage (compute_circuit)."""
    from training.model import load_model

    cfg.validate()
    run_dir = Path(cfg.run_dir)
    saes = run_saes(run_dir, cfg.device)
    model = model or load_model(cfg.model or run_model_name(run_dir), device=cfg.device)
    task, eval_task = cfg.tasks(model.tokenizer)
    if task.n_skipped:
        print(f"{task.name}: skipped {task.n_skipped} words/prompts the tokenizer cannot express as one token "
              f"({', '.join(f'{k}' for k in list(task.skipped)[:8])}{', ...' if len(task.skipped) > 8 else ''}).")
    if task.note:
        print(task.note)
    graph = compute_circuit(model, saes, cfg, task, eval_task, progress)
    print(graph["task"]["message"])
    if progress is not None:
        progress(f"Writing {run_dir / 'circuits'}")
    out = save_circuit(graph, run_dir)
    ev, ins, conv = graph["evaluation"], graph["evaluation_in_sample"], graph["conventions"]
    where = (f"on {ev['n_prompts']} held-out prompts (in-sample on {ins['n_prompts']}: faithfulness "
             f"{ins['faithfulness']:.3f}, completeness {ins['completeness']:.3f})" if eval_task is not None
             else f"in-sample on the {ev['n_prompts']} discovery prompts")
    print(f"Circuit: {ev['n_nodes']} nodes (|effect| > {cfg.node_threshold}), {len(graph['edges'])} edges; "
          f"faithfulness {ev['faithfulness']:.3f}, completeness {ev['completeness']:.3f} {where}.\n"
          f"Conventions: node effects {conv['node_effects']}; error nodes {conv['error_nodes']}; ablation "
          f"{conv['ablation']}. Wrote {out / 'graph.json'} and {out / 'graph.html'}.")
    return out
