"""Latent labels and explanations (analysis/labels.py): the LLM-free label on a hand-built feature store, the
OpenAI-compatible client and the detection scorer against a fake endpoint served in the test (http.server in a
thread, deterministic answers), the request shapes, the balanced accuracy, explanations written into and read back
from the store, and the negative pool against brute force on the tiny cache."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import save_file

from analysis import labels as L
from analysis.features import INDEX, TENSORS, VOCAB, FeaturesConfig, relabel
from analysis.store import FeatureStore

VOCAB_WORDS = ["<bos>", " the", " cat", " sat", " on", " mat", " dog", " ran", ".", " a", " of", "\n", "\ufffd"]
ID = {w: i for i, w in enumerate(VOCAB_WORDS)}
LEFT, RIGHT, TOP, SAMPLES = 2, 1, 6, 6


def window(words: list[str], acts: list[float]):
    """Token ids and activations of one stored window (LEFT + 1 + RIGHT tokens; None = outside the context)."""
    return [ID[w] if w is not None else -1 for w in words], [a if w is not None else 0.0 for w, a in zip(words, acts)]


def hand_store(folder, with_labels_file: bool = False):
    """A feature store written by hand with 3 latents: 0 fires on ' cat' (4 of 6 top contexts) and ' dog', promotes
    ' sat' then ' ran' (a byte-fallback token first, which a label skips); 1 never fired; 2 fires on six different
    tokens and promotes '.'. Every latent also has random firing samples."""
    d, w = 3, LEFT + 1 + RIGHT
    top_tokens = torch.full((d, TOP, w), -1, dtype=torch.int32)
    top_acts = torch.zeros(d, TOP, w)
    top_values = torch.full((d, TOP), float("nan"))
    top_rows = torch.full((d, TOP), -1)
    contexts0 = [([" the", " a", " cat", " sat"], 5.0), ([None, " a", " cat", " ran"], 4.0),
                 ([" of", " the", " cat", "."], 3.5), ([" on", " a", " dog", " sat"], 3.0),
                 ([" the", " the", " cat", " on"], 2.5), ([" a", " the", " dog", "."], 2.0)]
    for j, (words, value) in enumerate(contexts0):
        ids, acts = window(words, [0.0, 0.1, value, 0.0])
        top_tokens[0, j], top_acts[0, j] = torch.tensor(ids), torch.tensor(acts)
        top_values[0, j], top_rows[0, j] = value, 100 + j
    for j, centre in enumerate([" the", " of", " on", " mat", " ran", " a"]):
        ids, acts = window([" cat", " sat", centre, "."], [0.0, 0.0, 1.0 - j / 10, 0.0])
        top_tokens[2, j], top_acts[2, j] = torch.tensor(ids), torch.tensor(acts)
        top_values[2, j], top_rows[2, j] = 1.0 - j / 10, 200 + j
    sample_tokens, sample_acts = top_tokens.clone(), top_acts.clone()
    sample_values, sample_rows = top_values.flip(1), top_rows.flip(1) + 1000  # ascending, other rows
    sample_tokens, sample_acts = sample_tokens.flip(1), sample_acts.flip(1)
    lens_top = torch.tensor([[ID["\ufffd"], ID[" sat"], ID[" ran"], ID[" on"]],
                             [ID[" a"], ID[" of"], ID[" the"], ID[" mat"]],
                             [ID["."], ID["\n"], ID[" a"], ID[" on"]]], dtype=torch.int32)
    fired = torch.tensor([40, 0, 12])
    tensors = {
        "density": fired.float() / 1000, "mean_act": torch.tensor([2.0, 0.0, 0.5]), "fired": fired,
        "hist": torch.zeros(d, 4, dtype=torch.long), "top_values": top_values, "top_rows": top_rows,
        "top_tokens": top_tokens, "top_acts": top_acts, "sample_values": sample_values,
        "sample_rows": sample_rows, "sample_tokens": sample_tokens, "sample_acts": sample_acts,
        "lens_top_ids": lens_top, "lens_top_values": torch.ones(d, 4), "lens_bottom_ids": lens_top.flip(1),
        "lens_bottom_values": -torch.ones(d, 4), "neighbour_ids": torch.tensor([[1, 2], [0, 2], [0, 1]],
                                                                             dtype=torch.int32),
        "neighbour_cos": torch.full((d, 2), 0.5), "n_tokens": torch.tensor([1000])}
    out = folder / "features"
    out.mkdir(parents=True)
    save_file(tensors, str(out / TENSORS))
    (out / VOCAB).write_text(json.dumps(VOCAB_WORDS))
    index = {"version": 1, "d_sae": d, "n_tokens": 1000, "hist_edges": [0.01, 0.1, 1, 10, 100], "signed": False,
             "left": LEFT, "right": RIGHT, "top_n": TOP, "samples": SAMPLES, "logit_lens": True,
             "tensors": sorted(tensors), "hook": "blocks.0.hook_resid_post"}
    (out / INDEX).write_text(json.dumps(index))
    return out


def test_token_label_rules():
    assert L.token_label([" of", " of", " to", " of", " to", " and"], [" the", " a", " an"]) == "‹of› ‹to› → the, a"
    assert L.token_label([" cat", " dog", " fish"], [" food"]) == "‹cat› ‹dog›… → food"  # all different: "…"
    assert L.token_label([], [" x"]) == "dead → x"
    assert L.token_label(["\n", "\n", " "], []) == "‹⏎›"  # blank tokens are named; no lens, no arrow
    assert L.token_label([" The", " the"], [" \ufffd", " ", " the", " THE", " one"]) == "‹The› → the, one"
    assert L.token_label([" x"], [".", "ing", " word", "\ufe0f"]) == "‹x› → word, ."  # word starts first
    long = L.token_label([" " + "x" * 30] * 3, [" " + "y" * 30, " " + "z" * 30])
    assert len(long) <= L.MAX_LABEL and long.startswith("‹xxxxxxxxxxx…›")


def test_labels_on_a_hand_built_store(tmp_path):
    out = hand_store(tmp_path / "run")
    store = FeatureStore(out)
    # no labels.json yet (a store from before labels): computed from the stored tensors
    assert not (out / L.LABELS).exists()
    want = ["‹cat› ‹dog› → sat, ran", "dead → a, of", "‹the› ‹of›… → a, on"]  # word starts before "."
    assert store.labels == want
    relabel(FeaturesConfig(run_dir=tmp_path / "run", labels_only=True, progress=False))
    assert json.loads((out / L.LABELS).read_text()) == want  # now saved, and the index names the file
    assert json.loads((out / INDEX).read_text())["labels"] == L.LABELS
    (out / L.LABELS).write_text(json.dumps(["one", "two", "three"]))  # the saved file is what the store reads
    store = FeatureStore(out)
    assert [store.label(i) for i in range(3)] == ["one", "two", "three"] and store.label(99) == ""
    assert [h["latent"] for h in store.search_text("TWO")] == [1]
    assert store.explanation(0) is None and store.explanation_score(0) is None and store.explained() == []


class FakeEndpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint answering deterministically: an explanation request gets
    "Explanation: the word cat"; a detection request gets 1 for each excerpt containing 'cat', else 0. Every
    request is recorded; `fail` queues status codes to answer first."""
    requests: list = []
    fail: list = []
    reply_override: str | None = None

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if type(self).fail:
            code = type(self).fail.pop(0)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "try later"}}')
            return
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if type(self).reply_override is not None:
            content = type(self).reply_override
        elif system == L.EXPLAIN_SYSTEM:
            content = "I looked at the excerpts.\nExplanation: the word cat"
        elif system == L.DETECT_SYSTEM:
            excerpts = [line.split(". ", 1)[1] for line in user.split("Excerpts:\n", 1)[1].split("\n\n")[0].split("\n")]
            content = "Answer: " + json.dumps([int("cat" in e) for e in excerpts])
        else:
            content = "ok"
        data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def endpoint():
    FakeEndpoint.requests, FakeEndpoint.fail, FakeEndpoint.reply_override = [], [], None
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_client_request_shape_key_and_retries(endpoint, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("SAEWB_EXPLAINER_KEY", "sk-test")
    client = L.ChatClient(endpoint, "tiny-llm", backoff=0)
    FakeEndpoint.fail = [503, 429]  # retried, then answered
    assert client.chat(L.EXPLAIN_SYSTEM, "Excerpts:\n1. a cat") == "I looked at the excerpts.\nExplanation: the word cat"
    assert len(FakeEndpoint.requests) == 3
    request = FakeEndpoint.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["headers"]["Content-Type"] == "application/json"
    body = request["body"]
    assert body["model"] == "tiny-llm" and body["temperature"] == 0 and body["max_tokens"] > 0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][1]["content"] == "Excerpts:\n1. a cat"
    # no key set: no Authorization header (a local server); a refused key names the variables
    monkeypatch.delenv("SAEWB_EXPLAINER_KEY")
    L.ChatClient(endpoint, "m", backoff=0).chat("s", "u")
    assert "Authorization" not in FakeEndpoint.requests[-1]["headers"]
    FakeEndpoint.fail = [401]
    with pytest.raises(L.ExplainerError, match="SAEWB_EXPLAINER_KEY"):
        L.ChatClient(endpoint, "m", backoff=0).chat("s", "u")
    FakeEndpoint.fail = [500] * 3
    with pytest.raises(L.ExplainerError, match="500"):
        L.ChatClient(endpoint, "m", backoff=0, retries=2).chat("s", "u")
    with pytest.raises(L.ExplainerError, match="cannot be reached"):
        L.ChatClient("http://127.0.0.1:9/v1", "m", backoff=0, retries=0, timeout=5).chat("s", "u")
    assert L.completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert L.completions_url("http://h:1/v1/chat/completions/") == "http://h:1/v1/chat/completions"


def test_detection_score_is_balanced_accuracy(endpoint):
    client = L.ChatClient(endpoint, "m", backoff=0)
    positives = [[" the", " cat", " sat"], [" a", " cat"], [" cat", "."], [" the", " dog"]]  # 3 of 4 say 'cat'
    negatives = [[" a", " dog", " ran"], [" the", " cat", " ran"]]  # 1 of 2 says 'cat' (a false alarm)
    result = L.detection_score(client, "the word cat", positives, negatives, seed=3)
    # hit rate 3/4, correct rejections 1/2: balanced accuracy 0.625 (plain accuracy would be 4/6)
    assert result == {"score": 0.625, "tp": 3, "tn": 1, "n_pos": 4, "n_neg": 2}
    user = FakeEndpoint.requests[-1]["body"]["messages"][1]["content"]
    assert FakeEndpoint.requests[-1]["body"]["messages"][0]["content"] == L.DETECT_SYSTEM
    assert user.startswith("Explanation: the word cat\n\nExcerpts:\n1. ") and "<<" not in user  # unmarked
    assert sorted(line.split(". ", 1)[1] for line in user.split("\n") if line[:1].isdigit()) == sorted(
        L.excerpt(t) for t in positives + negatives)
    # the shuffle is seeded: the same seed asks in the same order
    L.detection_score(client, "the word cat", positives, negatives, seed=3)
    assert FakeEndpoint.requests[-1]["body"]["messages"][1]["content"] == user
    assert L.balanced_accuracy([1] * 6, [1, 1, 1, 1, 0, 0])["score"] == 0.5  # "always fires" is chance
    assert L.balanced_accuracy([1, 0, 0], [1, 0, 0])["score"] == 1.0
    FakeEndpoint.reply_override = "I think the first two fire."
    with pytest.raises(L.ExplainerError, match="JSON list"):
        L.detection_score(client, "x", positives, negatives)
    assert L.parse_detection("here: [1, 0] and [true, false, 1]", 3) == [1, 0, 1]
    assert L.parse_explanation('Explanation: "cats and dogs"') == "cats and dogs"
    assert L.parse_explanation("animals\nmore") == "animals"


def test_explain_store_writes_explanations_the_store_reads(endpoint, tmp_path):
    out = hand_store(tmp_path / "run")
    store = FeatureStore(out)
    client = L.ChatClient(endpoint, "tiny-llm", backoff=0)
    # the pool of windows: only window 0 contains 'cat', and latents 0 and 2 fire there, so it is never one of
    # their negatives
    windows = [[ID[" a"], ID[" cat"]], [ID[" the"], ID[" dog"]], [ID[" on"], ID[" mat"]], [ID["."], ID[" ran"]]]
    fired = torch.tensor([[True, False, True], [False, False, False], [False, False, False], [False, False, False]])
    data = L.explain_store(store, client, (windows, fired), workers=2, n_neg=3, progress=False)
    assert set(data["latents"]) == {"0", "2"} and data["failed"] == {}  # the dead latent is not asked about
    explain = [r for r in FakeEndpoint.requests if r["body"]["messages"][0]["content"] == L.EXPLAIN_SYSTEM]
    prompt0 = next(r["body"]["messages"][1]["content"] for r in explain if "5 on" in r["body"]["messages"][1]["content"])
    assert "<< cat>>" in prompt0 and "promotes (logit lens): sat, ran" in prompt0
    assert prompt0.count("\n") >= 3 and "4 on" not in prompt0  # even ranks shown (5, 3.5, 2.5), odd held out
    # latent 0: its 5 held-out positives are the samples spread over its sorted sample (dog, cat, dog, cat, cat):
    # the fake scorer finds 3 of 5 and rejects its 3 silent windows -> (3/5 + 3/3) / 2 = 0.8; latent 2's windows
    # all hold 'cat' -> 1.0
    assert {k: data["latents"]["0"][k] for k in ("score", "tp", "n_pos", "tn", "n_neg")} == {
        "score": 0.8, "tp": 3, "n_pos": 5, "tn": 3, "n_neg": 3}
    assert data["latents"]["2"]["score"] == 1.0
    store = FeatureStore(out)
    assert store.explanation(0) == "the word cat" and store.explanation_score(0) == 0.8
    assert store.explainer_model == "tiny-llm" and store.explanation(1) is None
    assert [h["latent"] for h in store.search_text("word CAT")] == [2, 0]  # best detection score first
    assert next(h for h in store.search_text("cat") if h["latent"] == 0)["where"] == ["label", "explanation"]
    assert [r["latent"] for r in store.explained()] == [2, 0]
    # a second run with the same model asks nothing again
    before = len(FakeEndpoint.requests)
    L.explain_store(store, client, (windows, fired), progress=False)
    assert len(FakeEndpoint.requests) == before
    # an endpoint that always fails stops the run with its message, and writes nothing
    (out / L.EXPLANATIONS).unlink()
    FakeEndpoint.fail = [400] * 10
    with pytest.raises(L.ExplainerError, match="all failed"):
        L.explain_store(store, L.ChatClient(endpoint, "other", backoff=0), (windows, fired), progress=False,
                        workers=1)
    assert not (out / L.EXPLANATIONS).exists()


def test_negative_pool_matches_brute_force(tiny_cache):
    from saes import build_sae

    hook = "blocks.1.hook_resid_post"
    sae = build_sae("topk", d_in=64, d_sae=64, k=4, hook_name=hook, seed=2)
    windows, fired = L.negative_pool(sae, tiny_cache, hook, left=3, right=1, size=40, seed=1, chunk=7)
    assert len(windows) == 40 and fired.shape == (40, 64)
    shards = range(tiny_cache.n_shards)
    acts = torch.cat([tiny_cache.read(i, f"acts.{hook}").float() for i in shards])
    tokens = torch.cat([tiny_cache.tokens(i).reshape(-1) for i in shards])
    keep = torch.cat([tiny_cache.keep_mask(i, hook) for i in shards])
    with torch.no_grad():
        codes = sae.encode(acts).float() * keep[:, None]
    ctx = tiny_cache.context_length
    rows = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(1))[:40].sort().values.tolist()
    for w, row, f in zip(windows, rows, fired):
        lo, hi = max(row - 3, row - row % ctx), min(row + 2, row - row % ctx + ctx)
        assert w == tokens[lo:hi].tolist()
        assert f.tolist() == (codes[lo:hi] != 0).any(0).tolist()
    assert 0 < fired.float().mean() < 1


def test_saewb_features_with_an_explainer_end_to_end(endpoint, tiny_model, tiny_cache, tmp_path, monkeypatch):
    """build_features with --explainer-url: the store is written, then explanations.json with one scored
    explanation per latent asked for; --labels-only on it later keeps them and asks nothing again."""
    from analysis.features import build_features
    from saes import build_sae, save_sae

    hook = "blocks.1.hook_resid_post"
    monkeypatch.setenv("SAEWB_EXPLAINER_KEY", "sk-e2e")
    sae = build_sae("topk", d_in=64, d_sae=32, k=4, hook_name=hook, seed=4)
    run = tmp_path / "run"
    run.mkdir()
    save_sae(sae, run)
    (run / "summary.json").write_text(json.dumps({"cache": str(tiny_cache.path), "hook": hook}))
    (run / "config.json").write_text(json.dumps({"cache": {"model": "tiny"}}))
    cfg = FeaturesConfig(run_dir=run, top_n=8, samples=12, left=4, right=2, progress=False, explainer_url=endpoint,
                         explainer_model="tiny-llm", explain_max=3, explainer_workers=2)
    out = build_features(cfg, model=tiny_model, sae=sae)
    store = FeatureStore(out)
    data = json.loads((out / L.EXPLANATIONS).read_text())
    fired = store.column("fired")
    first = [str(i) for i in range(32) if fired[i] > 0][:3]
    assert list(data["latents"]) == first and data["explainer_model"] == "tiny-llm"
    for latent in first:
        entry = data["latents"][latent]
        assert entry["explanation"] == "the word cat" and 0 <= entry["score"] <= 1
        assert entry["n_pos"] >= 1 and entry["n_neg"] == 5
        assert store.explanation(int(latent)) == "the word cat"
    assert {r["headers"]["Authorization"] for r in FakeEndpoint.requests} == {"Bearer sk-e2e"}
    assert "sk-e2e" not in (out / L.EXPLANATIONS).read_text()
    asked = len(FakeEndpoint.requests)
    relabel(FeaturesConfig(run_dir=run, labels_only=True, progress=False, explainer_url=endpoint,
                           explainer_model="tiny-llm", explain_max=3))
    assert len(FakeEndpoint.requests) == asked and FeatureStore(out).explanation(int(first[0])) == "the word cat"
