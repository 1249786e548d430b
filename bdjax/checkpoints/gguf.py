"""Import llama.cpp GGUF files: config from metadata, dequantized weights, tokenizer and chat template.

llama.cpp's converter permutes the rows of q_proj/k_proj (for its interleaved RoPE) in `llama`
architecture files; we undo that so the weights are in Hugging Face's rotate-half layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bdjax.checkpoints.layout import assemble
from bdjax.errors import CheckpointError, TokenizerError
from bdjax.models.config import ModelConfig
from bdjax.tokenizer import Tokenizer

ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
# The types whose dequantization we rely on (gguf.quants implements each in numpy).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
_PERMUTED_ARCHS = ("llama", "mistral")

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors for corrupt files
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; bdjax reads "
                              f"{sorted(ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(f"{path}: this GGUF stores Llama-3.1 RoPE frequency factors, which bdjax does not "
                              "import yet; load the original Hugging Face checkpoint instead")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
    heads = int(get("attention.head_count"))
    embed = int(get("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = next(t.shape[1] for t in reader.tensors if t.name == "token_embd.weight")
    sliding = get("attention.sliding_window")
    return ModelConfig(
        family=ARCHITECTURES[arch],
        vocab_size=int(vocab),
        hidden_size=embed,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", embed // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        out_bias="blk.0.attn_output.bias" in names,
        sliding_window=int(sliding) if sliding else None,
    )


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows (head, pair, 2) back to (head, 2, pair)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(reader, config: ModelConfig, path: Path) -> Iterator[tuple[str, np.ndarray]]:
    from gguf.quants import dequantize

    permuted = _field(reader, "general.architecture") in _PERMUTED_ARCHS
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name} uses quantization type {t.tensor_type.name}, which bdjax "
                                  f"does not import; supported: {', '.join(SUPPORTED_TYPES)}")
        if t.name in _GLOBAL:
            name = _GLOBAL[t.name]
        else:
            block, _, rest = t.name.partition(".")
            idx, _, suffix = rest.partition(".")
            if block != "blk" or not idx.isdigit() or suffix not in _LAYER:
                yield t.name, np.zeros(0)  # let assemble() report it as unknown
                continue
            name = f"model.layers.{idx}.{_LAYER[suffix]}"
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if permuted and suffix_is(name, "q_proj"):
            w = _unpermute(w, config.num_heads)
        elif permuted and suffix_is(name, "k_proj"):
            w = _unpermute(w, config.num_kv_heads)
        yield name, w


def suffix_is(name: str, proj: str) -> bool:
    return f".self_attn.{proj}." in name


def tokenizer_from_gguf(reader, path: Path) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (bdjax builds byte-level BPE "
                             "'gpt2' tokenizers); load the Hugging Face checkpoint with its tokenizer.json instead")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise TokenizerError(f"{path}: GGUF pre-tokenizer {pre!r} is unknown to bdjax (known: "
                             f"{sorted(_PRE_TOKENIZERS)}); load the Hugging Face checkpoint instead")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 fuse_unk=False, byte_fallback=False))
    regex = _PRE_TOKENIZERS[pre]
    if regex is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif regex == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # token_type 3 = control, 4 = user-defined: both are atomic, and control tokens are special.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    special = lambda key: (tokens[int(i)] if (i := _field(reader, f"tokenizer.ggml.{key}_token_id")) is not None
                           and int(i) < len(tokens) else None)
    bos = special("bos")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    return Tokenizer(backend, _field(reader, "tokenizer.chat_template"), bos, special("eos"), special("padding"),
                     special("unknown"))


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp pre-tokenizer name -> split regex (None: GPT-2's own; "digits": split digits, then GPT-2's).
_PRE_TOKENIZERS = {"default": None, "gpt2": None, "gpt-2": None, "smollm": "digits",
                   "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
                   "qwen2": _QWEN2_SPLIT}


def load_gguf(path: str | Path, *, with_tokenizer: bool = True):
    """(ModelConfig, params as float32 numpy arrays, Tokenizer or None) from a GGUF file."""
    path = Path(path)
    reader = _reader(path)
    config = config_from_gguf(reader, path)
    params = assemble(config, _hf_tensors(reader, config, path), source=str(path))
    tokenizer = tokenizer_from_gguf(reader, path) if with_tokenizer else None
    return config, params, tokenizer
