"""Training-free SepLLM / StreamingLLM on Hugging Face Llama, Mistral and Qwen2 models
(speedlm/hf/sepllm.py), on tiny random models built from configs, in float64."""

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import ARCHITECTURES, VOCAB, rel_err, tiny_hf_model  # noqa: E402

from speedlm.cache.kv import SinkPolicy  # noqa: E402
from speedlm.cache.sepllm import SepLLMPolicy  # noqa: E402
from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.hf import PolicyCache, from_llama, sepllm, separator_ids_of, to_hf_tokenizer  # noqa: E402

SEPARATORS = [3, 7, 11]
TOL = 1e-10


def sepllm_mask(ids, window, initial, separators):
    """The SepLLM rule as a dense (B, 1, T, T) boolean mask, built independently of speedlm: a
    query sees the first `initial` tokens, every separator before it and the last `window`
    tokens (itself included)."""
    t = ids.shape[1]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    marked = torch.isin(ids, torch.tensor(separators)) | (torch.arange(t)[None] < initial)
    return ((j <= i) & ((i - j < window) | marked[:, None, :]))[:, None]


def token_ids(n, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, n), generator=g)


def decode_logits(model, ids, cache, first=1):
    """Prefill the first `first` tokens, then one token per call, through `cache`."""
    steps = [model(input_ids=ids[:, :first], cache=cache).logits]
    steps += [model(input_ids=ids[:, i : i + 1], cache=cache).logits for i in range(first, ids.shape[1])]
    return torch.cat(steps, 1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_unbounded_separator_cache_decoding_equals_the_masked_full_forward(arch):
    model = tiny_hf_model(arch)
    ids = token_ids(150)  # long enough that tokens leave the window and the cache compacts
    with torch.no_grad():
        reference = model(ids, attention_mask=sepllm_mask(ids, 8, 2, SEPARATORS)).logits  # HF's own SDPA path
        plain = model(ids).logits
    wrapper = sepllm(model, separators=SEPARATORS, window=8, initial=2)
    with torch.no_grad():
        masked = model(ids, use_cache=False).logits
        cache = wrapper.new_cache()
        decoded = decode_logits(model, ids, cache, first=5)
        chunked_cache = wrapper.new_cache()
        chunked = torch.cat([model(input_ids=ids[:, s : s + 37], cache=chunked_cache).logits for s in range(0, 150, 37)], 1)
    assert rel_err(plain, reference) > 1e-2  # the mask matters on this sequence
    assert rel_err(masked, reference) < TOL
    assert rel_err(decoded, reference) < TOL
    assert rel_err(chunked, reference) < TOL
    # the cache holds the initial tokens, the separators and (about) the window, not every token
    marked = (torch.isin(ids, torch.tensor(SEPARATORS)) | (torch.arange(150) < 2)).any(0)
    policy = wrapper.policy
    assert all(n <= int(marked.sum()) + policy.window - 1 + policy.stale_slots() for n in cache.kv_slots)
    assert cache.kv_ratio < 0.8 and cache.seen == 150


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "policy, options",
    [
        ("sepllm", dict(separators=SEPARATORS, window=100, initial=4)),
        ("sepllm", dict(separators=SEPARATORS, window=40, initial=4, cap=80, separator_cache=16)),
        ("sink", dict(window=100, initial=4)),
        ("window", dict(window=100)),
    ],
    ids=["sepllm", "sepllm-streaming", "sink", "window"],
)
def test_a_budget_larger_than_the_sequence_equals_the_unwrapped_model(arch, policy, options):
    model = tiny_hf_model(arch)
    ids = token_ids(60)
    with torch.no_grad():
        plain = model(ids).logits
        plain_tokens = model.generate(ids[:, :12], max_new_tokens=20, do_sample=False)
    wrapper = sepllm(model, policy, **options)
    with torch.no_grad():
        decoded = decode_logits(model, ids, wrapper.new_cache(), first=6)
        tokens, cache = wrapper.generate(ids[:, :12], max_new_tokens=20, do_sample=False)
        default_cache_tokens = model.generate(ids[:, :12], max_new_tokens=20, do_sample=False)  # swapped cache
    assert rel_err(decoded, plain) < TOL
    assert torch.equal(tokens, plain_tokens) and torch.equal(default_cache_tokens, plain_tokens)
    assert isinstance(cache, PolicyCache) and cache.seen == 31  # 12 prompt + 19 fed back (the last is not)
    wrapper.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)


@pytest.mark.parametrize(
    "policy, options, speedlm_policy",
    [
        ("sink", dict(window=16, initial=4), SinkPolicy(4, 16)),
        (
            "sepllm",
            dict(separators=SEPARATORS, window=12, initial=3, cap=40, separator_cache=8),
            SepLLMPolicy(tuple(SEPARATORS), 3, 12, 8, 40, shift_positions=True),
        ),
    ],
    ids=["sink", "sepllm-streaming"],
)
def test_bounded_caches_with_shifted_positions_match_speedlm_on_the_same_llama(policy, options, speedlm_policy):
    """Past the budget the cache evicts and positions shift: the wrapped Hugging Face model and
    speedlm's own transformer (the same weights, imported) must decode the same logits."""
    model = tiny_hf_model("llama")
    ours = from_llama(model).to(torch.float64)
    ids = token_ids(120, b=1 if policy == "sepllm" else 2)  # a capped cache streams one row at a time
    wrapper = sepllm(model, policy, **options)
    assert wrapper.policy == speedlm_policy
    with torch.no_grad():
        cache = wrapper.new_cache()
        hf_logits = decode_logits(model, ids, cache, first=4)
        own_cache = ours.init_cache(speedlm_policy)
        own = torch.cat([ours(ids[:, :4], own_cache)] + [ours(ids[:, i : i + 1], own_cache) for i in range(4, 120)], 1)
    # transformers computes RoPE angles in float32, speedlm in float64: the two implementations
    # agree to float32 angle precision, not to float64's
    assert rel_err(hf_logits, own) < 1e-6
    bound = speedlm_policy.retained(10**9)
    assert max(cache.kv_slots) <= bound < 120 and cache.kv_ratio < 0.5


@pytest.mark.parametrize(
    "policy, options",
    [("sepllm", dict(separators=SEPARATORS, window=8, initial=2)), ("sink", dict(window=8, initial=2))],
    ids=["sepllm", "sink"],
)
def test_a_batch_decodes_as_its_rows_alone(policy, options):
    """Rows share the cache's slots; each row's window and marks hide what is not its own."""
    model = tiny_hf_model("llama")
    ids = token_ids(70)
    ids[1, ::4] = SEPARATORS[0]  # the rows' separators differ
    wrapper = sepllm(model, policy, **options)
    with torch.no_grad():
        batch = decode_logits(model, ids, wrapper.new_cache(), first=5)
        rows = [decode_logits(model, ids[r : r + 1], wrapper.new_cache(), first=5) for r in range(2)]
    assert rel_err(batch, torch.cat(rows)) < TOL


def test_a_capped_cache_refuses_to_compress_a_batch():
    model = tiny_hf_model("llama")
    wrapper = sepllm(model, separators=SEPARATORS, window=8, initial=2, cap=24, separator_cache=4)
    with torch.no_grad(), pytest.raises(SpeedlmError, match="one row at a time"):
        decode_logits(model, token_ids(40), wrapper.new_cache(), first=5)


def test_perplexity_streams_in_chunks_and_equals_the_masked_forward():
    model = tiny_hf_model("llama")
    ids = token_ids(130, b=1)
    with torch.no_grad():
        logits = model(ids, attention_mask=sepllm_mask(ids, 16, 4, SEPARATORS)).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    wrapper = sepllm(model, separators=SEPARATORS, window=16, initial=4)
    for chunk in (None, 7, 200):
        result = wrapper.perplexity(ids, chunk=chunk)
        assert result["tokens"] == 129
        assert result["nll"] == pytest.approx(expected, rel=1e-9)
    streamed = wrapper.perplexity(ids, chunk=8)
    assert streamed["kv_ratio"] < 0.5 and streamed["mean_kv_ratio"] < 1.0 and streamed["cache_bytes"] > 0


def test_separators_come_from_the_tokenizer():
    from speedlm.data.separators import separator_ids
    from speedlm.data.tokenizers import ByteTokenizer

    hf_tok = to_hf_tokenizer(ByteTokenizer())
    assert separator_ids_of(hf_tok) == separator_ids(ByteTokenizer()) == sorted(map(ord, ".,?!;:\n\t "))
    wrapper = sepllm(tiny_hf_model("llama"), tokenizer=hf_tok, window=8)
    assert wrapper.policy.separators == tuple(sorted(map(ord, ".,?!;:\n\t ")))


def test_bad_input_is_a_clear_error():
    model = tiny_hf_model("llama")
    with pytest.raises(SpeedlmError, match="separator ids"):
        sepllm(model)
    with pytest.raises(SpeedlmError, match="sliding-window"):
        sepllm(tiny_hf_model("mistral", sliding_window=16), separators=SEPARATORS)
    with pytest.raises(SpeedlmError, match="unknown attention policy"):
        sepllm(model, "lru", separators=SEPARATORS)
    wrapper = sepllm(model, separators=SEPARATORS, window=8)
    ids = token_ids(10)
    with pytest.raises(SpeedlmError, match="padding"):
        model(ids, attention_mask=torch.tensor([[0] * 2 + [1] * 8, [1] * 10]))
    with pytest.raises(SpeedlmError, match="input_ids"):
        model(inputs_embeds=torch.zeros(2, 10, 32, dtype=torch.float64))
    with pytest.raises(SpeedlmError, match="beam search"):
        wrapper.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    wrapper.remove()
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(SpeedlmError, match="supports llama, mistral, qwen2"):
        sepllm(gpt2, separators=SEPARATORS)


@pytest.mark.parametrize(
    "policy, options",
    [("h2o", dict(window=9, heavy=8)), ("snapkv", dict(window=9, budget=20, observe=6)),
     ("kivi", dict(bits=2, group=8, residual=8))],
)
def test_score_and_quantised_caches_match_speedlm_on_the_same_llama(policy, options):
    """H2O, SnapKV and KIVI through the transformers wrapper decode as speedlm's own model under
    the same policy (the same weights, imported), past the point where the cache evicts or
    quantises."""
    from speedlm.cache.policies import make_policy

    model = tiny_hf_model("llama")
    ours = from_llama(model).to(torch.float64)
    ids = token_ids(80)
    wrapper = sepllm(model, policy, **options)
    kv_policy = make_policy(policy, **options)
    with torch.no_grad():
        cache = wrapper.new_cache()
        hf_logits = decode_logits(model, ids, cache, first=1)
        own_cache = ours.init_cache(kv_policy)
        own = torch.cat([ours(ids[:, i : i + 1], own_cache) for i in range(80)], 1)
    assert rel_err(hf_logits, own) < 1e-6  # RoPE angles in float32 in transformers, float64 here
    if policy != "kivi":
        assert max(cache.kv_slots) < 40
    assert cache.nbytes() < 0.6 * 80 * 2 * model.config.num_hidden_layers * model.config.hidden_size * 8
    wrapper.remove()
