"""decoding.py: the rules every path shares (the repetition penalty, the stops) and FastDecoder against
transformers' generate, on the CPU; its GPU-only checks are marked gpu."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import decoding
from answers import Reply
from config import GenerationSettings
from data_utils import HUMAN
from decoding import CHECK_EVERY, FastDecoder
from doubles import ARGMAX, GREEDY, PENALIZED, limited, scripted, tied
from inference import ChatModel
from phi_layers import DecodeCache
from conftest import TINY


def test_fast_path_decodes_the_plain_paths_tokens(chat_model):
    """The compiled static-cache loop (CUDA default, its layers fused) against transformers' generate on the
    unfused model: same greedy tokens, batched with left padding, same stops, and the same sampled tokens from the
    same seed."""
    fast = ChatModel(copy.deepcopy(chat_model.model), chat_model.tokenizer, fast=True)
    assert fast._decoder.fused
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, len(chat_model.tokenizer), (n,), generator=rng).tolist() for n in (5, 17, 30)]
    assert fast.generate_ids(prompts, GREEDY, ignore_eos=True) == chat_model.generate_ids(prompts, GREEDY,
                                                                                          ignore_eos=True)
    for prompt in prompts[:2]:  # one row, no penalty: the token picked inside the compiled step
        assert fast.generate_ids([prompt], ARGMAX, ignore_eos=True) == chat_model.generate_ids([prompt], ARGMAX,
                                                                                              ignore_eos=True)
    assert fast._decoder._loops  # that path ran
    strong = dataclasses.replace(ARGMAX, repetition_penalty=1.8)
    for prompt in prompts[:2]:  # one row with a repetition penalty: applied inside the compiled step too
        penalized = fast.generate_ids([prompt], strong, ignore_eos=True)
        assert penalized == chat_model.generate_ids([prompt], strong, ignore_eos=True)
        assert penalized != fast.generate_ids([prompt], ARGMAX, ignore_eos=True)  # the penalty changed the answer
        assert fast.generate_ids([prompt], strong, ignore_eos=True) == penalized  # the next call starts afresh
    assert any(loop.seen.any() for loop in fast._decoder._loops.values())  # inside the step
    ids, fast_logits = fast.generate_with_logits(prompts[:1], limited(GREEDY, 20))
    plain_ids, plain_logits = chat_model.generate_with_logits(prompts[:1], limited(GREEDY, 20))
    assert ids == plain_ids and (fast_logits - plain_logits).abs().max() < 1e-4
    questions = ["What is the capital of Peru?", "What is 2 plus 2?", "Hello!"]
    convs = [[{"role": "user", "content": q}] for q in questions]
    assert [fast.chat(c, GREEDY) for c in convs] == [chat_model.chat(c, GREEDY) for c in convs]
    assert [r.text for r in fast.chat_batch(convs, GREEDY)] == [chat_model.chat(c, GREEDY).text for c in convs]
    sampled = GenerationSettings(max_new_tokens=40, temperature=0.9)
    torch.manual_seed(1)
    a = fast.generate_ids(prompts[1:2], sampled, ignore_eos=True)
    torch.manual_seed(1)
    assert a == chat_model.generate_ids(prompts[1:2], sampled, ignore_eos=True)
    # The answer (" " + 8 tokens) comes as the prefill's token and BURST_STEPS steps (the short chunk after a pass
    # that leaves rows free), then one chunk of CHECK_EVERY; longer answers stream chunk by chunk
    # (test_cancel_stops_the_generation_...).
    assert list(fast.stream(convs[0], GREEDY)) == ["The capital", "The capital of Peru is Lima."]


@pytest.mark.parametrize("vocab", [51200, 822])  # Phi-2's, and the tiny model's (not a multiple of the chunks)
def test_the_greedy_steps_argmax_picks_argmaxs_token_even_among_ties(vocab):
    """The compiled greedy step finds the maximum in chunks (decoding.chunked_argmax): its token must be argmax's,
    the first index of the maximum, also where many logits tie, eager and compiled."""
    gen = torch.Generator().manual_seed(0)
    compiled = torch.compile(decoding.chunked_argmax)
    for _ in range(20):
        tied = torch.randint(-3, 4, (3, vocab), generator=gen).float()  # every value ~vocab / 7 times
        assert torch.equal(decoding.chunked_argmax(tied), tied.argmax(-1))
        assert torch.equal(compiled(tied), tied.argmax(-1))
    spread = torch.randn(2, vocab, generator=gen).bfloat16()
    assert torch.equal(compiled(spread), spread.argmax(-1))


@pytest.mark.parametrize("vocab", [51200, 822])
def test_sampling_settings_of_many_rows_warp_as_generates_warpers_row_by_row(vocab):
    """BatchDecoder warps every sampled row's scores together (decoding.warp), each row with its own temperature,
    top-k and top-p: each row's scores must be what generate()'s warpers give that row alone (the same tokens drawn
    from the same seed), with every warper off, on, or cutting all but one token."""
    settings = [(1.0, 0, 1.0), (0.7, 50, 0.9), (1.3, 0, 0.5), (0.5, 5, 1.0), (2.0, vocab + 7, 0.01), (0.9, 1, 0.9),
                (1e-3, 40, 0.95)]
    gens = [GenerationSettings(temperature=t, top_k=k, top_p=p, repetition_penalty=1.0) for t, k, p in settings]
    scores = torch.randn(len(gens), vocab, generator=torch.Generator().manual_seed(0)) * 4
    got = decoding.warp(scores, decoding.RowSampling.of(gens, vocab, torch.device("cpu")))
    for row, gen in enumerate(gens):  # generate()'s processors for this row's settings, as the engine had them
        procs = decoding.logits_processors(gen, True, [], torch.device("cpu"), 0, 0)
        assert torch.equal(got[row:row + 1], procs(torch.zeros(1, 0, dtype=torch.long), scores[row:row + 1])), gen
    kept = torch.isfinite(got).sum(-1).tolist()
    assert kept[0] == vocab and kept[3] == 5 and kept[5] == 1 and all(1 <= n < vocab for n in kept[1:])


def test_rows_drawn_together_draw_what_multinomial_draws_row_by_row():
    """decoding.draw, each row from its own generator, gives the tokens torch.multinomial gives each row alone from
    the same seed (what the engine drew before, and what an answer draws alone), uniform rows and one-token rows
    among them."""
    probs = torch.softmax(torch.randn(6, 51200, generator=torch.Generator().manual_seed(0)) * 3, -1)
    probs[3] = 1.0  # (the engine's stand-in for a row whose scores were not finite)
    probs[4] = torch.nn.functional.one_hot(torch.tensor(7), 51200).float()
    for seed in range(5):
        generators = [torch.Generator().manual_seed(seed * 10 + row) for row in range(6)]
        alone = [torch.multinomial(probs[row:row + 1], 1, generator=torch.Generator().manual_seed(seed * 10 + row))
                 for row in range(6)]
        assert decoding.draw(probs, generators).tolist() == [int(t) for t in alone]
    assert decoding.draw(probs, generators)[4] == 7


def test_a_row_whose_scores_are_not_finite_is_flagged_and_the_others_draw_as_alone():
    """decoding.sample_rows, the engine's draw for its sampled rows: a row with a NaN among its scores is flagged
    (the host fails that answer alone) and still gets a token in range, without an assert on the device; every
    other row draws what it draws alone, warped with its settings and from its generator."""
    gens = [GenerationSettings(temperature=t, top_k=k, top_p=p) for t, k, p in [(0.7, 50, 0.9), (1.0, 0, 1.0),
                                                                              (1.3, 5, 0.5)]]
    scores = torch.randn(3, 822, generator=torch.Generator().manual_seed(1)) * 3
    scores[1, 17] = float("nan")
    settings = decoding.RowSampling.of(gens, 822, torch.device("cpu"))
    token, fine = decoding.sample_rows(scores, settings, [torch.Generator().manual_seed(row) for row in range(3)])
    assert fine.tolist() == [True, False, True] and 0 <= int(token[1]) < 822
    for row in (0, 2):
        one = decoding.RowSampling.of(gens[row:row + 1], 822, torch.device("cpu"))
        alone, _ = decoding.sample_rows(scores[row:row + 1], one, [torch.Generator().manual_seed(row)])
        assert token[row] == alone[0]


def test_one_row_prompts_prefilled_padded_to_their_bucket_keep_their_answers(chat_model):
    """On a GPU a one-row prompt prefills through a CUDA graph made once for all prompts up to its bucket's length,
    padded on the right (decoding._PrefillGraph). The padded prefill, eager on the CPU, must leave every answer as
    generate() gives it: prompts sharing a bucket and in the next one, with and without the repetition penalty, and
    the first logits."""
    fast = ChatModel(copy.deepcopy(chat_model.model), chat_model.tokenizer, fast=True)
    fast._decoder.prefill_graphs = True
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, len(chat_model.tokenizer), (n,), generator=rng).tolist() for n in (3, 64, 65)]
    strong = dataclasses.replace(ARGMAX, repetition_penalty=1.8)
    for prompt in prompts:
        for gen in (ARGMAX, strong):
            assert fast.generate_ids([prompt], gen, ignore_eos=True) == chat_model.generate_ids([prompt], gen,
                                                                                              ignore_eos=True)
    ids, fast_logits = fast.generate_with_logits(prompts[:1], limited(GREEDY, 20))
    plain_ids, plain_logits = chat_model.generate_with_logits(prompts[:1], limited(GREEDY, 20))
    assert ids == plain_ids and (fast_logits - plain_logits).abs().max() < 1e-4
    assert sorted(bucket for bucket, _ in fast._decoder._prefills) == [64, 128]  # both buckets prefilled padded


def test_a_growing_chat_meets_few_compiled_cache_sizes(chat_model):
    """Each static cache size costs a compile (~35 s for Phi-2 on a GPU): a chat growing to Phi-2's 2048-token window
    meets at most 3, and every size holds its prompt + answer."""
    decoder = FastDecoder(copy.deepcopy(chat_model.model), chat_model.tokenizer, 2048, HUMAN)
    sizes = {n: decoder.cache_size(1, n) for n in range(1, 2049)}
    assert set(sizes.values()) == {512, 1024, 2048} and all(size >= n for n, size in sizes.items())
    assert decoder.cache_size(32, 300) == 384  # batches: 128-token steps, less attention over empty cache


def test_fast_batches_share_one_compiled_shape(chat_model):
    """evaluate.py's batches on the fast path: one (batch, cache) shape for the whole call — one compile on a GPU,
    not one per batch — and the same answers as the plain path, each row attending over its own (left-padded)
    slots."""
    fast = ChatModel(copy.deepcopy(chat_model.model), chat_model.tokenizer, fast=True)
    questions = ["Hi", "What is 2 plus 2?", "What is the capital of Peru?", "Tell me, please: what is 3 plus 4?",
                 "What is the capital of France? I would really like to know it, if you can tell me."]
    convs = [[{"role": "user", "content": q}] for q in questions]
    replies = fast.chat_batch(convs, GREEDY, batch_size=2)
    assert len(fast._decoder._caches) == 1
    # every row attends over its own slots, as batch 1 does (decode_attention; on a GPU the split kernel)
    assert isinstance(next(iter(fast._decoder._caches.values())), DecodeCache)
    assert replies == chat_model.chat_batch(convs, GREEDY, batch_size=2)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_loop_does_not_wait_for_the_gpu_per_token(tokenizer, batch):
    """The fast path's host syncs (prefill, streaming setup) do not grow with the answer: a per-token sync would
    leave the GPU idle between steps. New tokens come back through CUDA events, which sync-debug mode does not
    count. (A processor that copied its ids from the host each step was such a sync; so was a copy of a batch's
    tokens into a strided host buffer, once per chunk.)"""
    fast = ChatModel(AutoModelForCausalLM.from_pretrained(TINY).cuda(), tokenizer, fast=True)
    prompt = [list(range(5, 25 + b)) for b in range(batch)]
    for new_tokens in (32, 128):  # compile, capture the graph, meet the one-off costs of a first call
        for gen in (GREEDY, GenerationSettings(max_new_tokens=40, temperature=0.8)):
            fast.generate_ids(prompt, limited(gen, new_tokens), ignore_eos=True)

    def syncs(gen: GenerationSettings, new_tokens: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fast.generate_ids(prompt, limited(gen, new_tokens), ignore_eos=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    for gen in (GREEDY, GenerationSettings(max_new_tokens=40, temperature=0.8)):
        # > 0: the prefill's syncs are seen, so counting works. Runs on an H200 differed by one sync either way
        # (a one-off); one per chunk would add 12 here, one per token 96.
        assert 0 < syncs(gen, 128) <= syncs(gen, 32) + 1


def test_prefill_never_takes_cudnn_attention_on_cuda():
    """cuDNN's attention, PyTorch's first choice on an H100/H200, builds a plan for every new (rows, length) shape:
    a prefill of a new shape took 55-66 ms there instead of 15-20, and every user who joins a batch brings one. The
    decoders prefill inside prefill_attention: on CUDA the memory-efficient kernel first, cuDNN's never; the
    setting is back as it was afterwards, and the CPU's choice is left alone."""
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order())
    with decoding.prefill_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        order = torch._C._get_sdp_priority_order()
        assert order.index(int(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION)) < \
            order.index(int(torch.nn.attention.SDPBackend.FLASH_ATTENTION))
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order()) == before
    with decoding.prefill_attention(torch.device("cpu")):
        assert (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order()) == before


@pytest.mark.gpu
def test_prefills_of_new_shapes_run_no_cudnn_attention_on_gpu(tokenizer):
    """What the user waited for: on an H200 the first prefill of each new (rows, length) shape spent ~45 ms building
    a cuDNN attention plan (docs/PERFORMANCE.md). Prompts of new lengths, alone (FastDecoder) and joining others
    (BatchDecoder), bf16: no cuDNN attention kernel runs, the memory-efficient one does. (Where PyTorch would not
    pick cuDNN for the tiny model anyway, the second check still says which kernel the prefills ran.) The kernels
    the GPU ran are checked, not the ops: the profiler records no ops of ChatModel's generation thread."""
    from torch.profiler import ProfilerActivity, profile
    chat = ChatModel(AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.bfloat16).cuda(), tokenizer, fast=True)
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, len(tokenizer), (n,), generator=rng).tolist() for n in (23, 37, 41)]
    chat.generate_ids(prompts[:1], limited(ARGMAX, 4), ignore_eos=True)  # compiled outside the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        chat.generate_ids(prompts[1:2], limited(ARGMAX, 4), ignore_eos=True)
        answers = [chat.start(ids, dataclasses.replace(ARGMAX, max_new_tokens=4)) for ids in prompts]
        for answer in answers:
            list(answer)
    kernels = {event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA}
    assert not any("cudnn" in name for name in kernels), sorted(kernels)
    assert any("fmha_cutlass" in name for name in kernels), sorted(kernels)  # PyTorch's memory-efficient kernel


@pytest.mark.gpu
def test_two_fast_models_in_one_process(tokenizer):
    """evaluate.py holds the base and the fine-tuned model on the fast path at once: CUDA graphs work only in the
    thread that set them up, so both must generate (a second model on its own thread failed in its first step)."""
    models = [ChatModel(AutoModelForCausalLM.from_pretrained(TINY).cuda(), tokenizer, fast=True) for _ in range(2)]
    prompt = [list(range(5, 25))]
    first, second = (m.generate_ids(prompt, limited(GREEDY, 16), ignore_eos=True) for m in models)
    assert len(first[0]) == 16 and second == first  # same weights, same tokens


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_repetition_penalty_never_stops_the_model_from_stopping(tokenizer, fast):
    """EOS closes every earlier answer of a multi-turn prompt and pads the short rows of a batch: penalizing it
    there kept the model from stopping, by an amount that depended on the batch."""
    eos = tokenizer.eos_token_id
    chat = tied(tokenizer, top=eos, runner_up=tokenizer.convert_tokens_to_ids("a"), fast=fast)
    multi_turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "How are you?"}]
    assert chat.chat(multi_turn, PENALIZED) == Reply(text="", new_tokens=1, stop="eos")
    convs = [[{"role": "user", "content": q}] for q in ("Hi", "What is the capital of France? Please tell me.")]
    batched = chat.chat_batch(convs, PENALIZED, batch_size=2)
    assert batched == [chat.chat(c, PENALIZED) for c in convs] == [Reply("", 1, "eos")] * 2


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_repetition_penalty_still_counts_the_answers_own_tokens(tokenizer, fast):
    a, b = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "b"))
    chat = tied(tokenizer, top=a, runner_up=b, fast=fast)
    ids = chat.prompt_ids([{"role": "user", "content": "a a a a"}], 6)[0]  # the prompt's "a"s do not count
    assert chat.generate_ids([ids], limited(PENALIZED, 3))[0][:2] == [a, b]
    no_penalty = dataclasses.replace(PENALIZED, repetition_penalty=1.0)
    assert chat.generate_ids([ids], limited(no_penalty, 3))[0][:2] == [a, a]


def test_both_paths_cut_at_whichever_comes_first_eos_or_the_marker(tokenizer):
    """Within one fast-path chunk, the marker before an EOS ends the answer at the marker, as generate() does."""
    replies = []
    for fast in (False, True):
        chat, messages = scripted(tokenizer, " Hi ### Human:", tail=[tokenizer.eos_token_id] * 20, fast=fast)
        assert len(chat.prompt_ids(messages, 64)[0]) and len(tokenizer(" Hi ### Human:")["input_ids"]) < CHECK_EVERY
        replies.append(chat.chat(messages, GenerationSettings(max_new_tokens=30, temperature=0.0)))
    assert replies[0] == replies[1] and replies[0].stop == "marker" and replies[0].text == "Hi"
