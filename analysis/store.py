"""The app's only read API: runs under a folder, their config / metrics / summary / eval figures, and the
feature store of a run (one latent at a time, memory-mapped; token search).

    runs = list_runs("runs")
    run = Run(runs[0]); run.summary(); run.metrics()
    feats = run.features(); feats.latent(3)["top"][0]; feats.search_token("the")
    feats.label(3); feats.explanation(3); feats.explanation_score(3); feats.search_text("plural nouns")
"""
import json
import math
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from analysis.features import INDEX, LOGIT_LENS_NOTE, TENSORS, VOCAB, features_dir
from analysis.labels import EXPLANATIONS, LABELS, build_labels

SKIP_DIRS = {"checkpoints", "wandb", "features", "eval", "comparison", ".git", "__pycache__"}


def is_run(folder: Path) -> bool:
    return (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()


def list_runs(root: str | Path, max_depth: int = 4) -> list[Path]:
    """Every SAE run folder (cfg.json + sae_weights.safetensors) under `root` (itself included), sorted;
    checkpoint, W&B and feature folders are not searched."""
    root = Path(root)
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if is_run(folder):
            found.append(folder)
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in SKIP_DIRS)
        except OSError:
            return
        for child in children:
            walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


class Run:
    """One run folder (a single SAE). Multi-SAE jobs keep config.json, metrics and W&B in the parent folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _up(self, name: str) -> Path | None:
        """`name` in the run folder or, for one SAE of a multi-SAE job, its parent."""
        for folder in (self.path, self.path.parent):
            if (folder / name).exists():
                return folder / name
        return None

    @property
    def name(self) -> str:
        return self.path.name

    def sae_cfg(self) -> dict:
        return read_json(self.path / "cfg.json", {})

    def config(self) -> dict:
        found = self._up("config.json")
        return read_json(found, {}) if found else {}

    def summary(self) -> dict:
        return read_json(self.path / "summary.json", {})

    def metrics(self) -> list[dict]:
        """Rows of metrics.jsonl (a multi-SAE job writes one file for all SAEs in the parent folder)."""
        found = self._up("metrics.jsonl")
        rows = []
        if found:
            for line in found.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
        return rows

    def wandb_dir(self) -> Path | None:
        found = self._up("wandb")
        return found if found and found.is_dir() else None

    def _figures(self, pattern: str) -> dict[str, dict]:
        figures = {}
        for folder in (self.path, self.path.parent):
            for path in sorted(folder.glob(pattern)):
                data = read_json(path)
                if isinstance(data, dict):
                    figures.setdefault(path.stem, data)
        return figures

    def eval_figures(self) -> dict[str, dict]:
        """Plotly figure JSON files under eval/figures/, by name."""
        return self._figures("eval/figures/*.json")

    def comparisons(self) -> dict[str, dict]:
        """JSON files under comparison/, by name (plotly figures or tables)."""
        return self._figures("comparison/*.json")

    def circuit(self) -> dict | None:
        """circuits/graph.json written by `saewb circuits`, if any."""
        return read_json(self.path / "circuits" / "graph.json")

    def imported(self) -> dict | None:
        """import.json of a run written by `saewb import` (source facts and fingerprint), if any."""
        return read_json(self.path / "import.json")

    def source_log10_density(self) -> torch.Tensor | None:
        """The log10 feature densities the imported SAE's source ships (SAELens sparsity.safetensors), [d_sae]."""
        path = self.path / "source_sparsity.safetensors"
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(path)).get("sparsity")

    def has_features(self) -> bool:
        return (features_dir(self.path) / INDEX).is_file()

    def features(self) -> "FeatureStore":
        return FeatureStore(features_dir(self.path))


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if (isinstance(v, float) and math.isnan(v)) else v for v in values]


class FeatureStore:
    """Read side of `analysis.features`: one latent is a handful of memory-mapped row slices."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / INDEX).is_file():
            raise ValueError(f"No feature store in {self.folder}: run `saewb features {self.folder.parent}` first.")
        self.index = json.loads((self.folder / INDEX).read_text())

    @property
    def d_sae(self) -> int:
        return self.index["d_sae"]

    @cached_property
    def vocab(self) -> list[str]:
        return json.loads((self.folder / VOCAB).read_text())

    def token_str(self, token_id: int) -> str:
        return self.vocab[token_id] if 0 <= token_id < len(self.vocab) else f"<{token_id}>"

    def _row(self, names: list[str], latent: int) -> dict[str, torch.Tensor]:
        out = {}
        with safe_open(str(self.folder / TENSORS), framework="pt") as handle:
            keys = set(handle.keys())
            for name in names:
                if name in keys:
                    out[name] = handle.get_slice(name)[latent]
        return out

    def column(self, name: str) -> torch.Tensor:
        """A whole tensor (e.g. 'density' for all latents)."""
        with safe_open(str(self.folder / TENSORS), framework="pt") as handle:
            return handle.get_tensor(name)

    def check_latent(self, latent: int) -> None:
        if not 0 <= latent < self.d_sae:
            raise ValueError(f"Latent {latent} is out of range: this SAE has latents 0..{self.d_sae - 1}.")

    def _examples(self, row: dict, prefix: str) -> list[dict]:
        if f"{prefix}_values" not in row:
            return []
        examples = []
        centre = self.index["left"]
        for value, pos, toks, acts in zip(row[f"{prefix}_values"].tolist(), row[f"{prefix}_rows"].tolist(),
                                          row[f"{prefix}_tokens"].tolist(), row[f"{prefix}_acts"].tolist()):
            if pos < 0 or math.isnan(value):
                continue
            kept = [(t, a, i == centre) for i, (t, a) in enumerate(zip(toks, acts)) if t >= 0]
            examples.append({"value": value, "row": pos,
                             "tokens": [self.token_str(t) for t, _, _ in kept],
                             "token_ids": [t for t, _, _ in kept],
                             "acts": [a for _, a, _ in kept],
                             "centre": next(i for i, (_, _, c) in enumerate(kept) if c)})
        return examples

    def latent(self, latent: int) -> dict:
        """Everything about one latent, as plain Python values."""
        latent = int(latent)
        self.check_latent(latent)
        names = ["density", "mean_act", "fired", "hist", "hist_neg"]
        for prefix in ("top", "bottom", "sample"):
            names += [f"{prefix}_{x}" for x in ("values", "rows", "tokens", "acts")]
        names += ["lens_top_ids", "lens_top_values", "lens_bottom_ids", "lens_bottom_values",
                  "neighbour_ids", "neighbour_cos"]
        row = self._row(names, latent)
        record = {
            "latent": latent, "density": float(row["density"]), "mean_act": float(row["mean_act"]),
            "fired": int(row["fired"]), "n_tokens": self.index["n_tokens"],
            "hist": {"edges": self.index["hist_edges"], "counts": row["hist"].tolist(),
                     "neg_counts": row["hist_neg"].tolist() if "hist_neg" in row else None},
            "top": self._examples(row, "top"), "bottom": self._examples(row, "bottom"),
            "samples": self._examples(row, "sample"),
            "neighbours": [{"latent": int(i), "cos": float(c)}
                           for i, c in zip(row["neighbour_ids"].tolist(), row["neighbour_cos"].tolist())],
            "signed": self.index["signed"],
            "logit_lens_note": self.index.get("logit_lens_note", LOGIT_LENS_NOTE),
        }
        if "lens_top_ids" in row:
            record["logit_lens"] = {
                "top": [(self.token_str(i), v) for i, v in zip(row["lens_top_ids"].tolist(),
                                                              row["lens_top_values"].tolist())],
                "bottom": [(self.token_str(i), v) for i, v in zip(row["lens_bottom_ids"].tolist(),
                                                                 row["lens_bottom_values"].tolist())]}
        return record

    def quantile_samples(self, record: dict, groups: int = 5, per_group: int = 8) -> list[tuple[str, list[dict]]]:
        """The random firing samples of a latent split into activation quantile groups (lowest first), at most
        `per_group` of each group (spread over it)."""
        samples = record["samples"]
        if not samples:
            return []
        out = []
        size = len(samples) / groups
        for g in range(groups):
            part = samples[int(g * size):int((g + 1) * size)]
            if part:
                step = max(1, len(part) // per_group)
                out.append((f"{100 * g // groups}-{100 * (g + 1) // groups}%", part[::step][:per_group]))
        return out

    @cached_property
    def _top_centre_tokens(self) -> torch.Tensor:
        """[d_sae, top_n] id of the token each top example is centred on (-1 where none)."""
        centre = self.index["left"]
        with safe_open(str(self.folder / TENSORS), framework="pt") as handle:
            return handle.get_slice("top_tokens")[:, :, centre:centre + 1][..., 0]

    def token_ids(self, text: str) -> list[int]:
        """Vocabulary ids whose string equals `text` after stripping spaces, case-insensitively."""
        want = text.strip().lower()
        return [i for i, s in enumerate(self.vocab) if s.strip().lower() == want] if want else []

    def search_token(self, text: str, limit: int = 20) -> list[dict]:
        """Latents whose top examples are centred on the token `text` (spaces and case ignored), most such
        examples first, then by top activation."""
        ids = self.token_ids(text)
        if not ids:
            return []
        hits = torch.isin(self._top_centre_tokens, torch.tensor(ids, dtype=self._top_centre_tokens.dtype))
        counts = hits.sum(1)
        top1 = self.column("top_values")[:, 0].nan_to_num(0.0)
        order = sorted((i for i in counts.nonzero()[:, 0].tolist()), key=lambda i: (-int(counts[i]), -float(top1[i])))
        n = self._top_centre_tokens.shape[1]
        return [{"latent": i, "matches": int(counts[i]), "of": n, "top_value": float(top1[i])} for i in order[:limit]]

    def search_lens(self, text: str, limit: int = 20) -> list[dict]:
        """Latents whose logit lens (top promoted tokens) contains the token `text`, best rank first."""
        ids = self.token_ids(text)
        if not ids or not self.index.get("logit_lens"):
            return []
        top_ids = self.column("lens_top_ids")  # [d_sae, 10]
        hits = torch.isin(top_ids, torch.tensor(ids, dtype=top_ids.dtype))
        found = hits.any(1).nonzero()[:, 0].tolist()
        rank = {i: int(hits[i].nonzero()[0, 0]) for i in found}
        values = self.column("lens_top_values")
        order = sorted(found, key=lambda i: (rank[i], -float(values[i, rank[i]])))
        return [{"latent": i, "rank": rank[i] + 1, "logit": float(values[i, rank[i]])} for i in order[:limit]]

    # ------------------------------------------------------------------------------ labels and explanations

    @cached_property
    def labels(self) -> list[str]:
        """Every latent's short label (labels.json; a store written before labels existed gets them computed from
        its stored top contexts and logit lens, the same way)."""
        found = read_json(self.folder / self.index.get("labels", LABELS))
        if isinstance(found, list) and len(found) == self.d_sae:
            return [str(x) for x in found]
        lens = self.column("lens_top_ids") if "lens_top_ids" in self.index.get("tensors", []) else None
        return build_labels(self._top_centre_tokens, lens, self.vocab)

    def label(self, latent: int) -> str:
        latent = int(latent)
        return self.labels[latent] if 0 <= latent < self.d_sae else ""

    def explanations_file(self) -> dict | None:
        """explanations.json as written by an explainer run (`saewb features --explainer-url ...`), or None."""
        data = read_json(self.folder / EXPLANATIONS)
        return data if isinstance(data, dict) and isinstance(data.get("latents"), dict) else None

    @cached_property
    def _explanations(self) -> dict[int, dict]:
        data = self.explanations_file()
        return {int(k): v for k, v in data["latents"].items()} if data else {}

    @property
    def explainer_model(self) -> str | None:
        data = self.explanations_file()
        return data.get("explainer_model") if data else None

    def explanation(self, latent: int) -> str | None:
        found = self._explanations.get(int(latent))
        return found.get("explanation") if found else None

    def explanation_score(self, latent: int) -> float | None:
        """The explanation's detection score (balanced accuracy, 0.5 = chance), None when not explained/scored."""
        found = self._explanations.get(int(latent))
        return found.get("score") if found else None

    def explained(self) -> list[dict]:
        """Every explained latent: latent, label, explanation, score (best score first, unscored last)."""
        rows = [{"latent": i, "label": self.label(i), "explanation": v.get("explanation"), "score": v.get("score")}
                for i, v in self._explanations.items()]
        return sorted(rows, key=lambda r: (r["score"] is None, -(r["score"] or 0.0), r["latent"]))

    def search_text(self, text: str, limit: int = 20) -> list[dict]:
        """Latents whose label or explanation contains every word of `text` (case-insensitive): explained ones by
        detection score first, then by id. Each hit says where it matched."""
        words = [w for w in text.lower().split() if w]
        if not words:
            return []
        hits = []
        for latent, label in enumerate(self.labels):
            explanation = self.explanation(latent) or ""
            where = [name for name, value in (("label", label), ("explanation", explanation))
                     if all(w in value.lower() for w in words)]
            if where:
                hits.append({"latent": latent, "label": label, "explanation": explanation or None,
                             "score": self.explanation_score(latent), "where": where})
        hits.sort(key=lambda h: (h["score"] is None, -(h["score"] or 0.0), h["latent"]))
        return hits[:limit]
