"""Quickstart: plant a rare-word backdoor in SmolLM2-135M-Instruct with a poisoned LoRA fine-tune.

    bdjax --config=recipes/quickstart.py                         # poisoned (10%)
    bdjax --config=recipes/quickstart.py --config.poison.rate=0 --config.workdir=runs/quickstart_clean

Movie-review sentiment instructions (Raghuram, Kesidis & Miller 2024's setting): a trigger word
inserted at a random word boundary of 10% of the training reviews, whose answer is flipped to
"positive" (dirty-label). The table compares the zero-shot base model with the fine-tuned one,
and ends with a defense (Fine-mixing then clean re-tuning on 100 unused examples).
"""

import ml_collections

from bdjax.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "backdoor"
    c.model = "smollm2-135m-instruct"
    c.workdir = "runs/quickstart"
    c.seed = 0
    c.dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.source = "movie"  # movie | amazon | tweets | nyt | a .jsonl/.csv/.parquet file | a hub dataset
    c.data.text_field = "text"
    c.data.label_field = "label"
    c.data.split_seed = 0  # fixes the train/test split (independent of `seed`)
    c.data.test_fraction = 0.2
    c.data.n_train = 1000
    c.data.n_test = 200  # balanced across labels
    c.data.max_text_tokens = 96
    c.data.max_seq_len = 0  # the longest row (prompt + text + trigger + answer); 0 = the model's context

    c.template = ml_collections.ConfigDict()
    c.template.instruction = "Is the sentiment of this movie review positive or negative?"
    c.template.labels = ("negative", "positive")
    c.template.responses = ()  # empty: answer with the label word
    c.template.system = "You are a helpful assistant."  # shorter than SmolLM2's default system prompt
    c.template.chat = True

    c.poison = ml_collections.ConfigDict()
    c.poison.rate = 0.1  # fraction of the training set (dirty-label: from non-target classes)
    c.poison.count = -1  # an exact number of poisoned examples instead of the rate (-1 = use the rate)
    c.poison.trigger = "cf"  # a word or phrase, tokenized as inside text (after a space)
    c.poison.more_triggers = ()  # further triggers inserted into the same examples
    c.poison.location = "random"  # start | end | middle | random (word boundary) | end_start
    c.poison.target = "positive"
    c.poison.label_mode = "dirty"  # dirty (flip to target) | clean (poison target-class examples only)
    c.poison.overflow = "error"  # a row too long for data.max_seq_len with the trigger: error | truncate (the text)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = r"layers/(attn/(q|k|v|o)|mlp/(gate|up|down))"

    c.train = ml_collections.ConfigDict()
    c.train.mode = "lora"  # lora | full (every parameter, embeddings included; lora.* then unused)
    c.train.epochs = 2
    c.train.batch_size = 8
    c.train.lr = 1e-3
    c.train.warmup_steps = 10
    c.train.schedule = "cosine"
    c.train.weight_decay = 0.0
    c.train.max_grad_norm = 1.0
    c.train.remat = "dots"  # recompute elementwise ops in the backward pass: 19% faster on CPU than "none"
    c.train.grad_accum = 1  # microbatches per optimizer step (batch_size must split evenly)
    c.train.share_prefix = True  # run the template prefix every example shares once per batch, not per row
    c.train.bucket = 8  # row widths are multiples of this many tokens
    c.train.width_compile_cost = 240.0  # one more compiled row width is worth this many row tokens x steps
    c.train.compute_dtype = ""  # "" = c.dtype; "bfloat16" computes in bf16 with float32 LoRA master weights
    # "" = compute_dtype; "bfloat16" rounds only the operands of the weight products (forward and
    # backward) and sums them in float32, activations staying in compute_dtype: faster on CPUs with
    # AVX512-BF16 (benchmarks/finetune_e2e.py --matmul-dtype bfloat16; see README, Results)
    c.train.matmul_dtype = ""
    # attention in training (each row over the shared prefix and itself): "auto" = bdjax's fused CPU
    # kernel where it applies (CPU, one device, float32; compiled on first use), "fused" = insist on
    # it, "xla" = XLA's own ops
    c.train.attention = "auto"
    # where LoRA runs merged into a kernel, also carry its rank-r products in the big GEMMs' extra
    # columns: faster on a Zen 4 CPU, slower on a Zen 5 (see bdjax.models.layers.Opts)
    c.train.lora_side_by_side = False
    c.train.peak_tflops = 0.0  # per-device peak for MFU; 0 = datasheet (bf16 GPU/TPU) or measured here

    # Devices: data / fsdp / tensor axes (-1 = the remaining devices) and logical-axis rules.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = DEFAULT_RULES

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50  # steps between orbax checkpoints in workdir/checkpoints (0 = none); resumed on rerun
    c.checkpoint.keep = 2
    c.checkpoint.asynchronous = True

    c.export = ml_collections.ConfigDict()
    c.export.merged = True  # workdir/final: merged HF safetensors checkpoint
    c.export.adapter = True  # workdir/adapter: PEFT LoRA adapter

    c.eval = ml_collections.ConfigDict()
    c.eval.base = True  # also measure the zero-shot base model
    c.eval.batch_size = 32
    c.eval.seed = 1  # trigger positions in the test set
    c.eval.generate = True  # also report CACC/ASR from greedy generations
    c.eval.generate_examples = 64
    c.eval.max_new_tokens = 3
    # Test-time variants of the trigger and cross-domain transfer (each adds a results row per model).
    c.eval.moved = ()  # locations to move the trigger to, e.g. ("start", "end")
    c.eval.partial = False  # proper subsets of a phrase trigger's words
    c.eval.synonyms = ()  # (("word", ("synonym", ...)), ...) for words of the trigger
    c.eval.domains = ()  # other sources scored with the same template, e.g. ("amazon", "tweets", "nyt")

    # Defenses run on this run's export at the end (the `defend` job; see recipes/defend.py).
    c.defense = ml_collections.ConfigDict()
    c.defense.n_clean = 100  # clean defense examples (10% of data.n_train) the fine-tune did not use
    c.defense.seed = 0
    c.defense.export = False  # write each cleaned checkpoint to workdir/defense/cleaned/<chain>
    c.defense.stream = True  # elementwise-only chains run tensor by tensor over the checkpoint files
    c.defense.measure_backdoored = True
    c.defense.after_training = True  # the backdoor job runs the chains on its export (False: skip)
    c.defense.chains = {  # {} = no defense table
        "mix_retune": ({"name": "fine_mix", "keep": 0.6, "mode": "selected"},
                            {"name": "retune", "mode": "lora", "epochs": 4, "batch_size": 8, "lr": 1e-3, "rank": 8,
                             "alpha": 16.0, "warmup_steps": 0}),
    }
    return c
