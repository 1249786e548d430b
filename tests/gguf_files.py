"""Write small GGUF files the way llama.cpp's converter does, for import tests.

This mirrors convert_hf_to_gguf.py's conventions (tensor names, metadata keys, and the q/k row
permutation for `llama` files) independently of bdjax's importer, so the import is checked
against the format rather than against itself.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of q/k rows (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_vocab() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: a byte-level BPE vocabulary with no merges."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
VOCAB = byte_vocab() + SPECIALS  # 260 tokens
CHAT_TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


def write(path: Path, hf_config: dict, state: dict[str, np.ndarray], qtype: str = "F32",
          arch: str | None = None, raw_type: str | None = None) -> Path:
    """Write an HF state dict (numpy, [out, in] weights) as a GGUF file with weights in `qtype`.

    Norms and biases stay F32, as llama.cpp keeps 1-D tensors. `raw_type` writes the first
    matrix with that type's tag and random bytes (for unsupported-type tests)."""
    arch = arch or hf_config["model_type"]
    heads, kv = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hf_config["num_hidden_layers"])
    w.add_context_length(hf_config["max_position_embeddings"])
    w.add_embedding_length(hf_config["hidden_size"])
    w.add_feed_forward_length(hf_config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(hf_config.get("rope_theta") or hf_config["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(hf_config["rms_norm_eps"])
    w.add_vocab_size(hf_config["vocab_size"])
    w.add_rope_dimension_count(hf_config["hidden_size"] // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(VOCAB)
    w.add_token_types([gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * len(SPECIALS))
    w.add_token_merges([])
    w.add_bos_token_id(VOCAB.index("<|im_start|>"))
    w.add_eos_token_id(VOCAB.index("<|im_end|>"))
    w.add_pad_token_id(VOCAB.index("<pad>"))
    w.add_chat_template(CHAT_TEMPLATE)
    raw_done = False
    for name, tensor in state.items():
        if name in _NAMES:
            gname = _NAMES[name]
        else:
            idx, suffix = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{idx}.{_LAYER[suffix]}"
        t = np.asarray(tensor, np.float32)
        if arch == "llama" and gname.endswith("attn_q.weight"):
            t = permute(t, heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            t = permute(t, kv)
        if t.ndim == 2 and raw_type is not None and not raw_done:
            qt = gguf.GGMLQuantizationType[raw_type]
            block, nbytes = gguf.GGML_QUANT_SIZES[qt]
            data = np.random.default_rng(0).integers(0, 255, (t.shape[0], t.shape[1] // block * nbytes), np.uint8)
            w.add_tensor(gname, data, raw_dtype=qt)
            raw_done = True
        elif t.ndim == 2 and qtype != "F32":
            qt = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gname, gguf.quants.quantize(t, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
