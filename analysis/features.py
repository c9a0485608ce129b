"""Feature store: one pass over a run's activation cache collects, for every latent at once,

- the top-N activating token positions (a running top-k merged chunk by chunk) with a context window around
  each (token ids and that latent's activation on every window token),
- a uniform random sample of firing positions (bottom-k of random keys = reservoir sampling, merged the same
  way), sorted by activation so the app can show samples from each activation quantile,
- an activation histogram on fixed log-spaced bins shared by all latents (so it needs no first pass for ranges),
- density (fraction of tokens where the latent is non-zero) and mean activation when firing,
- for signed SAEs (AbsTopK, signed MP) the most negative contexts as well;

then, from the weights alone, the logit lens (top/bottom tokens of the latent's direct path to the logits through
the final norm's weight and the unembedding, `training.model.direct_logits`) and the nearest latents by decoder
cosine; and last every latent's short LLM-free label (`analysis.labels`: its top contexts' centre tokens and its
promoted tokens) and, with an explainer endpoint, an LLM explanation scored by detection.

Layout of `run_dir/features/`: `index.json` (metadata, sizes, bin edges), `features.safetensors` (every tensor
has the latent as its first axis, so `safe_open(...).get_slice(name)[i]` loads one latent cheaply) and
`vocab.json` (every token id's string, so the app needs no tokenizer to show contexts), `labels.json` (one label
per latent) and, when an explainer ran, `explanations.json`.

Special tokens (BOS/EOS) and outlier-norm tokens are left out of every statistic, as in training.
"""
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tyro.conf import Positional

from analysis.labels import EXPLANATIONS, LABELS, build_labels
from training.activation_store import failpoint, require_free, write_error, write_json_atomic

FEATURES_DIR = "features"
INDEX = "index.json"
TENSORS = "features.safetensors"
VOCAB = "vocab.json"
LOGIT_LENS_NOTE = ("Logit lens: (γ ⊙ d_i) @ W_U (+ b_U), the latent's direct effect on the logits per unit of code, "
                   "d_i its decoder row in activation space and γ the final norm's weight (a LayerNorm also centres "
                   "d_i); the norm's per-token 1/rms scale is left out, as it reorders no token.")


@dataclass
class FeaturesConfig:
    """Build the feature store of a trained run (top activating contexts, quantile samples, histograms,
    density, logit lens, decoder neighbours) in RUN_DIR/features/: one pass over the run's activation cache."""

    run_dir: Positional[Path]
    """Run folder holding cfg.json, sae_weights.safetensors and summary.json (its 'cache' names the cache)."""
    top_n: int = 20
    """Top activating contexts kept per latent."""
    samples: int = 40
    """Random firing positions kept per latent (the app shows them by activation quantile)."""
    left: int = 24
    """Context tokens kept to the left of each example (the app shows the nearest few and expands to all)."""
    right: int = 8
    """Context tokens kept to the right of each example."""
    bins: int = 48
    """Histogram bins (log-spaced |activation| from 1e-3 to 1e3, shared by all latents)."""
    batch_size: int = 4096
    """Tokens encoded at once."""
    max_shards: int | None = None
    """Only the first N shards (default all)."""
    progress: bool = True
    """Show a progress bar."""
    explainer_url: str | None = None
    """An OpenAI-compatible chat-completions endpoint (https://api.openai.com/v1, a local server's
    http://127.0.0.1:8000/v1, ...): an LLM explains every latent from its top contexts and each explanation is
    scored by detection (balanced accuracy on held-out firing and silent excerpts). The key comes from
    $SAEWB_EXPLAINER_KEY or $OPENAI_API_KEY (none is sent when neither is set)."""
    explainer_model: str | None = None
    """The model the endpoint should use (e.g. gpt-4o-mini); required with --explainer-url."""
    explain_max: int | None = None
    """Explain only the first N latents that fired (default all)."""
    explainer_workers: int = 4
    """Requests to the endpoint at once."""
    labels_only: bool = False
    """Keep the existing feature store and only rewrite its labels (and, with --explainer-url, its explanations:
    latents already explained by the same model are kept) without rebuilding the store."""


def features_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FEATURES_DIR


def hist_edges(bins: int) -> Tensor:
    """Fixed log-spaced edges of |activation|, 1e-3 .. 1e3; values outside land in the first/last bin."""
    return torch.logspace(-3, 3, bins + 1)


class RunningTopK:
    """Per latent, the N highest scores seen so far with their global token positions and context windows."""

    def __init__(self, d_sae: int, n: int, width: int):
        self.n = n
        self.scores = torch.full((d_sae, n), -math.inf)
        self.values = torch.zeros(d_sae, n)
        self.rows = torch.full((d_sae, n), -1, dtype=torch.long)
        self.win_tokens = torch.full((d_sae, n, width), -1, dtype=torch.int32)
        self.win_acts = torch.zeros(d_sae, n, width)

    def chunk_candidates(self, scores: Tensor, values: Tensor, row0: int):
        """Top-N of a [B, d_sae] chunk per latent: (scores, values, global rows), each [d_sae, n']."""
        n = min(self.n, scores.shape[0])
        s, idx = scores.T.contiguous().topk(n, dim=1)  # topk along a strided dim is 4x slower than the copy
        return s, values.T.gather(1, idx), idx + row0

    def merge(self, scores: Tensor, values: Tensor, rows: Tensor, win_tokens: Tensor, win_acts: Tensor) -> None:
        all_s = torch.cat([self.scores, scores], 1)
        s, idx = all_s.topk(self.n, dim=1)
        self.scores = s
        self.values = torch.cat([self.values, values], 1).gather(1, idx)
        self.rows = torch.cat([self.rows, rows], 1).gather(1, idx)
        w = win_tokens.shape[-1]
        wi = idx[..., None].expand(-1, -1, w)
        self.win_tokens = torch.cat([self.win_tokens, win_tokens], 1).gather(1, wi)
        self.win_acts = torch.cat([self.win_acts, win_acts], 1).gather(1, wi)

    def valid(self) -> Tensor:
        return torch.isfinite(self.scores)


def scores_at(codes: Tensor, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
    """A [B, d_sae] score matrix: `values` at (rows, cols), -inf elsewhere."""
    scores = torch.full_like(codes, -math.inf)
    scores[rows, cols] = values
    return scores


def merge_candidates(parts: list[tuple[Tensor, Tensor, Tensor]], n: int):
    s = torch.cat([p[0] for p in parts], 1)
    v = torch.cat([p[1] for p in parts], 1)
    r = torch.cat([p[2] for p in parts], 1)
    s, idx = s.topk(min(n, s.shape[1]), dim=1)
    return s, v.gather(1, idx), r.gather(1, idx)


def windows(rows: Tensor, tokens: Tensor, coo_keys: Tensor, coo_vals: Tensor, d_sae: int, left: int, right: int,
            row0: int):
    """Context windows for candidates `rows` [d_sae, n] (global rows; -1 = none) of one shard: token ids (-1
    outside the context) and the candidate's latent's activation on each window token ([d_sae, n, W] each)."""
    n_ctx, ctx = tokens.shape
    local = rows - row0
    offsets = torch.arange(-left, right + 1)
    pos = (local % ctx)[..., None] + offsets  # position inside the context
    ctx_id = (local // ctx)[..., None].expand_as(pos)
    inside = (pos >= 0) & (pos < ctx) & (rows[..., None] >= 0)
    flat = (ctx_id * ctx + pos.clamp(0, ctx - 1))
    win_tokens = torch.where(inside, tokens.reshape(-1)[flat.clamp(0, n_ctx * ctx - 1)].int(), -1)
    latent = torch.arange(d_sae)[:, None, None].expand_as(flat)
    keys = flat * d_sae + latent
    at = torch.searchsorted(coo_keys, keys.reshape(-1)).clamp(max=max(len(coo_keys) - 1, 0))
    if len(coo_keys):
        hit = coo_keys[at] == keys.reshape(-1)
        acts = torch.where(hit, coo_vals[at], 0.0).reshape(keys.shape)
    else:
        acts = torch.zeros(keys.shape)
    return win_tokens, torch.where(inside, acts, 0.0)


@torch.no_grad()
def collect(sae, cache, hook: str, cfg: FeaturesConfig) -> dict[str, Tensor]:
    """The one pass over the cache; returns the per-latent tensors (see module docstring)."""
    from tqdm.auto import tqdm

    d_sae = sae.cfg.d_sae
    width = cfg.left + cfg.right + 1
    edges = hist_edges(cfg.bins)
    log_lo, log_hi = math.log10(edges[0].item()), math.log10(edges[-1].item())
    top = RunningTopK(d_sae, cfg.top_n, width)
    bottom = RunningTopK(d_sae, cfg.top_n, width) if sae.signed else None
    sample = RunningTopK(d_sae, cfg.samples, width)
    hist_pos = torch.zeros(d_sae * cfg.bins, dtype=torch.long)
    hist_neg = torch.zeros(d_sae * cfg.bins, dtype=torch.long)
    fired = torch.zeros(d_sae, dtype=torch.long)
    act_sum = torch.zeros(d_sae, dtype=torch.float64)
    n_tokens = 0
    generator = torch.Generator().manual_seed(0)
    shards = list(range(cache.n_shards))[: cfg.max_shards]
    total = sum(cache.manifest["shards"][i]["contexts"] for i in shards) * cache.context_length
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="features", disable=not cfg.progress)
    row0 = 0
    for index in shards:
        tokens = cache.tokens(index)
        acts = cache.read(index, f"acts.{hook}")
        keep = cache.keep_mask(index, hook)
        cand_top, cand_bot, cand_smp, keys, vals = [], [], [], [], []
        for start in range(0, len(acts), cfg.batch_size):
            x = acts[start:start + cfg.batch_size]
            k = keep[start:start + cfg.batch_size]
            codes = sae.encode(x).float() * k[:, None]
            g0 = row0 + start
            nz_r, nz_c = codes.nonzero(as_tuple=True)
            nz_v = codes[nz_r, nz_c]
            keys.append((nz_r + start) * d_sae + nz_c)
            vals.append(nz_v)
            fired += torch.bincount(nz_c, minlength=d_sae)
            act_sum.index_add_(0, nz_c, nz_v.double())
            lg = nz_v.abs().log10().clamp(log_lo, log_hi - 1e-6)
            b = ((lg - log_lo) / (log_hi - log_lo) * cfg.bins).long()
            pos = nz_v > 0
            hist_pos += torch.bincount(nz_c[pos] * cfg.bins + b[pos], minlength=d_sae * cfg.bins)
            hist_neg += torch.bincount(nz_c[~pos] * cfg.bins + b[~pos], minlength=d_sae * cfg.bins)
            n_tokens += int(k.sum())
            # scores for the running top-N: -inf except at the firings (written from the sparse entries, not by
            # masking every one of the B x d_sae codes)
            cand_top.append(top.chunk_candidates(scores_at(codes, nz_r[pos], nz_c[pos], nz_v[pos]), codes, g0))
            if bottom is not None:
                cand_bot.append(bottom.chunk_candidates(scores_at(codes, nz_r[~pos], nz_c[~pos], -nz_v[~pos]), codes,
                                                        g0))
            key = torch.rand(len(nz_v), generator=generator)  # a uniform random key per firing: a uniform sample
            cand_smp.append(sample.chunk_candidates(scores_at(codes, nz_r, nz_c, key), codes, g0))
            bar.update(len(x))
        keys_t, vals_t = torch.cat(keys), torch.cat(vals)
        for keeper, cands in ((top, cand_top), (bottom, cand_bot), (sample, cand_smp)):
            if keeper is None:
                continue
            s, v, r = merge_candidates(cands, keeper.n)
            r = torch.where(torch.isfinite(s), r, -1)
            wt, wa = windows(r, tokens, keys_t, vals_t, d_sae, cfg.left, cfg.right, row0)
            keeper.merge(s, v, r, wt, wa)
        row0 += len(acts)
    bar.close()
    out = {
        "density": fired.double() / max(n_tokens, 1),
        "mean_act": act_sum / fired.clamp(min=1),
        "fired": fired,
        "hist": hist_pos.reshape(d_sae, cfg.bins),
        "top_values": torch.where(top.valid(), top.values, math.nan),
        "top_rows": top.rows,
        "top_tokens": top.win_tokens,
        "top_acts": top.win_acts,
    }
    # the random sample, sorted by activation (ascending), so quantiles are slices
    valid = sample.valid()
    order = torch.where(valid, sample.values, math.inf).argsort(1)
    w = order[..., None].expand(-1, -1, width)
    out |= {"sample_values": torch.where(valid, sample.values, math.nan).gather(1, order),
            "sample_rows": sample.rows.gather(1, order),
            "sample_tokens": sample.win_tokens.gather(1, w),
            "sample_acts": sample.win_acts.gather(1, w)}
    if bottom is not None:
        out |= {"hist_neg": hist_neg.reshape(d_sae, cfg.bins),
                "bottom_values": torch.where(bottom.valid(), bottom.values, math.nan),
                "bottom_rows": bottom.rows, "bottom_tokens": bottom.win_tokens, "bottom_acts": bottom.win_acts}
    out["n_tokens"] = torch.tensor([n_tokens])
    return out


@torch.no_grad()
def logit_lens(model, directions: Tensor, k: int = 10, chunk: int = 512) -> dict[str, Tensor]:
    """Top and bottom k tokens of each latent's direct path to the logits: ids and values, [d_sae, k] each.
    directions: decoder rows in activation space [d_sae, d_model]."""
    from training.model import direct_logits

    tops, topv, bots, botv = [], [], [], []
    for part in directions.split(chunk):
        logits = direct_logits(model, part)  # [chunk, vocab]
        v, i = logits.topk(k, dim=1)
        tops.append(i), topv.append(v)
        v, i = logits.topk(k, dim=1, largest=False)
        bots.append(i), botv.append(v)
    return {"lens_top_ids": torch.cat(tops).int(), "lens_top_values": torch.cat(topv),
            "lens_bottom_ids": torch.cat(bots).int(), "lens_bottom_values": torch.cat(botv)}


@torch.no_grad()
def decoder_neighbours(W_dec: Tensor, k: int = 10, chunk: int = 1024) -> dict[str, Tensor]:
    """The k latents with the most similar decoder direction (cosine), self excluded: ids and cosines."""
    W = torch.nn.functional.normalize(W_dec.float(), dim=1)
    k = min(k, len(W) - 1)
    ids, sims = [], []
    for start in range(0, len(W), chunk):
        cos = W[start:start + chunk] @ W.T
        cos[torch.arange(len(cos)), torch.arange(start, start + len(cos))] = -math.inf
        v, i = cos.topk(k, dim=1)
        ids.append(i.int()), sims.append(v)
    return {"neighbour_ids": torch.cat(ids), "neighbour_cos": torch.cat(sims)}


def token_strings(tokenizer) -> list[str]:
    """Every token id's text (as the tokenizer decodes it alone)."""
    n = len(tokenizer)
    return [tokenizer.decode([i]) for i in range(n)]


def run_facts(run_dir: Path) -> dict:
    """Model, hook and cache of a run folder (from config.json and summary.json, parents searched for config)."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{run_dir} has no summary.json: point at a finished run folder (made by `saewb train`).")
    summary = json.loads(summary_path.read_text())
    if "cache" not in summary:
        raise ValueError(f"{run_dir} was trained without an activation cache (source=model): the feature store "
                         "reads a cache; retrain with --source cache.")
    config = next((json.loads((p / "config.json").read_text()) for p in (run_dir, run_dir.parent)
                   if (p / "config.json").is_file()), None)
    if config is None:
        raise ValueError(f"No config.json in {run_dir} or its parent: cannot tell which model the run used.")
    return {"model": config["cache"]["model"], "hook": summary["hook"], "cache": summary["cache"]}


def load_run_sae(run_dir: Path, device: str = "cpu"):
    """The run's SAE; one sentence naming the file and the fix when its weights cannot be read (truncated)."""
    from safetensors import SafetensorError

    from saes import load_sae

    try:
        return load_sae(run_dir, device=device)
    except SafetensorError as error:
        weights = Path(run_dir) / "sae_weights.safetensors"
        raise ValueError(f"{weights} cannot be read ({str(error).splitlines()[0][:120]}): it is truncated or "
                         f"corrupted; delete it and {Path(run_dir) / 'summary.json'}, then run the same `saewb train` "
                         "command again (it rewrites the weights from the final checkpoint).") from None


def store_bytes(d_sae: int, signed: bool, cfg: FeaturesConfig, vocab: int) -> int:
    """Size of the feature store's files, from the shapes `collect` and the lens produce (+10% and 1 MB)."""
    width = cfg.left + cfg.right + 1
    example = 4 + 8 + 2 * 4 * width  # value, row, window tokens and activations
    per_latent = (cfg.top_n * example + cfg.bins * 8) * (2 if signed else 1) + cfg.samples * example + 40 * 4 + 80 + 32
    per_latent += 64  # its label in labels.json
    return int(1.1 * (d_sae * per_latent + 32 * vocab)) + 2**20


def build_features(cfg: FeaturesConfig, model=None, sae=None) -> Path:
    """Compute and save the feature store; returns its folder. Checks the free space before the pass; a write
    that fails (disk full) leaves no store that reads as valid (index.json, its "finished" mark, is written last)."""
    from training.activation_store import ActivationCache
    from training.model import load_model

    run_dir = Path(cfg.run_dir)
    facts = run_facts(run_dir)
    sae = sae or load_run_sae(run_dir)
    sae.eval()
    cache = ActivationCache(facts["cache"], hook=facts["hook"])
    if cfg.top_n < 1 or cfg.samples < 1 or cfg.left < 0 or cfg.right < 0 or cfg.bins < 2:
        raise ValueError("top_n and samples must be >= 1, left/right >= 0 and bins >= 2.")
    out = features_dir(run_dir)
    require_free(out, store_bytes(sae.cfg.d_sae, bool(sae.signed), cfg, 262_144), "The feature store",
                 f"free space there or move the run folder {run_dir} to a larger disk")
    tensors = collect(sae, cache, facts["hook"], cfg)
    model = model or load_model(facts["model"])
    W_dec = sae.W_dec.detach()
    W_U = model.W_U.detach()
    has_lens = W_dec.shape[1] == W_U.shape[0]
    if has_lens:
        tensors |= logit_lens(model, W_dec / sae.input_scale)
    tensors |= decoder_neighbours(W_dec)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    tensors = {name: (t.float() if t.dtype == torch.float64 else t) for name, t in tensors.items()}
    (out / INDEX).unlink(missing_ok=True)  # the index is the store's "finished" mark: gone until it is rewritten
    (out / EXPLANATIONS).unlink(missing_ok=True)  # explanations of the old top contexts no longer apply
    unfinished = (f"no feature store is left in {out} that reads as valid; free space and run `saewb features "
                  f"{run_dir}` again")
    tmp = out / f".{TENSORS}.tmp"
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, out / TENSORS)
    except Exception as error:  # OSError or safetensors' SafetensorError (a full disk, a size limit)
        tmp.unlink(missing_ok=True)
        raise write_error(error, out / TENSORS, unfinished) from None
    failpoint("features.tensors_written")  # tests: tensors in place, vocab and index not yet
    vocab = token_strings(model.tokenizer)
    write_json_atomic(out / VOCAB, vocab, unfinished)
    labels = build_labels(tensors["top_tokens"][:, :, cfg.left], tensors.get("lens_top_ids"), vocab)
    write_json_atomic(out / LABELS, labels, unfinished)
    index = {
        "version": 1, "model": facts["model"], "hook": facts["hook"], "cache": facts["cache"],
        "architecture": sae.architecture, "signed": bool(sae.signed), "d_sae": sae.cfg.d_sae,
        "d_in": sae.cfg.d_in, "n_tokens": int(tensors["n_tokens"][0]), "context_length": cache.context_length,
        "top_n": cfg.top_n, "samples": cfg.samples, "left": cfg.left, "right": cfg.right,
        "hist_edges": hist_edges(cfg.bins).tolist(), "logit_lens": has_lens,
        "logit_lens_note": LOGIT_LENS_NOTE if has_lens else
        f"No logit lens: the hook's width {W_dec.shape[1]} is not the model's d_model {W_U.shape[0]}.",
        "shards": cfg.max_shards or cache.n_shards,
        "tensors": sorted(tensors), "labels": LABELS,
    }
    write_json_atomic(out / INDEX, index, unfinished)
    if cfg.explainer_url:
        explain(cfg, sae, cache, facts["hook"])
    return out


def explain(cfg: FeaturesConfig, sae=None, cache=None, hook: str | None = None) -> dict:
    """Explain the latents of a run's finished feature store with the configured endpoint and score them by
    detection (`analysis.labels.explain_store`); the store stays valid if this fails part-way."""
    from analysis.labels import ChatClient, explain_store, negative_pool
    from analysis.store import FeatureStore
    from training.activation_store import ActivationCache

    run_dir = Path(cfg.run_dir)
    store = FeatureStore(features_dir(run_dir))
    if not cfg.explainer_model:
        raise ValueError("--explainer-url needs --explainer-model (the model name the endpoint serves).")
    hook = hook or store.index["hook"]
    sae = sae or load_run_sae(run_dir)
    cache = cache or ActivationCache(store.index["cache"], hook=hook)
    client = ChatClient(cfg.explainer_url, cfg.explainer_model)
    pool = negative_pool(sae, cache, hook, store.index["left"], store.index["right"])
    fired = store.column("fired")
    latents = [i for i in range(store.d_sae) if int(fired[i]) > 0][: cfg.explain_max]
    return explain_store(store, client, pool, latents, workers=cfg.explainer_workers, progress=cfg.progress)


def relabel(cfg: FeaturesConfig) -> Path:
    """--labels-only: rewrite the labels of an existing feature store from its stored tensors (and explain it when
    an endpoint is given), leaving everything else as it is."""
    from analysis.store import FeatureStore

    out = features_dir(cfg.run_dir)
    store = FeatureStore(out)
    names = store.index["tensors"]
    centres = store.column("top_tokens")[:, :, store.index["left"]]
    labels = build_labels(centres, store.column("lens_top_ids") if "lens_top_ids" in names else None, store.vocab)
    write_json_atomic(out / LABELS, labels, "the old labels are kept")
    write_json_atomic(out / INDEX, store.index | {"labels": LABELS}, "the store is unchanged")
    if cfg.explainer_url:
        explain(cfg)
    return out


@torch.no_grad()
def text_codes(model, sae, hook: str, text: str) -> tuple[list[int], Tensor]:
    """Run the model and SAE on a text: (token ids with BOS, codes [pos, d_sae]); the BOS row is zeroed, as
    special tokens are left out of the feature store."""
    from analysis.steering import prompt_tokens

    tokens = prompt_tokens(model, text)
    _, act_cache = model.run_with_cache(tokens, names_filter=[hook])
    codes = sae.encode(act_cache[hook][0].float()).float()
    codes[0] = 0
    return tokens[0].tolist(), codes


def run_features(cfg: FeaturesConfig) -> None:
    out = relabel(cfg) if cfg.labels_only else build_features(cfg)
    index = json.loads((out / INDEX).read_text())
    print(f"Feature store for {index['d_sae']} latents over {index['n_tokens']} tokens "
          f"{'relabelled' if cfg.labels_only else 'saved'} in {out}")
    if (out / EXPLANATIONS).is_file():
        data = json.loads((out / EXPLANATIONS).read_text())
        scores = [v["score"] for v in data["latents"].values() if v.get("score") is not None]
        mean = f", mean detection score {sum(scores) / len(scores):.3f}" if scores else ""
        print(f"{len(data['latents'])} latents explained by {data['explainer_model']}{mean}"
              + (f"; {len(data['failed'])} failed (run again with --labels-only to retry them)"
                 if data["failed"] else ""))
