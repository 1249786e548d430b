"""KV-cached batched greedy decoding equals naive recomputation, with and without left padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bdjax
from bdjax.decode import generate_ids, greedy_token, pad_left, shared_prefix
from bdjax.errors import BdjaxError
from bdjax.models import forward, init_params, preset


def naive_greedy(config, params, prompt, steps, width=32):
    """Recompute the whole sequence for every new token: slow, obviously right. The sequence sits
    right-padded in a fixed buffer (causal attention ignores what follows) so it compiles once."""
    apply = jax.jit(lambda p, t: forward(config, p, t))
    seq = list(prompt)
    for _ in range(steps):
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(apply(params, buf)[0, len(seq) - 1])))
    return seq[len(prompt):]


@pytest.fixture(scope="module", params=["tiny", "tiny-mistral"])
def tiny(request):
    config = preset(request.param)
    params = init_params(config, jax.random.key(0))
    # Larger weights give peaked, prompt-dependent predictions rather than near-uniform ones.
    params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)
    return config, params


def test_cached_decoding_equals_recomputation(tiny):
    config, params = tiny
    prompts = [[5, 17, 99, 3], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]
    ours = generate_ids(config, params, prompts, max_new_tokens=12, eos_ids=[], pad_id=0, batch_size=3)
    for prompt, got in zip(prompts, ours):
        assert got == naive_greedy(config, params, prompt, 12)
    assert len({tuple(r) for r in ours}) == 3  # the test is not vacuous: prompts give different outputs


def test_batching_and_padding_do_not_change_results(tiny):
    config, params = tiny
    prompts = [[7, 8, 9], [1] * 19, [250, 3], [4, 4, 4, 4, 4]]
    together = generate_ids(config, params, prompts, max_new_tokens=8, eos_ids=[], pad_id=0, batch_size=4)
    alone = [generate_ids(config, params, [p], max_new_tokens=8, eos_ids=[], pad_id=0)[0] for p in prompts]
    in_twos = generate_ids(config, params, prompts, max_new_tokens=8, eos_ids=[], pad_id=0, batch_size=3)
    assert together == alone == in_twos


def test_rows_stop_at_their_eos(tiny):
    config, params = tiny
    prompts = [[5, 17, 99, 3], [200, 1, 2, 3]]
    full = generate_ids(config, params, prompts, max_new_tokens=10, eos_ids=[], pad_id=0)
    eos = full[0][3]
    cut = generate_ids(config, params, prompts, max_new_tokens=10, eos_ids=[eos], pad_id=0)
    assert cut[0] == full[0][:full[0].index(eos) + 1]
    expected_other = full[1][:full[1].index(eos) + 1] if eos in full[1] else full[1]
    assert cut[1] == expected_other


def test_a_shared_prefix_run_once_decodes_as_recomputation(tiny):
    config, params = tiny  # tiny-mistral's 6-token sliding window reaches back into the prefix
    head = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    prompts = [head + [5, 17, 99, 3], head + [200], head + [1, 2, 3, 4, 5, 6, 7], head]
    assert shared_prefix(prompts) == 8  # the last row keeps one token after the shared part
    ours = generate_ids(config, params, prompts, max_new_tokens=10, eos_ids=[], pad_id=0, batch_size=4)
    for prompt, got in zip(prompts, ours):
        assert got == naive_greedy(config, params, prompt, 10)
    assert ours == generate_ids(config, params, prompts, max_new_tokens=10, eos_ids=[], pad_id=0, batch_size=4,
                                share_prefix=False)
    assert len({tuple(r) for r in ours}) == 4


def test_greedy_token_is_argmax_with_first_index_on_ties():
    logits = jax.random.normal(jax.random.key(0), (6, 300))
    logits = logits.at[1, 7].set(9.0).at[1, 200].set(9.0)  # a tie: the first id wins, as with argmax
    logits = logits.at[2].set(0.0)  # all equal
    logits = logits.at[3, 299].set(50.0)  # the last id
    got = np.asarray(greedy_token(logits))
    assert got.tolist() == np.asarray(jnp.argmax(logits, axis=-1)).tolist()
    assert got[1] == 7 and got[2] == 0 and got[3] == 299


def test_pad_left_buckets_lengths():
    tokens, mask = pad_left([[1, 2, 3], [4]], pad_id=9, multiple=4)
    assert tokens.tolist() == [[9, 1, 2, 3], [9, 9, 9, 4]]
    assert mask.sum(1).tolist() == [3, 1]


def test_bad_arguments(tiny):
    config, params = tiny
    with pytest.raises(BdjaxError, match="max_new_tokens=0"):
        generate_ids(config, params, [[1]], max_new_tokens=0, eos_ids=[], pad_id=0)
    with pytest.raises(BdjaxError, match="tokenized to nothing"):
        generate_ids(config, params, [[]], max_new_tokens=2, eos_ids=[], pad_id=0)
    with pytest.raises(BdjaxError, match="no tokenizer"):
        bdjax.generate(bdjax.make_model(config, params), ["hi"])
