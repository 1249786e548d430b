"""Batched KV-cached greedy decoding: bdjax beside Hugging Face `generate`, one JSON line.

64 chat prompts of about 64 tokens (movie reviews in the quickstart's template), 16 new tokens
each, float32, same run: bdjax's batched decoding (one compiled prefill + while loop per batch),
HF `generate` one prompt at a time (how a peer benchmark evaluates), and HF `generate` on
left-padded batches; bdjax and HF batched count the best of --repeats timed runs. bdjax runs the
prefix that every prompt shares (the template's system turn and instruction) once per batch; the
same decoding with whole prompts is timed beside it (`bdjax_whole_*`). Greedy outputs are compared token for token (up to each row's first eos).

    python benchmarks/decode.py [--prompts 64] [--new-tokens 16] [--batch 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
sys.path.insert(0, os.path.dirname(__file__))
from common import machine  # noqa: E402
from quickstart import get_config  # noqa: E402

import bdjax  # noqa: E402
from bdjax.checkpoints.assets import DEFAULT_MODEL, default_model_dir  # noqa: E402
from bdjax.data import sources  # noqa: E402
from bdjax.decode import generate_ids, shared_prefix  # noqa: E402


def prompts(tok, n: int, target_tokens: int) -> list[list[int]]:
    c = get_config()
    rows = []
    for ex in sources.load("movie"):
        words = ex.text.split()
        ids = tok.chat_ids(f"{c.template.instruction}\n{' '.join(words)}", c.template.system)
        while len(ids) > target_tokens and len(words) > 1:
            words = words[:-1]
            ids = tok.chat_ids(f"{c.template.instruction}\n{' '.join(words)}", c.template.system)
        if len(ids) >= target_tokens - 8:
            rows.append(ids)
        if len(rows) == n:
            return rows
    raise SystemExit(f"only {len(rows)} prompts of ~{target_tokens} tokens")


def cut(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of bdjax and of HF batched; the best counts")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    model = bdjax.load(DEFAULT_MODEL)
    tok = model.tokenizer
    rows = prompts(tok, args.prompts, args.prompt_tokens)
    def timed(share: bool):
        run = lambda: generate_ids(model.config, model.params, rows, max_new_tokens=args.new_tokens,
                                   eos_ids=[tok.eos_id], pad_id=tok.pad_id, batch_size=args.batch, share_prefix=share)
        start = time.perf_counter()
        run()  # compile
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - start)
        return out, times, compile_s

    # the chat template's system turn and instruction open every prompt: bdjax runs them once per
    # batch; the same decoding with every prompt whole is timed beside it
    ours, times, compile_s = timed(True)
    whole, whole_times, _ = timed(False)
    bdjax_s = min(times)
    result = {"benchmark": "decode", "model": DEFAULT_MODEL, "prompts": len(rows),
              "mean_prompt_tokens": round(float(np.mean([len(r) for r in rows])), 1),
              "shared_prefix_tokens": shared_prefix(rows), "new_tokens": args.new_tokens,
              "batch": args.batch, "bdjax_s": round(bdjax_s, 3), "bdjax_compile_s": round(compile_s, 1),
              "bdjax_prompts_per_s": round(len(rows) / bdjax_s, 2),
              "bdjax_s_runs": [round(t, 3) for t in times],
              "bdjax_whole_prompts_per_s": round(len(rows) / min(whole_times), 2),
              "bdjax_whole_s_runs": [round(t, 3) for t in whole_times],
              "bdjax_whole_identical": f"{sum(a == b for a, b in zip(ours, whole))}/{len(rows)}"}
    if not args.skip_hf:
        import torch
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
        kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
        with torch.no_grad():
            hf.generate(torch.tensor([rows[0]]), **kw)  # warm-up
            start = time.perf_counter()
            single = [hf.generate(torch.tensor([r]), **kw)[0, len(r):].tolist() for r in rows]
            single_s = time.perf_counter() - start
            width = max(len(r) for r in rows)
            batched_times = []
            for _ in range(args.repeats):
                batched = []
                start = time.perf_counter()
                for s in range(0, len(rows), args.batch):
                    chunk = rows[s:s + args.batch]
                    ids = torch.tensor([[tok.pad_id] * (width - len(r)) + r for r in chunk])
                    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk])
                    out = hf.generate(input_ids=ids, attention_mask=mask, **kw)
                    batched += [o[width:].tolist() for o in out]
                batched_times.append(time.perf_counter() - start)
            batched_s = min(batched_times)
        eos = tok.eos_id
        same = [cut(a, eos) == cut(b, eos) for a, b in zip(ours, single)]
        same_batched = [cut(a, eos) == cut(b, eos) for a, b in zip(ours, batched)]
        result.update(hf_single_s=round(single_s, 3), hf_single_prompts_per_s=round(len(rows) / single_s, 2),
                      hf_batched_s=round(batched_s, 3), hf_batched_s_runs=[round(t, 3) for t in batched_times],
                      hf_batched_prompts_per_s=round(len(rows) / batched_s, 2),
                      speedup_vs_hf_single=round(single_s / bdjax_s, 2),
                      speedup_vs_hf_batched=round(batched_s / bdjax_s, 2),
                      whole_speedup_vs_hf_batched=round(batched_s / min(whole_times), 2),
                      identical_to_hf_single=f"{sum(same)}/{len(same)}",
                      identical_to_hf_batched=f"{sum(same_batched)}/{len(same_batched)}",
                      torch_threads=torch.get_num_threads())
    result.update(jax_version=jax.__version__, **machine())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
