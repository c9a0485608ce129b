"""A sparse feature circuit for a task, as a graph (JSON) and a layered plotly figure; the `saewb circuits` command.

Layout of `RUN_DIR/circuits/`: `graph.json` (task report, nodes with labels and effects, edges with weights,
faithfulness/completeness, settings), `graph.plotly.json` + `graph.html` (x = hook order, y = rank by |effect|).
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from analysis.circuits import (CircuitError, HookEffects, attribution_patching, check_hooks, circuit_from_scores,
                               collect_states, edge_effects, evaluate_circuit, faithfulness_curve,
                               integrated_gradients, lm_runner)
from analysis.tasks import TASKS, build_task, evaluate_task
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
    """Prompts in the task batch."""
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
    ablation: Literal["mean", "zero"] = "mean"
    """How nodes outside the circuit are ablated for faithfulness."""
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


def compute_circuit(model, saes: dict[str, SAE], cfg: CircuitsConfig, task=None) -> dict:
    """The circuit graph for `cfg.task` (a dict ready for JSON)."""
    cfg.validate()
    hooks = check_hooks(model, saes)
    saes = {h: saes[h].requires_grad_(False) for h in hooks}
    task = task or build_task(cfg.task, model.tokenizer, cfg.n_prompts, cfg.seed)
    report = evaluate_task(model, task)
    device = next(model.parameters()).device
    run = lm_runner(model, task.clean.to(device), task)
    run_patch = lm_runner(model, task.patch.to(device), task)
    states = collect_states(run, run_patch, saes)
    effects: dict[str, HookEffects] = (integrated_gradients(run, saes, states, cfg.ig_steps) if cfg.method == "ig"
                                       else attribution_patching(saes, states))
    circuit = circuit_from_scores(effects, cfg.node_threshold)
    largest = max(max(e.latent_scores().abs().max().item(), e.error_scores().abs().max().item())
                  for e in effects.values())
    if circuit.size() == 0:
        raise CircuitError(f"node_threshold {cfg.node_threshold} selects no node: the largest |effect| is "
                           f"{largest:.4g}; pass --node-threshold below it.")
    evaluation = evaluate_circuit(run, saes, states, circuit, cfg.ablation)
    tokens = [model.tokenizer.decode([t]) for t in task.clean[0].tolist()]
    nodes, edges, kept = [], [], {}
    for order, hook in enumerate(hooks):
        scores = effects[hook].latent_scores()
        chosen = [i for i in scores.abs().argsort(descending=True).tolist() if circuit.latents[hook][i]]
        kept[hook] = chosen[:cfg.max_nodes_per_hook]
        labels = logit_lens_labels(model, saes[hook], kept[hook])
        for rank, i in enumerate(kept[hook]):
            nodes.append({"id": f"{hook}/{i}", "hook": hook, "order": order, "kind": "latent", "latent": i,
                          "effect": scores[i].item(), "rank": rank, "label": labels[i]})
        errors = effects[hook].error_scores()
        for rank, p in enumerate(p for p in errors.abs().argsort(descending=True).tolist() if circuit.errors[hook][p]):
            nodes.append({"id": f"{hook}/err{p}", "hook": hook, "order": order, "kind": "error", "position": p,
                          "effect": errors[p].item(), "rank": len(kept[hook]) + rank,
                          "label": f"error @{p} {tokens[p]!r}"})
    error_ids = {n["id"] for n in nodes if n["kind"] == "error"}
    for up, down in zip(hooks, hooks[1:]):
        if not kept[down]:
            continue
        latent_edges, error_edges = edge_effects(run, saes, states, up, down, kept[up], kept[down])
        for j, d in enumerate(kept[down]):
            for u_index, u in enumerate(kept[up]):
                edges.append((f"{up}/{u}", f"{down}/{d}", latent_edges[u_index, j].item()))
            for p in range(error_edges.shape[0]):
                if f"{up}/err{p}" in error_ids:
                    edges.append((f"{up}/err{p}", f"{down}/{d}", error_edges[p, j].item()))
    edges = [{"source": s, "target": t, "weight": w} for s, t, w in edges if abs(w) > cfg.edge_threshold]
    nodes.append({"id": "metric", "hook": "logit difference", "order": len(hooks), "kind": "metric", "rank": 0,
                  "effect": states.clean_m.mean().item(), "label": f"{task.name} logit diff"})
    edges += [{"source": n["id"], "target": "metric", "weight": n["effect"]} for n in nodes
              if n.get("order") == len(hooks) - 1 and n["kind"] != "metric"]
    n_total = sum(int(e.latent_scores().ne(0).sum()) + e.error.shape[1] for e in effects.values())
    sizes = sorted({s for s in (1, 2, 4, 8, 16, 32, 64, 128, circuit.size()) if s <= n_total})
    curve = faithfulness_curve(run, saes, states, effects, sizes, cfg.ablation)
    return {"task": report, "prompts": task.prompts[:5], "hooks": hooks, "settings": asdict(cfg) | {"run_dir": str(cfg.run_dir)},
            "metric": "logit difference (correct - incorrect) at the last position",
            "clean_metric": states.clean_m.mean().item(), "patch_metric": states.patch_m.mean().item(),
            "largest_effect": largest, "evaluation": evaluation, "curve": curve, "nodes": nodes, "edges": edges}


def graph_figure(graph: dict):
    """Layered plotly graph: x = hook order, y = rank by |effect|; edge colour = sign, width = |weight|."""
    import plotly.graph_objects as go

    position = {n["id"]: (n["order"], -n["rank"]) for n in graph["nodes"]}
    fig = go.Figure()
    biggest = max([abs(e["weight"]) for e in graph["edges"]] or [1.0]) or 1.0
    for e in graph["edges"]:
        (x0, y0), (x1, y1) = position[e["source"]], position[e["target"]]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(width=0.5 + 4 * abs(e["weight"]) / biggest,
                                           color="royalblue" if e["weight"] > 0 else "crimson")))
    nodes = graph["nodes"]
    fig.add_trace(go.Scatter(
        x=[position[n["id"]][0] for n in nodes], y=[position[n["id"]][1] for n in nodes], mode="markers+text",
        text=[n["label"] for n in nodes], textposition="middle right", showlegend=False,
        hovertext=[f"{n['id']}<br>effect {n['effect']:.4g}" for n in nodes], hoverinfo="text",
        marker=dict(size=12, symbol=["square" if n["kind"] == "error" else "circle" for n in nodes],
                    color=[n["effect"] for n in nodes], colorscale="RdBu", cmid=0, colorbar=dict(title="effect"))))
    ticks = graph["hooks"] + ["logit difference"]
    fig.update_layout(title=f"Circuit for {graph['task']['task']} (faithfulness "
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


def run_circuits(cfg: CircuitsConfig, model=None) -> Path:
    from training.model import load_model

    cfg.validate()
    run_dir = Path(cfg.run_dir)
    saes = run_saes(run_dir, cfg.device)
    model = model or load_model(cfg.model or run_model_name(run_dir), device=cfg.device)
    task = build_task(cfg.task, model.tokenizer, cfg.n_prompts, cfg.seed)
    if task.n_skipped:
        print(f"{task.name}: skipped {task.n_skipped} words/prompts the tokenizer cannot express as one token "
              f"({', '.join(f'{k}' for k in list(task.skipped)[:8])}{', ...' if len(task.skipped) > 8 else ''}).")
    if task.note:
        print(task.note)
    graph = compute_circuit(model, saes, cfg, task)
    print(graph["task"]["message"])
    out = save_circuit(graph, run_dir)
    ev = graph["evaluation"]
    print(f"Circuit: {ev['n_nodes']} nodes (|effect| > {cfg.node_threshold}), {len(graph['edges'])} edges; "
          f"faithfulness {ev['faithfulness']:.3f}, completeness {ev['completeness']:.3f} ({cfg.ablation} ablation). "
          f"Wrote {out / 'graph.json'} and {out / 'graph.html'}.")
    return out
