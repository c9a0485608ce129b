"""Latent labels and LLM explanations for the feature store.

Every latent gets a short **label** built without any LLM from what `analysis.features` already computed: the
tokens its top contexts are centred on and the tokens its logit lens promotes, e.g. ``‹of› ‹to› → the, a``
(centre tokens in ‹›, the most frequent first; after the arrow the promoted next tokens).

Optionally an LLM behind any OpenAI-compatible chat-completions endpoint (a hosted API or a local server) writes an
**explanation** from the top contexts, and the explanation is scored by **detection** (the "detection" scorer of
Eleuther's delphi / SAEBench autointerp): the same endpoint sees held-out excerpts, half where the latent fires and
half where it is silent on every token, and says for each whether the explained feature fires; the score is the
balanced accuracy, (hits / positives + correct rejections / negatives) / 2, so 0.5 is chance whatever the mix.

The explainer sees the even-ranked top contexts (ranks 1, 3, 5, ... counted from 1); detection's positives are the
other top contexts and the random firing samples spread over the activation quantiles, never a context the explainer
saw; its negatives are random windows of the cache on which the latent is zero everywhere (`negative_pool`).

Files in the feature store folder: ``labels.json`` (a list of d_sae strings, written with the store) and
``explanations.json`` (written by an explainer run: model, scorer settings and, per explained latent, the explanation,
its score and the detection counts). No key is ever written.
"""
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

LABELS = "labels.json"
EXPLANATIONS = "explanations.json"
KEY_ENV = ("SAEWB_EXPLAINER_KEY", "OPENAI_API_KEY")  # the first one set wins
MAX_LABEL = 48

# ---------------------------------------------------------------------------------------------------------- labels


def show(token: str, limit: int = 12) -> str:
    """A token as a label shows it: spaces stripped, a blank token named (⏎ newline, ␣ space, ⇥ tab)."""
    text = token.strip()
    if not text:
        text = "⏎" if "\n" in token else "⇥" if "\t" in token else "␣" if token else "∅"
    text = text.replace("\n", "⏎")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def readable(token: str) -> bool:
    """Whether a promoted token is worth naming in a label: printable, not blank, not a byte-fallback piece, with a
    letter, digit or punctuation mark in it (not a lone combining or variation character)."""
    text = token.strip()
    return (bool(text) and "\ufffd" not in text and text.isprintable()
            and any(c.isalnum() or c in "!\"#$%&'()*+,-./:;<=>?@[]^_`{|}~" for c in text))


def word_start(token: str) -> bool:
    """A token that starts a word (a leading space, then a letter or digit), as opposed to a word piece."""
    return token[:1] == " " and token[1:2].isalnum()


def token_label(centres: list[str], promoted: list[str] | None = None, max_centres: int = 3,
                max_promoted: int = 2) -> str:
    """The LLM-free label of one latent from its top contexts' centre tokens (in rank order) and its logit-lens
    promoted tokens (best first): ``‹of› ‹to› → the, a``. Centre tokens are counted spaces and case ignored; those
    seen at least twice (and at least 15 % of the contexts) are named, most frequent first, or, when every context
    centres on a different token, the first two followed by ``…``. An empty `centres` (the latent never fired) gives
    ``dead``. Promoted tokens that start a word come before word pieces (a mid-layer lens is full of pieces)."""
    if not centres:
        left = "dead"
    else:
        counts = Counter(show(t).lower() for t in centres)
        first = {}
        for t in centres:
            first.setdefault(show(t).lower(), show(t))
        ranked = sorted(counts, key=lambda k: (-counts[k], list(first).index(k)))
        named = [k for k in ranked if counts[k] >= max(2, 0.15 * len(centres))][:max_centres]
        covered = sum(counts[k] for k in named)
        varied = not named  # no token repeats: name the first two, and "…" when there are more
        named = named or ranked[:2]
        left = " ".join(f"‹{first[k]}›" for k in named)
        if (len(ranked) > len(named)) if varied else covered < len(centres) / 2:
            left += "…"
    right = []
    promoted = [t for t in promoted or [] if readable(t)]
    promoted = [t for t in promoted if word_start(t)] + [t for t in promoted if not word_start(t)]
    for t in promoted:
        if show(t, 10).lower() not in [r.lower() for r in right]:
            right.append(show(t, 10))
        if len(right) == max_promoted:
            break
    label = f"{left} → {', '.join(right)}" if right else left
    while len(label) > MAX_LABEL and len(right) > 1:
        right.pop()
        label = f"{left} → {', '.join(right)}"
    return label if len(label) <= MAX_LABEL else label[:MAX_LABEL - 1] + "…"


def build_labels(centre_ids: torch.Tensor, lens_ids: torch.Tensor | None, vocab: list[str]) -> list[str]:
    """Labels of every latent: `centre_ids` [d_sae, top_n] the id of each top context's centre token (-1 where the
    latent has fewer contexts), `lens_ids` [d_sae, k] its logit lens's promoted ids (None: no lens)."""
    def name(i: int) -> str:
        return vocab[i] if 0 <= i < len(vocab) else f"<{i}>"

    centres = centre_ids.tolist()
    promoted = lens_ids.tolist() if lens_ids is not None else [[] for _ in centres]
    return [token_label([name(i) for i in row if i >= 0], [name(i) for i in lens])
            for row, lens in zip(centres, promoted)]


# ----------------------------------------------------------------------------------------------- explainer client


def explainer_key() -> str | None:
    for name in KEY_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def completions_url(url: str) -> str:
    """The chat-completions address of an endpoint given as its base (``…/v1``), its root (``http://host:port``, then
    ``/v1`` is added) or in full (``…/chat/completions``)."""
    url = url.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if re.fullmatch(r"https?://[^/]+", url):
        url += "/v1"
    return url + "/chat/completions"


class ExplainerError(RuntimeError):
    """The endpoint refused or answered something that is not a chat completion."""


class ChatClient:
    """A minimal OpenAI-compatible chat-completions client (standard library only): one POST per question, JSON in
    and out, the key (if any) as a Bearer token, retries with backoff on 429 / 5xx / connection errors."""

    def __init__(self, url: str, model: str, key: str | None = None, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 2.0, max_tokens: int = 200):
        if not model:
            raise ValueError("The explainer needs a model name (--explainer-model).")
        self.url = completions_url(url)
        self.model = model
        self.key = key if key is not None else explainer_key()
        self.timeout, self.retries, self.backoff, self.max_tokens = timeout, retries, backoff, max_tokens

    def chat(self, system: str, user: str, max_tokens: int | None = None) -> str:
        body = {"model": self.model, "temperature": 0, "max_tokens": max_tokens or self.max_tokens,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read().decode("utf-8", "replace"))
                break
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:300]
                if error.code in (401, 403):
                    raise ExplainerError(f"The explainer endpoint {self.url} refused the request ({error.code}): "
                                         f"set the key in ${KEY_ENV[0]} or ${KEY_ENV[1]}. {detail}") from None
                if error.code not in (408, 409, 429, 500, 502, 503, 504) or attempt == self.retries:
                    raise ExplainerError(f"The explainer endpoint {self.url} answered {error.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt == self.retries:
                    raise ExplainerError(f"The explainer endpoint {self.url} cannot be reached: "
                                         f"{getattr(error, 'reason', error)}") from None
            except ValueError as error:
                raise ExplainerError(f"The explainer endpoint {self.url} did not answer JSON: {error}") from None
            time.sleep(self.backoff * 2 ** attempt)
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ExplainerError(f"The explainer endpoint {self.url} answered no chat completion: "
                                 f"{json.dumps(reply)[:300]}") from None


# ---------------------------------------------------------------------------------------- explanation and scoring

EXPLAIN_SYSTEM = (
    "You explain one latent feature of a sparse autoencoder trained on a language model's internal activations. "
    "You are shown text excerpts on which the feature fires strongly. In each excerpt the tokens where it fires are "
    "marked <<like this>>, and the strongest activation is given after it. Find what the marked tokens and their "
    "contexts have in common. Answer with one line: 'Explanation: ' followed by a short description (at most 15 "
    "words) of what the feature detects. Do not list the excerpts.")
DETECT_SYSTEM = (
    "You test an explanation of a latent feature of a language model. You get the explanation and numbered text "
    "excerpts. For each excerpt decide whether the feature, as explained, fires on at least one of its tokens. "
    "Some excerpts fire and some do not. Answer with only a JSON list of 0s and 1s, one per excerpt in order "
    "(1 = fires), for example [1, 0, 0, 1].")


def excerpt(tokens: list[str], acts: list[float] | None = None, threshold: float = 0.0) -> str:
    """An excerpt as the LLM reads it: tokens joined, newlines kept visible; with `acts`, runs of tokens whose
    activation exceeds `threshold` wrapped in << >>."""
    out, inside = [], False
    for i, token in enumerate(tokens):
        on = acts is not None and acts[i] > threshold
        if on and not inside:
            out.append("<<")
        if not on and inside:
            out.append(">>")
        inside = on
        out.append(token.replace("\n", "⏎"))
    if inside:
        out.append(">>")
    return "".join(out).strip()


def explain_prompt(examples: list[dict], promoted: list[str] | None = None) -> str:
    """The explainer's question: numbered excerpts (firing tokens marked, those above a fifth of the excerpt's
    strongest activation) and, when the logit lens is known, the tokens the latent promotes."""
    lines = ["Excerpts where the feature fires:"]
    for n, e in enumerate(examples, 1):
        peak = max(e["acts"]) if e["acts"] else e["value"]
        text = excerpt(e["tokens"], e["acts"], threshold=0.2 * peak)
        lines.append(f"{n}. {text}   (strongest activation {e['value']:.3g} on {show(e['tokens'][e['centre']], 24)!r})")
    promoted = [show(t, 16) for t in promoted or [] if readable(t)]
    if promoted:
        lines.append("")
        lines.append("Next tokens the feature promotes (logit lens): " + ", ".join(promoted))
    return "\n".join(lines)


def parse_explanation(reply: str) -> str:
    """The explanation in an explainer's reply: the text after the last 'Explanation:', else its first line."""
    found = re.findall(r"explanation\s*:\s*(.+)", reply, flags=re.IGNORECASE)
    text = found[-1] if found else next((line for line in reply.splitlines() if line.strip()), "")
    text = text.strip().strip('"').strip("'").strip()
    return text[:300]


def detection_prompt(explanation: str, excerpts: list[str]) -> str:
    lines = [f"Explanation: {explanation}", "", "Excerpts:"]
    lines += [f"{n}. {text}" for n, text in enumerate(excerpts, 1)]
    lines += ["", f"Answer with a JSON list of {len(excerpts)} numbers (1 = fires, 0 = does not)."]
    return "\n".join(lines)


def parse_detection(reply: str, n: int) -> list[int]:
    """The 0/1 answers in a scorer's reply: the first JSON list of n booleans / 0s and 1s in it."""
    for match in re.finditer(r"\[[^\[\]]*\]", reply):
        try:
            values = json.loads(match.group(0).lower())
        except ValueError:
            continue
        if isinstance(values, list) and len(values) == n and all(v in (0, 1, True, False) for v in values):
            return [int(v) for v in values]
    raise ExplainerError(f"The scorer's reply has no JSON list of {n} 0s and 1s: {reply[:200]!r}")


def balanced_accuracy(predicted: list[int], truth: list[int]) -> dict:
    """Detection's score: the mean of the hit rate on firing excerpts and the correct-rejection rate on silent
    ones (0.5 = chance, whatever the ratio of positives to negatives)."""
    pos = [p for p, t in zip(predicted, truth) if t]
    neg = [p for p, t in zip(predicted, truth) if not t]
    if not pos or not neg:
        raise ValueError("Detection needs firing and silent excerpts both.")
    tp, tn = sum(pos), sum(1 - p for p in neg)
    return {"score": 0.5 * (tp / len(pos) + tn / len(neg)), "tp": tp, "tn": tn, "n_pos": len(pos),
            "n_neg": len(neg)}


def detection_score(client: ChatClient, explanation: str, positives: list[list[str]], negatives: list[list[str]],
                    seed: int = 0) -> dict:
    """Score an explanation by detection: the excerpts (token lists, unmarked) shuffled with `seed`, one question,
    balanced accuracy of the answers."""
    items = [(excerpt(t), 1) for t in positives] + [(excerpt(t), 0) for t in negatives]
    random.Random(seed).shuffle(items)
    reply = client.chat(DETECT_SYSTEM, detection_prompt(explanation, [text for text, _ in items]),
                        max_tokens=8 + 4 * len(items))
    predicted = parse_detection(reply, len(items))
    return balanced_accuracy(predicted, [truth for _, truth in items])


def split_examples(record: dict, n_shown: int = 10, n_pos: int = 5) -> tuple[list[dict], list[dict]]:
    """(shown to the explainer, held-out positives for detection) of a store record: the even-ranked top contexts
    are shown; positives are random firing samples spread over the activation quantiles, topped up with the
    odd-ranked top contexts, never a row the explainer saw."""
    top = record["top"]
    shown = top[0::2][:n_shown]
    seen = {e["row"] for e in shown}
    samples = [e for e in record["samples"] if e["row"] not in seen]
    held = []
    if samples:
        step = len(samples) / min(n_pos, len(samples))
        held = [samples[int(i * step)] for i in range(min(n_pos, len(samples)))]
    rest = [e for e in top[1::2] if e["row"] not in seen and e["row"] not in {h["row"] for h in held}]
    held += rest[:n_pos - len(held)]
    return shown, held


def negative_pool(sae, cache, hook: str, left: int, right: int, size: int = 256, seed: int = 0,
                  chunk: int = 16) -> tuple[list[list[int]], torch.Tensor]:
    """Random windows of the cache for detection's negatives: (token ids of each window, [size, d_sae] whether each
    latent fires anywhere in it). Windows stay inside their context; left-out tokens (special, outlier norm) count
    as silent, as in the feature store."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [cache.manifest["shards"][i]["contexts"] * cache.context_length for i in range(cache.n_shards)]
    total = sum(sizes)
    rows = torch.randperm(total, generator=generator)[:size].sort().values.tolist()
    ctx = cache.context_length
    windows, fired = [], []
    start = 0
    for shard, n in enumerate(sizes):
        mine = [r - start for r in rows if start <= r < start + n]
        start += n
        if not mine:
            continue
        tokens = cache.tokens(shard).reshape(-1)
        acts = cache.read(shard, f"acts.{hook}")
        keep = cache.keep_mask(shard, hook)
        spans = []
        for r in mine:
            lo = max(r - left, r - r % ctx)
            hi = min(r + right + 1, r - r % ctx + ctx)
            spans.append((lo, hi))
            windows.append(tokens[lo:hi].tolist())
        with torch.no_grad():
            for part in range(0, len(spans), chunk):
                group = spans[part:part + chunk]
                idx = torch.cat([torch.arange(lo, hi) for lo, hi in group])
                codes = sae.encode(acts[idx].float()).float() * keep[idx][:, None]
                bounds = torch.tensor([0] + [hi - lo for lo, hi in group]).cumsum(0).tolist()
                fired += [(codes[a:b] != 0).any(0) for a, b in zip(bounds[:-1], bounds[1:])]
    return windows, torch.stack(fired) if fired else torch.zeros(0, sae.cfg.d_sae, dtype=torch.bool)


def explain_latent(client: ChatClient, record: dict, negatives: list[list[str]], promoted: list[str] | None = None,
                   n_shown: int = 10, n_pos: int = 5, seed: int = 0) -> dict:
    """Explain one latent (record from `FeatureStore.latent`) and score the explanation by detection against
    held-out positives and the given silent windows (token strings)."""
    shown, held = split_examples(record, n_shown, n_pos)
    if not shown:
        raise ValueError(f"Latent {record['latent']} never fired: nothing to explain.")
    explanation = parse_explanation(client.chat(EXPLAIN_SYSTEM, explain_prompt(shown, promoted)))
    if not explanation:
        raise ExplainerError(f"The explainer wrote no explanation for latent {record['latent']}.")
    out = {"explanation": explanation}
    if held and negatives:
        out |= detection_score(client, explanation, [e["tokens"] for e in held], negatives, seed=seed)
    else:
        out["score"] = None
    return out


def explain_store(store, client: ChatClient, pool: tuple[list[list[int]], torch.Tensor], latents: list[int] | None = None,
                  n_shown: int = 10, n_pos: int = 5, n_neg: int = 5, workers: int = 4, seed: int = 0,
                  progress: bool = True) -> dict:
    """Explain and score `latents` of a `FeatureStore` (default every latent that fired) with `pool` from
    `negative_pool`, and write ``explanations.json`` into the store (atomically; latents explained before by the
    same model are kept and skipped). A latent whose call fails is listed under "failed" and the rest go on; when
    the first few calls all fail the run stops with the endpoint's message."""
    from tqdm.auto import tqdm

    from training.activation_store import write_json_atomic

    path = Path(store.folder) / EXPLANATIONS
    old = store.explanations_file() if hasattr(store, "explanations_file") else None
    done = dict(old["latents"]) if old and old.get("explainer_model") == client.model else {}
    fired = store.column("fired")
    wanted = [i for i in (latents if latents is not None else range(store.d_sae)) if int(fired[i]) > 0]
    todo = [i for i in wanted if str(i) not in done]
    windows, pool_fired = pool
    failed: dict[str, str] = {}

    def one(latent: int) -> tuple[int, dict | str]:
        rng = random.Random(seed * 1_000_003 + latent)
        silent = [w for w, f in zip(windows, pool_fired[:, latent].tolist()) if not f]
        negatives = [[store.token_str(t) for t in w] for w in rng.sample(silent, min(n_neg, len(silent)))]
        record = store.latent(latent)
        promoted = [t for t, _ in record.get("logit_lens", {}).get("top", [])][:5]
        try:
            return latent, explain_latent(client, record, negatives, promoted, n_shown, n_pos, seed=latent)
        except (ExplainerError, ValueError) as error:
            return latent, str(error)

    bar = tqdm(total=len(todo), desc="explain", unit="latent", disable=not progress)
    with ThreadPoolExecutor(max(1, workers)) as pool_ex:
        for n, (latent, result) in enumerate(pool_ex.map(one, todo)):
            bar.update(1)
            if isinstance(result, str):
                failed[str(latent)] = result
                if n + 1 == len(failed) and len(failed) >= min(3, len(todo)):
                    bar.close()
                    pool_ex.shutdown(wait=False, cancel_futures=True)
                    raise ExplainerError(f"The first {len(failed)} explanations all failed: {result}")
            else:
                done[str(latent)] = result
    bar.close()
    data = {"version": 1, "explainer_model": client.model, "scorer": "detection (balanced accuracy)",
            "n_shown": n_shown, "n_pos": n_pos, "n_neg": n_neg,
            "latents": dict(sorted(done.items(), key=lambda kv: int(kv[0]))), "failed": failed}
    write_json_atomic(path, data, "the explanations were not saved")
    return data
