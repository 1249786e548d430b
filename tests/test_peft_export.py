"""LoRA export: the PEFT adapter loads in Hugging Face PEFT and gives bdjax's logits; the merged
HF checkpoint loads in transformers and agrees too; the adapter reads back bitwise."""

import jax
import numpy as np
import pytest

import bdjax
from bdjax import lora
from bdjax.checkpoints import save_hf_dir
from bdjax.checkpoints.peft import load_peft_adapter, save_peft_adapter
from bdjax.errors import CheckpointError
from bdjax.models.rows import forward
from conftest import torch_logits


def _random_lora(params, targets=lora.ALL_PROJECTIONS):
    adapters = lora.init(params, jax.random.key(1), rank=4, targets=targets)
    return jax.tree.map(lambda x: np.asarray(0.05 * jax.random.normal(jax.random.key(x.size), x.shape)), adapters)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_peft_adapter_and_merged_export_match_bdjax(tmp_path, hf_dirs, family):
    import peft
    import transformers

    path, hf = hf_dirs[family]
    model = bdjax.load(path)
    adapters = _random_lora(model.params)
    save_peft_adapter(tmp_path / "adapter", adapters, alpha=8.0, base_model=str(path))
    merged = lora.merge(model.params, adapters, alpha=8.0)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12)).astype(np.int32)
    ours = np.asarray(forward(model.config, merged, tokens))

    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    np.testing.assert_allclose(torch_logits(with_adapter, tokens), ours, atol=1e-4)

    save_hf_dir(tmp_path / "merged", model.config, jax.device_get(merged))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    np.testing.assert_allclose(torch_logits(reloaded.eval(), tokens), ours, atol=1e-4)

    back, alpha = load_peft_adapter(tmp_path / "adapter", model.config)
    assert alpha == 8.0
    assert jax.tree.all(jax.tree.map(np.array_equal, back, jax.device_get(adapters)))


def test_partial_targets_and_bad_adapters(tmp_path, hf_dirs):
    path, _ = hf_dirs["llama"]
    model = bdjax.load(path)
    adapters = _random_lora(model.params, targets=r"layers/attn/(q|v)")
    save_peft_adapter(tmp_path / "a", adapters, alpha=16.0)
    import json
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    back, _ = load_peft_adapter(tmp_path / "a", model.config)
    assert sorted(back["layers"]["attn"]) == ["q", "v"]

    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_peft_adapter(tmp_path / "pickled", model.config)
    with pytest.raises(CheckpointError, match="not a PEFT adapter directory"):
        load_peft_adapter(tmp_path, model.config)
