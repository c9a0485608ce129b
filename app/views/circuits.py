"""Circuits page: find a sparse feature circuit for a task from here (as `saewb circuits` does: RUN_DIR/circuits/
graph.json), or read the one saved for this run; its layered graph (labels above the edges, token positions, the
sign of effects explained), its faithfulness curve, and links from each latent node to its feature page."""
import html
import time

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from analysis.circuit_graph import CircuitsConfig, curve_figure, layered_edges, run_circuits
from analysis.tasks import TASKS
from app import common

SIGNS = ("**Effect** of a node: the estimated change in the metric m = logit(correct) − logit(incorrect) at the last "
         "position when the node is moved from its value on the clean prompt to its value on the corrupted one "
         "(∇m · (corrupted − clean), by {method}). **Negative (red)**: corrupting the node lowers m, so on clean "
         "prompts it carries the correct answer; **positive (blue)**: corrupting it raises m, it works against the "
         "answer. **Edges** carry the part of the downstream node's effect that flows through the upstream node "
         "(g_down · ∂down/∂up · Δup), with the same signs: blue positive, red negative, width ∝ |weight|. "
         "**@p ‘tok’**: the position (in the first discovery prompt) where the latent's effect is largest; error "
         "nodes are the SAE's reconstruction error.")


def node_text(node: dict, store, own_hook: str | None) -> str:
    """What a node is called in the figure and table: '#id label' for latents (the feature store's label, else the
    logit-lens tokens), with the token position of its largest effect."""
    if node["kind"] != "latent":
        return node["label"]
    title = common.latent_title(store if node["hook"] == own_hook else None, node["latent"])
    if title == f"#{node['latent']}":  # no label in the store: the logit-lens tokens saved with the node
        title = node.get("label") or title
    if node.get("position") is not None:
        title += f" @{node['position']} ‘{node.get('token', '')}’"
    return title


def layered_figure(graph: dict, texts: dict[str, str]) -> go.Figure:
    """x = hook order, y = rank by |effect|; edges under the nodes, node labels as boxed annotations on top of
    everything (so no edge covers them); colour = sign of the effect."""
    fig, position = layered_edges(graph, opacity=0.55)
    for name, colour in (("edge weight > 0", "royalblue"), ("edge weight < 0", "crimson")):  # legend entries
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color=colour, width=3), name=name))
    nodes = [n for n in graph["nodes"] if n["kind"] != "metric"]
    metric = [n for n in graph["nodes"] if n["kind"] == "metric"]
    fig.add_trace(go.Scatter(
        x=[position[n["id"]][0] for n in nodes], y=[position[n["id"]][1] for n in nodes], mode="markers",
        name="nodes (colour: effect)", showlegend=False, hoverinfo="text",
        hovertext=[f"{html.escape(texts[n['id']])}<br>{n['hook']}<br>effect {n['effect']:.4g}" for n in nodes],
        marker=dict(size=13, symbol=["square" if n["kind"] == "error" else "circle" for n in nodes],
                    color=[n["effect"] for n in nodes], colorscale="RdBu", cmid=0, line=dict(width=1, color="#333"),
                    colorbar=dict(title="effect on m", x=1.02))))
    if metric:
        fig.add_trace(go.Scatter(x=[position[n["id"]][0] for n in metric], y=[position[n["id"]][1] for n in metric],
                                 mode="markers", showlegend=False, hoverinfo="text",
                                 hovertext=[f"m on clean prompts: {n['effect']:.4g}" for n in metric],
                                 marker=dict(size=16, symbol="diamond", color="#888")))
    for n in graph["nodes"]:
        x, y = position[n["id"]]
        fig.add_annotation(x=x, y=y, text=html.escape(texts[n["id"]]), showarrow=False, xanchor="left", xshift=10,
                           bgcolor="rgba(255,255,255,0.92)", bordercolor="rgba(0,0,0,0.15)", borderpad=2,
                           font=dict(size=11))
    ticks = graph["hooks"] + ["logit difference"]
    where = "held-out " if graph.get("split", {}).get("evaluation") else ""
    fig.update_layout(
        title=f"Circuit for {graph['task']['task']} ({where}faithfulness {graph['evaluation']['faithfulness']:.2f}, "
              f"{graph['evaluation']['n_nodes']} nodes)",
        xaxis=dict(tickvals=list(range(len(ticks))), ticktext=ticks, range=[-0.3, len(ticks) - 0.2],
                   title="hook (upstream → downstream)"),
        yaxis=dict(showticklabels=False, title="rank by |effect|", zeroline=False),
        legend=dict(orientation="h", y=-0.15), plot_bgcolor="white",
        height=320 + 28 * max(1, max(n["rank"] for n in graph["nodes"])), margin=dict(r=40))
    return fig


st.title("Circuits")
run = common.require_run()
from analysis.patch_free import graph_figure as patch_free_figure, load_patch_free  # noqa: E402 (methods §10.3)

patch_free = load_patch_free(run.path)
if patch_free is not None:
    with st.expander(f"Patch-free circuit: {patch_free['target']['label']}", expanded=run.circuit() is None):
        st.caption("Traced without patching (He et al. 2024): frozen norms; OV with the attention pattern fixed; QK "
                   "pairs split half-half; MLP terms are gradient x activation, an APPROXIMATION whose miss is its own "
                   "node. " + "; ".join(f"{c['node']}: {c['value']:.4g} = parts {c['sum_of_parts']:.4g}"
                                        for c in patch_free["checks"][:3]))
        st.plotly_chart(patch_free_figure(patch_free), use_container_width=True)
store = common.require_features(run) if run.has_features() else None
model_name = run.config().get("cache", {}).get("model")
graph = run.circuit()

with st.expander("Find a circuit", expanded=graph is None):
    st.caption("Finds the circuit on discovery prompts and scores it on as many held-out ones, as `saewb circuits` "
               "does, and saves it as this run's circuits/graph.json (replacing the one shown).")
    c1, c2, c3, c4 = st.columns(4)
    task_name = c1.selectbox("Task", TASKS, key="circuit_task")
    n_prompts = int(c2.number_input("Prompts", 2, 256, 16, key="circuit_prompts",
                                    help="Discovery prompts; as many held-out prompts score the circuit."))
    threshold = float(c3.number_input("Node threshold", 0.0, 100.0, 0.1, step=0.01, format="%.4g",
                                      key="circuit_threshold", help="Keep nodes with |effect| above this."))
    method = c4.selectbox("Node effects", ["ig", "atp"], key="circuit_method",
                          format_func=lambda m: "integrated gradients" if m == "ig" else "attribution patching")
    if st.button("Find circuit", type="primary", key="circuit_go"):
        if not model_name:
            st.error(f"{run.path} does not say which model it was trained on (config.json): run `saewb circuits "
                     f"--run-dir {run.path} --model NAME`.")
            st.stop()
        started = time.perf_counter()
        with st.status(f"Finding a circuit for {task_name} on {n_prompts} prompts", expanded=True) as status:
            try:
                model, _ = common.model_and_sae(model_name, str(run.path))
                cfg = CircuitsConfig(run_dir=run.path, task=task_name, n_prompts=n_prompts, n_eval_prompts=n_prompts,
                                     node_threshold=threshold, method=method)
                run_circuits(cfg, model=model, progress=st.write)
            except (ValueError, RuntimeError) as error:  # CircuitError / TaskError are ValueErrors
                status.update(label=f"No circuit for {task_name}", state="error", expanded=True)
                st.error(str(error))
            else:
                status.update(label=f"Circuit for {task_name} found in {time.perf_counter() - started:.1f} s and "
                                    "saved", state="complete", expanded=False)
        graph = run.circuit()

if graph is None:
    st.info(f"No circuit for this run yet: find one above, or run `saewb circuits --run-dir {run.path} --task sva` "
            "(tasks: ioi, greater_than, sva), then reload.")
    st.stop()
task = graph["task"]
st.markdown(f"**Task** `{task['task']}`: {task.get('message', '')}")
evaluation = graph["evaluation"]
held_out = bool(graph.get("split", {}).get("evaluation"))
where = "held-out" if held_out else "in-sample"
c1, c2, c3 = st.columns(3)
c1.metric("Nodes", evaluation["n_nodes"])
c2.metric(f"Faithfulness ({where})", f"{evaluation['faithfulness']:.2f}")
c3.metric(f"Completeness ({where})", f"{evaluation.get('completeness', float('nan')):.2f}")
conventions = graph.get("conventions")
if conventions:
    in_sample = graph.get("evaluation_in_sample", evaluation)
    st.caption(f"Scored on {evaluation.get('n_prompts', '?')} {where} prompts"
               + (f" (in-sample on {in_sample['n_prompts']}: faithfulness {in_sample['faithfulness']:.2f}, "
                  f"completeness {in_sample['completeness']:.2f})" if held_out else "")
               + f". Node effects: {conventions['node_effects']}; error nodes: {conventions['error_nodes']}; "
               f"ablation: {conventions['ablation']}.")
else:
    st.caption("Saved by an older `saewb circuits` (per-position error nodes, in-sample scores): run it again.")
own_hook = run.sae_cfg().get("metadata", {}).get("hook_name")
texts = {n["id"]: node_text(n, store, own_hook) for n in graph["nodes"]}
tokens = graph.get("tokens")
if tokens:
    st.markdown("**Token positions** (first discovery prompt): " + " ".join(
        f"<code>{p}:{common.show_token(t)}</code>" for p, t in enumerate(tokens)), unsafe_allow_html=True)
st.plotly_chart(layered_figure(graph, texts), use_container_width=True)
st.caption(SIGNS.format(method=(conventions or {}).get("node_effects", "the saved method")))
st.plotly_chart(curve_figure(graph["curve"], f"Faithfulness and completeness as the circuit grows ({where})"),
                use_container_width=True)
lines = ["| node | hook | position | effect | logit lens |", "|---|---|---|---|---|"]
for node in sorted((n for n in graph["nodes"] if n["kind"] == "latent"), key=lambda n: -abs(n["effect"])):
    name = common.latent_title(store if node["hook"] == own_hook else None, node["latent"]).replace("|", "∣")
    link = common.feature_link(node["latent"], name) if node["hook"] == own_hook else html.escape(name)
    place = (f"{node['position']} <code>{common.show_token(node.get('token', ''))}</code>"
             if node.get("position") is not None else "")
    lens = html.escape(node.get("label", "")).replace("|", "&#124;")
    lines.append(f"| {link} | `{node['hook']}` | {place} | {node['effect']:.4g} | {lens} |")
st.markdown("\n".join(lines), unsafe_allow_html=True)
with st.expander("Edges"):
    st.dataframe(pd.DataFrame(graph["edges"]), hide_index=True, use_container_width=True)
