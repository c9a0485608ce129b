"""Model families through the real loading path: for GPT-2, Llama, Gemma-2, Qwen2 and GPT-NeoX a random 3-layer model
is built offline from a transformers config (with the tiny model's 1024-token BPE) and saved to a folder; then
`load_model(folder)`, its hooks, the logit lens, an activation cache, a trained SAE and its report card are each
checked against the Hugging Face model loaded independently from the same folder. Also `hf_module_to_hook`
(sparsify hookpoints -> our hook names) and the one-sentence error for a family the bridge cannot load."""
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as T

from training.model import check_hooks, direct_logits, hf_module_to_hook, load_model, stop_layer, tiny_dir

N_LAYERS = 3  # so that blocks.1 is not the last block: HF's last hidden state is after the final norm
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_attn_out", "blocks.0.attn.hook_z"]
CACHE_HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.0.attn.hook_z"]
CONTEXT = 64  # report_card needs >= 64 scored positions: 2 contexts of 32 give at most 62
TOL = dict(atol=1e-4, rtol=1e-4)

COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, max_position_embeddings=128,
              initializer_range=0.1)
# family -> (config class, model class, config fields, final norm module, HF module names of block 1's output,
# its MLP and its attention as sparsify names them, the input embedding module)
FAMILIES = {
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel,
             dict(n_layer=N_LAYERS, n_embd=64, n_head=4, n_positions=128, initializer_range=0.1),
             "transformer.ln_f", ("h.1", "h.1.mlp", "h.1.attn", "wte"), "transformer."),
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(COMMON, num_hidden_layers=N_LAYERS, num_key_value_heads=2),
              "model.norm", ("layers.1", "layers.1.mlp", "layers.1.self_attn", "embed_tokens"), "model."),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM,  # a sliding window shorter than the context
               dict(COMMON, num_hidden_layers=N_LAYERS, num_key_value_heads=2, head_dim=16, sliding_window=16),
               "model.norm", ("layers.1", "layers.1.mlp", "layers.1.self_attn", "embed_tokens"), "model."),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(COMMON, num_hidden_layers=N_LAYERS, num_key_value_heads=2),
              "model.norm", ("layers.1", "layers.1.mlp", "layers.1.self_attn", "embed_tokens"), "model."),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM,  # parallel residual, partial rotary (NeoX defaults)
                 dict(COMMON, num_hidden_layers=N_LAYERS),
                 "gpt_neox.final_layer_norm", ("layers.1", "layers.1.mlp", "layers.1.attention", "embed_in"),
                 "gpt_neox."),
}


@dataclass
class Family:
    name: str
    folder: Path
    hf: torch.nn.Module  # loaded from the folder by transformers itself, independent of the bridge
    model: object  # the TransformerBridge from load_model(folder)
    tokenizer: object
    final_norm: str
    modules: tuple[str, str, str, str]
    prefix: str


def build_folder(name: str, folder: Path, tokenizer) -> Path:
    """A random model of the family saved with the tiny model's tokenizer; norm gains/biases and linear biases get
    noise (their init, ones and zeros, would hide a wrong γ or a dropped bias)."""
    config_cls, model_cls, fields = FAMILIES[name][:3]
    config = config_cls(**fields, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return T.AutoTokenizer.from_pretrained(tiny_dir())


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tokenizer, tmp_path_factory) -> Family:
    name = request.param
    folder = build_folder(name, tmp_path_factory.mktemp(name) / "model", tokenizer)
    hf = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == FAMILIES[name][1].__name__
    return Family(name, folder, hf, load_model(str(folder)), tokenizer, *FAMILIES[name][3:])


def corpus_tokens(tokenizer, n: int) -> torch.Tensor:
    from training.corpus import token_contexts

    return token_contexts(tokenizer, "austen", CONTEXT, n)  # BOS first, as every job feeds the model


def hf_forward(hf, tokens: torch.Tensor, modules: list[str] = ()):
    """HF logits, hidden states and the outputs of the named modules (the first element of a tuple output)."""
    outputs, handles = {}, []
    for name in modules:
        def keep(module, args, output, name=name):
            outputs[name] = (output[0] if isinstance(output, tuple) else output).detach()
        handles.append(hf.get_submodule(name).register_forward_hook(keep))
    try:
        with torch.no_grad():
            out = hf(tokens, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return out.logits, out.hidden_states, outputs


# ---- loading and hooks -------------------------------------------------------------------------------------------
def test_load_model_has_our_hooks(family):
    model = family.model
    assert model.cfg.n_layers == N_LAYERS and model.cfg.d_model == 64 and model.cfg.d_vocab == len(family.tokenizer)
    assert all(hook in model.hook_dict for hook in HOOKS + ["hook_embed", "blocks.2.hook_resid_pre"])
    check_hooks(model, HOOKS)
    with pytest.raises(ValueError, match="layers 0..2"):
        check_hooks(model, ["blocks.3.hook_resid_post"])
    # the bridge's tokenizer is the folder's: same ids, same specials (corpus.py adds BOS itself)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    assert model.tokenizer(text, add_special_tokens=False)["input_ids"] == \
        family.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sorted(model.tokenizer.all_special_ids) == sorted(family.tokenizer.all_special_ids)


def test_hook_values_and_logits_equal_the_hf_model(family):
    tokens = corpus_tokens(family.tokenizer, 2)
    logits, hidden, _ = hf_forward(family.hf, tokens)
    assert logits.std() > 0.1 and hidden[2].std() > 0.1  # not so small that 1e-4 means nothing
    with torch.no_grad():
        bridge_logits, cache = family.model.run_with_cache(tokens)
    torch.testing.assert_close(bridge_logits, logits, **TOL)
    for layer in range(N_LAYERS - 1):  # hidden_states[N + 1] is block N's output, except after the last block
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1], **TOL)
    # the same values from a forward that stops early (what caching runs)
    hooks = ["blocks.1.hook_resid_post"]
    assert stop_layer(hooks, N_LAYERS) == 2
    with torch.no_grad():
        _, early = family.model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=stop_layer(hooks, N_LAYERS))
    torch.testing.assert_close(early["blocks.1.hook_resid_post"], hidden[2], **TOL)


def test_direct_logits_follow_the_final_norm_and_unembedding(family):
    """The lens of d is the HF final norm + output embedding applied to d, without the norm's 1/scale and bias:
    equal up to a positive factor per row (Gemma's norm multiplies by 1 + weight)."""
    d = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    norm = family.hf.get_submodule(family.final_norm)
    unembed = family.hf.get_output_embeddings()
    with torch.no_grad():
        normed = norm(d[None])[0] - (norm.bias if getattr(norm, "bias", None) is not None else 0)
        expected = unembed(normed)  # [6, vocab]
    lens = direct_logits(family.model, d)
    scale = (lens * expected).sum(-1, keepdim=True) / expected.pow(2).sum(-1, keepdim=True)
    assert bool((scale > 0).all())
    torch.testing.assert_close(lens, scale * expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(direct_logits(family.model, d, token_ids=[3, 900]), lens[:, [3, 900]])


# ---- caching, training, evaluation -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_cfg(family, tmp_path_factory):
    from training.caching import CacheConfig

    return CacheConfig(model=str(family.folder), hooks=list(CACHE_HOOKS), tokens=2048, shard_tokens=1024,
                       context_length=CONTEXT, batch_size=8, out=tmp_path_factory.mktemp("cache") / family.name)


@pytest.fixture(scope="module")
def cache(cache_cfg):
    from training.activation_store import ActivationCache
    from training.caching import cache_activations

    return ActivationCache(cache_activations(cache_cfg, progress=False))  # loads the model from the folder itself


def test_cache_equals_a_direct_hook_read(family, cache):
    assert cache.n_shards == 2 and cache.context_length == CONTEXT
    expected_tokens = corpus_tokens(family.tokenizer, 2048 // CONTEXT)
    for index in range(cache.n_shards):
        tokens = cache.tokens(index).long()
        torch.testing.assert_close(tokens, expected_tokens[index * 16:(index + 1) * 16])
        with torch.no_grad():
            _, direct = family.model.run_with_cache(tokens, names_filter=CACHE_HOOKS)
        for hook in CACHE_HOOKS:
            torch.testing.assert_close(cache.read(index, f"acts.{hook}"), direct[hook].reshape(tokens.numel(), -1),
                                       **TOL)
        _, hidden, _ = hf_forward(family.hf, tokens)
        torch.testing.assert_close(cache.read(index, "acts.blocks.0.hook_resid_post"),
                                   hidden[1].reshape(tokens.numel(), -1), **TOL)


def test_train_and_report_card_clean_loss_equals_the_hf_loss(family, cache, cache_cfg, tmp_path):
    from analysis.evals import report_card
    from training.run import TrainConfig, train
    from training.trainer import LoopConfig

    cfg = TrainConfig(cache=cache_cfg, hooks=["blocks.0.hook_resid_post"], k=[4], expansion=2, batch_size=256,
                      max_steps=3, checkpoint_every=0, wandb="off", run_dir=tmp_path / "run",
                      loop=LoopConfig(lr=1e-3, warmup_steps=1))
    summary = train(cfg, progress=False)["sae"]
    assert summary["steps"] == 3 and summary["cache"] == str(cache.path)
    card = report_card(cfg.run_dir, max_contexts=2, budget_curve=False)  # loads the model by its folder name
    assert card["model"] == str(family.folder)
    down = card["downstream"]
    for key in ("ce_clean", "ce_sae", "ce_zero", "ce_mean"):
        assert math.isfinite(down[key]), key
    # report_card scores the first max_contexts contexts of the held-out shards (the last one of two here):
    # rows 16 and 17 of the corpus' contexts, taken here from the corpus itself, not from the cache
    tokens = corpus_tokens(family.tokenizer, 18)[16:18]
    special = torch.isin(tokens, torch.tensor(family.tokenizer.all_special_ids))
    logits, _, _ = hf_forward(family.hf, tokens)
    nll = -logits.double().log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]  # [2, ctx-1]
    by_convention = {"saebench": ~special[:, :-1],  # the input token is not special
                     "special_masked": ~special[:, :-1] & ~special[:, 1:]}  # nor is the target
    for name, mask in by_convention.items():
        hf_ce = (nll * mask).sum().item() / mask.sum().item()
        assert card["downstream_conventions"][name]["ce_clean"] == pytest.approx(hf_ce, abs=1e-4), name
        assert card["downstream_conventions"][name]["scored_positions"] == int(mask.sum())
    assert down["ce_clean"] == card["downstream_conventions"]["saebench"]["ce_clean"]


# ---- sparsify hookpoints -----------------------------------------------------------------------------------------
HF_NAMES = [
    ("layers.0", "blocks.0.hook_resid_post"), ("layers.11", "blocks.11.hook_resid_post"),
    ("layers.3.mlp", "blocks.3.hook_mlp_out"), ("layers.3.self_attn", "blocks.3.hook_attn_out"),
    ("model.layers.5", "blocks.5.hook_resid_post"), ("model.layers.5.mlp", "blocks.5.hook_mlp_out"),
    ("model.layers.5.self_attn", "blocks.5.hook_attn_out"),
    ("h.2", "blocks.2.hook_resid_post"), ("h.2.mlp", "blocks.2.hook_mlp_out"), ("h.2.attn", "blocks.2.hook_attn_out"),
    ("transformer.h.7", "blocks.7.hook_resid_post"), ("transformer.h.7.attn", "blocks.7.hook_attn_out"),
    ("gpt_neox.layers.4", "blocks.4.hook_resid_post"), ("gpt_neox.layers.4.attention", "blocks.4.hook_attn_out"),
    ("layers.4.attention", "blocks.4.hook_attn_out"), ("gpt_neox.layers.4.mlp", "blocks.4.hook_mlp_out"),
    ("embed_tokens", "hook_embed"), ("model.embed_tokens", "hook_embed"), ("wte", "hook_embed"),
    ("transformer.wte", "hook_embed"), ("embed_in", "hook_embed"), ("gpt_neox.embed_in", "hook_embed"),
]


@pytest.mark.parametrize("name, hook", HF_NAMES)
def test_hf_module_to_hook_table(name, hook):
    assert hf_module_to_hook(name) == hook


@pytest.mark.parametrize("name", ["layers", "layers.x", "layers.1.mlp.down_proj", "h.1.self_attn", "blocks.1",
                                  "model.norm", "lm_head", "layers.1.input_layernorm", "decoder.layers.1", ""])
def test_hf_module_to_hook_refuses_other_names(name):
    with pytest.raises(ValueError, match=r"^Unknown Hugging Face module name .*: use layers\.N, .*gpt_neox\.$"):
        hf_module_to_hook(name)


def test_hf_module_hooks_read_what_the_hf_modules_output(family):
    """The mapped hook of each sparsify name holds that HF module's output (its first element for attention), on
    the family's own module names; `layers.1` is HF hidden_states[2], so the off-by-one is right. Gemma-2's
    MLP/attention outputs are normed again before the residual add: there the module output is mlp.hook_out /
    attn.hook_out, as hf_module_to_hook's docstring says."""
    tokens = corpus_tokens(family.tokenizer, 1)
    full_names = [family.prefix + name for name in family.modules]
    _, hidden, outputs = hf_forward(family.hf, tokens, full_names)
    with torch.no_grad():
        _, cache = family.model.run_with_cache(tokens)
    block, mlp, attn, embed = family.modules
    assert hf_module_to_hook(block) == hf_module_to_hook(family.prefix + block) == "blocks.1.hook_resid_post"
    torch.testing.assert_close(cache[hf_module_to_hook(block)], hidden[2], **TOL)
    torch.testing.assert_close(cache[hf_module_to_hook(block)], outputs[family.prefix + block], **TOL)
    torch.testing.assert_close(cache[hf_module_to_hook(embed)], outputs[family.prefix + embed], **TOL)
    for name, module_hook in ((mlp, "blocks.1.mlp.hook_out"), (attn, "blocks.1.attn.hook_out")):
        output = outputs[family.prefix + name]
        torch.testing.assert_close(cache[module_hook], output, **TOL)
        if family.name == "gemma2":
            assert not torch.allclose(cache[hf_module_to_hook(name)], output, atol=1e-2)
        else:
            torch.testing.assert_close(cache[hf_module_to_hook(name)], output, **TOL)


# ---- local folders ---------------------------------------------------------------------------------------------
def test_a_family_the_bridge_cannot_load_is_one_clear_sentence(tmp_path):
    config = T.BioGptConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            vocab_size=64, max_position_embeddings=64)
    T.BioGptForCausalLM(config).save_pretrained(tmp_path / "biogpt")
    with pytest.raises(ValueError) as error:
        load_model(str(tmp_path / "biogpt"))
    message = str(error.value)
    assert "BioGptForCausalLM" in message and "GPT-2, Llama, Gemma-2, Qwen2 and GPT-NeoX" in message
    assert message.startswith("Model folder ") and message.endswith(".") and "\n" not in message
    assert len(message) < 350 + len(str(tmp_path))  # not the bridge's list of some 160 architectures


def test_a_folder_given_with_a_tilde_loads(tokenizer, tmp_path, monkeypatch):
    build_folder("llama", tmp_path / "llama", tokenizer)
    monkeypatch.setenv("HOME", str(tmp_path))
    model = load_model("~/llama")
    assert model.cfg.n_layers == N_LAYERS
