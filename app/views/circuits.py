"""Circuits page: the circuit graph `saewb circuits` saved for this run, its faithfulness curve, and links from each
latent node to its feature page."""
import pandas as pd
import streamlit as st

from analysis.circuit_graph import curve_figure, graph_figure
from app import common

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
graph = run.circuit()
if graph is None:
    st.info(f"No circuit for this run yet: run `saewb circuits --run-dir {run.path} --task sva` (tasks: ioi, "
            "greater_than, sva), then reload.")
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
st.plotly_chart(graph_figure(graph), use_container_width=True)
st.plotly_chart(curve_figure(graph["curve"], f"Faithfulness and completeness as the circuit grows ({where})"),
                use_container_width=True)
own_hook = run.sae_cfg().get("metadata", {}).get("hook_name")
lines = ["| node | hook | effect | label |", "|---|---|---|---|"]
for node in sorted((n for n in graph["nodes"] if n["kind"] == "latent"), key=lambda n: -abs(n["effect"])):
    name = common.feature_link(node["latent"]) if node["hook"] == own_hook else f"#{node['latent']}"
    lines.append(f"| {name} | `{node['hook']}` | {node['effect']:.4g} | {node.get('label', '')} |")
st.markdown("\n".join(lines))
with st.expander("Edges"):
    st.dataframe(pd.DataFrame(graph["edges"]), hide_index=True, use_container_width=True)
