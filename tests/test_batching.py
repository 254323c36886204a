"""batching.py: BatchDecoder decodes every user's answer together, each exactly as alone (fp32, CPU), and holds under
careless and hostile use: one answer's bad values or bad scores fail only that answer, the queue is bounded, a waiting
request is not held behind one that cannot join yet, a client that leaves frees its place, and shutdown ends every
answer with an error instead of leaving a client hanging."""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, PhiForCausalLM

import decoding
from answer_queue import Busy, ShuttingDown
from config import GenerationSettings
from conftest import TINY
from doubles import GREEDY, PENALIZED, TOGETHER, ScriptedPhi, endless, finish, start_all, tied
from inference import ChatModel
from phi_layers import DecodeCache, kv_bytes_per_token, triton_supported

@pytest.mark.gpu
def test_joining_prompts_prefill_through_graphs_captured_at_load_on_gpu(tokenizer):
    """BatchDecoder on a GPU, fp32: the warm-up captures the prefill graph of every bucket; users who arrive one by
    one are prefilled by them, no graph is captured while serving, and each greedy answer (alone or joining) is the
    one it gets alone on the plain path."""
    if not triton_supported(torch.device("cuda"), torch.float32):
        pytest.skip("needs Triton and compute capability 8.0 or later")
    plain = ChatModel(AutoModelForCausalLM.from_pretrained(TINY).cuda(), tokenizer, fast=False)
    fast = ChatModel(AutoModelForCausalLM.from_pretrained(TINY).cuda(), tokenizer, fast=True)
    batcher = fast.batcher
    assert batcher.prefill_graphs
    fast.warm_up(GREEDY)
    graphs = dict(batcher.prefills.graphs)
    assert sorted(graphs) == list(decoding.PREFILL_BUCKETS) and all(g.graph for g in graphs.values())
    expected = [plain.chat(c, GREEDY) for c in TOGETHER]
    batcher.record.clear()
    answers = []
    for conversation in TOGETHER:  # each joins the answers before it, alone
        answers.append(fast.start(fast.prompt_ids(conversation, GREEDY.max_new_tokens)[0], GREEDY))
        next(iter(answers[-1]))
    replies = finish(answers)
    assert [(r.text, r.new_tokens) for r in replies] == [(r.text, r.new_tokens) for r in expected]
    assert batcher.record["graph_prefills"] == len(TOGETHER) and batcher.prefills.graphs == graphs


@pytest.mark.gpu
def test_on_a_gpu_the_engine_waits_for_the_gpu_only_at_a_chunks_or_a_passs_end(tokenizer):
    """The engine's host waits for the GPU at a decode chunk's end and at a prefill pass's end, nowhere else:
    anywhere else the GPU idles while the host catches up (a number written through an index tensor, seen[rows] =
    False, is first copied from pageable memory, which waits for everything queued: ~20 ms of each prefill pass on an
    H100, docs/PERFORMANCE.md). With torch's sync debug mode at "error", which fails every other wait, 18 users on 8
    rows (rows freed and taken again), greedy, penalized and sampled, one of them leaving, get the answers they get
    with it off."""
    if not triton_supported(torch.device("cuda"), torch.float32):
        pytest.skip("needs Triton and compute capability 8.0 or later")
    chat = ChatModel(AutoModelForCausalLM.from_pretrained(TINY).cuda(), tokenizer, fast=True, batch_slots=8)
    assert chat.batcher.pool is not None
    chat.warm_up(GREEDY)  # (capturing graphs waits for the GPU: at load, not while serving)
    sampled = GenerationSettings(max_new_tokens=30, temperature=1.0, top_p=0.9, repetition_penalty=1.3)
    work = [(c, g) for g in (GREEDY, PENALIZED, sampled) for c in TOGETHER]

    def serve() -> list[tuple[str, str]]:
        answers = [chat.start(chat.prompt_ids(c, g.max_new_tokens)[0], g, seed=i) for i, (c, g) in enumerate(work)]
        answers[-1].cancel()
        return [(r.text, r.stop) for r in finish(answers)]

    expected = serve()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = serve()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got == expected and got[-1] == ("", "cancelled")  # (a wait elsewhere fails the answers with its error)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_answers_decoded_together_are_the_answers_alone(chat_model, monkeypatch, fast):
    """Six users at once (the last with a longer, multi-turn prompt that joins later): each greedy answer is the one
    it gets alone and the one generate() gives, exactly (fp32); and they were decoded together, in far fewer model
    steps than tokens. fast: the compiled step with fused layers, every row attending over its own cache slots
    (phi_layers.decode_attention), in the batch shape and in the one-row shape (one answer running)."""
    if fast:
        chat_model = ChatModel(copy.deepcopy(chat_model.model), chat_model.tokenizer, fast=True)
        assert chat_model.batcher.fused
    gen = GenerationSettings(max_new_tokens=40, temperature=0.0)
    steps = [0]
    step = chat_model.batcher.step
    monkeypatch.setattr(chat_model.batcher, "step",
                        lambda *a, **k: steps.__setitem__(0, steps[0] + 1) or step(*a, **k))
    alone = [chat_model.chat(c, gen) for c in TOGETHER]
    steps_alone, steps[0] = steps[0], 0
    plain = chat_model.chat_batch(TOGETHER, gen, batch_size=1)  # transformers' generate, one at a time
    assert [r.text for r in alone] == [r.text for r in plain] and all(r.text for r in alone)
    first = start_all(chat_model, TOGETHER[:3], gen)
    next(iter(first[0]))  # the first answer is being written when the others arrive
    replies = finish(first + start_all(chat_model, TOGETHER[3:], gen))
    assert [(r.text, r.stop, r.new_tokens) for r in replies] == [(r.text, r.stop, r.new_tokens) for r in alone]
    # the fast path sees tokens a chunk (8 steps) later, by when short answers have ended: fewer rows overlap
    assert chat_model.batcher.most_rows >= (3 if fast else 4)
    if fast:
        shapes = {key.split(" x ")[0] for key in chat_model.batcher.record if key.startswith("steps at")}
        assert shapes == {"steps at 1 rows", "steps at 8 rows"}, chat_model.batcher.record
        assert all(isinstance(cache, DecodeCache) for cache in chat_model.batcher.kv.caches.values())
    assert steps[0] < 0.5 * steps_alone


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_penalized_answers_decoded_together_are_generates_answers(tokenizer, fast):
    """Greedy answers decoded together, with and without a repetition penalty (applied to all rows at once): each is
    the answer generate() gives alone with AnswerRepetitionPenalty (on TiedPhi: "a b a a ..." with 1.1, "a a a ..."
    without)."""
    a, b = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "b"))
    penalized = dataclasses.replace(PENALIZED, max_new_tokens=24)
    settings = [penalized, dataclasses.replace(penalized, repetition_penalty=1.0), penalized]
    plain = tied(tokenizer, top=a, runner_up=b, fast=False)
    expected = [plain.chat_batch([c], g, batch_size=1)[0] for c, g in zip(TOGETHER, settings)]  # generate(), alone
    assert expected[0].text != expected[1].text  # the penalty changes the answer
    chat = tied(tokenizer, top=a, runner_up=b, fast=fast)
    answers = [chat.start(chat.prompt_ids(c, g.max_new_tokens)[0], g) for c, g in zip(TOGETHER, settings)]
    assert finish(answers) == expected
    assert chat.batcher.most_rows >= 2


def test_an_answer_left_alone_late_in_the_cache_goes_on(chat_model, monkeypatch):
    """A short question joins a long conversation's answer, so its slots start late in the shared cache (~570); the
    long one ends, and the short one goes on alone in the one-row shape, whose cache is sized for what that answer
    needs: its greedy answer is the one it gets alone. (The one-row cache kept the late slots and was sized without
    them: the copy into it failed and the client got an error.) Steps are slowed so that the answers overlap."""
    model = copy.deepcopy(chat_model.model)
    model.config.max_position_embeddings = 2048  # Phi-2's window (the tiny model's 512 holds no such history)
    chat = ChatModel(model, chat_model.tokenizer, fast=False)
    history = city_history(22) + [{"role": "user", "content": "What is the capital of France?"}]
    short = [{"role": "user", "content": "What is the capital of Peru?"}]
    gen = GenerationSettings(max_new_tokens=40, temperature=0.0)
    alone = chat.chat(short, gen)
    ids = chat.prompt_ids(history, 40)[0]
    assert 500 < len(ids) < 1000 and alone.new_tokens > 6
    step = chat.batcher.step
    monkeypatch.setattr(chat.batcher, "step", lambda *a, **k: time.sleep(0.05) or step(*a, **k))
    first = chat.start(ids, gen)  # a 3-token answer ("2."): over before the short one's
    second = chat.start(chat.prompt_ids(short, 40)[0], gen)
    replies = finish([first, second])
    assert chat.batcher.most_rows == 2 and replies[0].new_tokens < alone.new_tokens
    assert (replies[1].text, replies[1].new_tokens) == (alone.text, alone.new_tokens)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("server_max_new_tokens", [40, pytest.param(600, marks=pytest.mark.slow)])
def test_a_long_conversation_that_arrives_mid_run_joins_without_a_compile(tokenizer, device, server_max_new_tokens,
                                                                          caplog):
    """The compiled engine (the GPU's; on the CPU too) compiles each batch shape at load, at each of its row lengths
    (the context window, or as long as the KV budget lets; up to 8 rows also 512), whatever max_new_tokens the
    server's settings give the warm-up: the history of a long conversation (~560 tokens) that arrives while three
    short answers (40 tokens, as an API request may ask) are being written joins them, and a longer one (~1,140
    tokens, past the largest prefill graph's 1,024) that arrives alone is prefilled through the compiled prefill of
    prompts, which takes it alone then; nothing is compiled while they are served (on a GPU a compile stops every
    answer for half a minute: docs/PERFORMANCE.md). Each answer is the one it gets alone (fp32)."""
    from torch._dynamo.utils import counters
    model = AutoModelForCausalLM.from_pretrained(TINY).to(device).eval()
    model.config.max_position_embeddings = 2048  # Phi-2's window (the tiny model's 512 holds no such history)
    plain = ChatModel(model, tokenizer, fast=False)
    history = city_history(22) + [{"role": "user", "content": "What is the capital of Peru?"}]
    longer = city_history(44) + [{"role": "user", "content": "What is the capital of Peru?"}]
    conversations = TOGETHER[:3] + [history, longer]
    gen = GenerationSettings(max_new_tokens=40, temperature=0.0)
    alone = [plain.chat(c, gen) for c in conversations]
    torch._dynamo.reset()  # what other tests compiled would otherwise serve this engine's shapes
    chat = ChatModel(copy.deepcopy(model), tokenizer, fast=True, batch_slots=8)
    chat.batcher.prefill_graphs = True  # as on a GPU: a prompt alone of up to 1,024 tokens takes its prefill graph
    assert chat.batcher.lengths == {1: (512, 2048), 8: (512, 2048)}
    with caplog.at_level(logging.INFO, logger="inference"):
        chat.warm_up(dataclasses.replace(gen, max_new_tokens=server_max_new_tokens))
    # the person starting the server sees each shape's compile begin (minutes in all on a GPU), then the total
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warm-up")]
    assert progress[:5] == [f"warm-up {i} of 5: {rows} answer(s) together, rows of {slots} slots" for i, (rows, slots)
                            in enumerate([(8, 512), (8, 2048), (1, 512), (1, 2048)], 1)] + [
        "warm-up 5 of 5: 1 answer(s) together, rows of 2048 slots, a prompt of 1025 tokens (longer than a prefill "
        "graph takes)"]
    assert len(progress) == 6 and re.fullmatch(r"warm-up done in \d+ s", progress[5])
    compiled = counters["stats"]["unique_graphs"]
    short = start_all(chat, conversations[:3], gen)
    next(iter(short[0]))  # being written when the long conversation arrives
    replies = finish(short + start_all(chat, conversations[3:4], gen))
    replies += finish(start_all(chat, conversations[4:], gen))
    assert [(r.text, r.new_tokens) for r in replies] == [(r.text, r.new_tokens) for r in alone]
    assert len(chat.prompt_ids(history, 40)[0]) > 512 and chat.batcher.most_rows >= 2
    assert len(chat.prompt_ids(longer, 40)[0]) > decoding.PREFILL_BUCKETS[-1]
    assert counters["stats"]["unique_graphs"] == compiled, chat.batcher.record
    # where the time went (bench.py serve's columns): each pass's wait for the GPU at its end and, on a GPU, its
    # seconds for each shape's steps
    record = chat.batcher.record
    stepped = {k.removeprefix("steps at ") for k in record if k.startswith("steps at ")}
    timed = {k.removeprefix("gpu s at ") for k in record if k.startswith("gpu s at ") and record[k] > 0}
    assert timed == (stepped if device == "cuda" else set()) and "prefill_wait_s" in record


def test_each_batch_shape_has_row_lengths_fixed_at_load_and_the_pool_its_budget(chat_model):
    """Where the compiled steps read each row's own slots, the KV memory is one pool of token slots: every row's
    context window, or what the KV budget holds where that is less (never less than one window). Every batch
    shape's row lengths (how far its steps reach, not memory) are decided at load: the context window, and 512 too
    for shapes of up to 8 rows (a short answer's step); none for a shape that the pool cannot give more answers of
    512 tokens than the next smaller shape has rows (such a shape is not run); one row always the window. The
    engine sized by need (eager) has neither."""
    model = copy.deepcopy(chat_model.model)
    model.config.max_position_embeddings = 2048
    per_token = kv_bytes_per_token(model.config, model.dtype)
    engines = {budget: ChatModel(model, chat_model.tokenizer, fast=True, batch_slots=64,
                                 kv_budget=None if budget is None else budget * per_token).batcher
               for budget in (None, 64 * 2048 * 2, 16 * 2048, 16 * 512, 1000)}
    assert {budget: engine.pool for budget, engine in engines.items()} == {
        None: 64 * 2048, 64 * 2048 * 2: 64 * 2048, 16 * 2048: 16 * 2048, 16 * 512: 16 * 512, 1000: 2048}
    every = {1: (512, 2048), 8: (512, 2048), 16: (2048,), 32: (2048,), 64: (2048,)}
    assert {budget: engine.lengths for budget, engine in engines.items()} == {
        None: every, 64 * 2048 * 2: every, 16 * 2048: every,
        16 * 512: {1: (512, 2048), 8: (512, 2048), 16: (2048,), 32: (), 64: ()},  # 17 x 512 > 8,192
        1000: {1: (512, 2048), 8: (512, 2048), 16: (), 32: (), 64: ()}}  # the window's 2,048: 2 (not 9) x 512
    eager = ChatModel(model, chat_model.tokenizer, fast=False, batch_slots=64).batcher
    assert eager.lengths is None and eager.pool is None


def test_questions_that_arrive_together_are_prefilled_together(chat_model):
    """Four questions of different lengths arrive while an answer is being written: their prompts go through the
    model in one forward pass at the next chunk boundary, so the last of them does not wait behind the others'
    prefill for its first token; each answer is still, exactly, the one it gets alone (fp32)."""
    chat = ChatModel(copy.deepcopy(chat_model.model), chat_model.tokenizer, fast=False)
    gen = GenerationSettings(max_new_tokens=24, temperature=0.0)
    alone = [chat.chat(c, gen) for c in TOGETHER[:5]]
    prefills, hold, inside, release = [], threading.Event(), threading.Event(), threading.Event()
    layers = chat.model.model  # every pass goes through them (a group prefill calls them and lm_head itself)
    forward = layers.forward

    def watched(*args, **kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:
            prefills.append(ids.shape[0])  # prompts in this pass
        elif hold.is_set():  # a decode step, held until the others have arrived
            inside.set()
            release.wait(30)
        return forward(*args, **kwargs)

    layers.forward = watched
    first = chat.start(chat.prompt_ids(TOGETHER[0], gen.max_new_tokens)[0], gen)
    next(iter(first))
    hold.set()
    assert inside.wait(30)
    others = [chat.start(ids, gen) for ids in [chat.prompt_ids(c, gen.max_new_tokens)[0] for c in TOGETHER[1:5]]]
    hold.clear()
    release.set()
    replies = finish([first] + others)
    assert prefills == [1, 4]
    assert [(r.text, r.new_tokens) for r in replies] == [(r.text, r.new_tokens) for r in alone]


def test_a_prefill_pass_has_its_inputs_in_one_piece():
    """Two prompts (2 and 3 tokens, pool runs from slots 10 and 20, rows 5 and 7 free) as a pass's inputs: the
    prompts right-padded, each token's row in the pass, row in the batch, slot and pool slot, and each prompt's row,
    length, last slot and last position; all views of one tensor (one copy to the device, not one a list)."""
    from batching import prefill_inputs
    inputs = prefill_inputs([[11, 12], [21, 22, 23]], [10, 20], [300, 400], [5, 7], 0, torch.device("cpu"))
    assert [t.tolist() for t in inputs] == [
        [[11, 12, 0], [21, 22, 23]], [0, 0, 1, 1, 1], [5, 5, 7, 7, 7], [0, 1, 0, 1, 2], [10, 11, 20, 21, 22],
        [5, 7], [2, 3], [300, 400], [1, 2]]
    assert len({t.untyped_storage().data_ptr() for t in inputs}) == 1


@pytest.mark.parametrize("slots, chunks", [(4, [2, 8, 8]), (1, [8, 8, 8])], ids=["rows-free", "rows-full"])
def test_the_chunk_after_a_pass_that_leaves_rows_free_is_short(tokenizer, monkeypatch, slots, chunks):
    """A burst's first prompt often arrives alone (on an H100, one of three 64-client runs: its pass, then a full
    chunk at one row while the other 63 arrived, before their pass). A pass that leaves rows free is followed by
    BURST_STEPS steps, not a full chunk (8 on a GPU, set here on the plain path), so the next boundary, where the
    rest of a burst joins, comes sooner; then the chunks are full again. A pass that fills every row is followed by a
    full chunk: no one could join at a sooner boundary."""
    import batching
    chat, _ = endless(tokenizer, fast=False)
    chat = ChatModel(chat.model, tokenizer, batch_slots=slots)
    chat.batcher.check_every = 8
    sizes, chunk = [], chat.batcher._decode_chunk

    def watched(most):
        sizes.append(most)
        return chunk(most)

    monkeypatch.setattr(chat.batcher, "_decode_chunk", watched)
    finish([chat.start(chat.prompt_ids([{"role": "user", "content": "Hi"}], 40)[0],
                       GenerationSettings(max_new_tokens=40, temperature=0.0))])
    assert batching.BURST_STEPS == 2 and sizes[:3] == chunks, sizes


@pytest.mark.parametrize("chunk, between", [(1, [1, 1]), (8, [2, 2])], ids=["chunk-1", "chunk-8"])
def test_running_answers_go_on_between_the_prefill_passes_of_a_burst(tokenizer, monkeypatch, chunk, between):
    """Prompts that arrive together while an answer is being written and take several prefill passes (here one a
    pass: PREFILL_TOKENS lowered to one prompt's length) are prefilled one pass a boundary, with the running answer's
    decode steps between them, not all passes before its next step: a burst of long prompts cannot stall the answers
    being streamed for the sum of its passes. Between two passes the running answers get BURST_STEPS steps, never
    more than a chunk (the plain path's is one step), not a full chunk (8 on a GPU, here on the plain path): the next
    pass, queued on the GPU behind those steps, starts sooner, and so do its users' first tokens (a GPU's 64 users
    arriving at once take 3-4 passes, docs/PERFORMANCE.md). Once no pass is ready, the chunks are full again. Each
    answer still writes all its tokens."""
    import batching
    chat, messages = endless(tokenizer, fast=False)
    chat.batcher.check_every = chunk
    ids = chat.prompt_ids(messages, 40)[0]
    monkeypatch.setattr(batching, "PREFILL_TOKENS", len(ids))
    calls, hold, inside, release = [], threading.Event(), threading.Event(), threading.Event()
    forward = chat.model.model.forward

    def watched(*args, **kwargs):
        calls.append("prefill" if kwargs["input_ids"].shape[1] > 1 else "step")
        if calls[-1] == "step" and hold.is_set():  # the running answer's step, held until the others have arrived
            inside.set()
            release.wait(30)
        return forward(*args, **kwargs)

    monkeypatch.setattr(chat.model.model, "forward", watched)
    running = chat.start(ids, GenerationSettings(max_new_tokens=60, temperature=0.0))
    next(iter(running))
    hold.set()
    assert inside.wait(30)
    others = [chat.start(ids, GenerationSettings(max_new_tokens=20, temperature=0.0)) for _ in range(3)]
    hold.clear()
    release.set()
    assert [r.new_tokens for r in finish([running] + others)] == [60, 20, 20, 20]
    passes = [i for i, call in enumerate(calls) if call == "prefill"]
    assert len(passes) == 4, calls  # the running answer's own, then the burst's three
    steps = [b - a - 1 for a, b in zip(passes[1:], passes[2:])]
    after = calls[passes[-1] + 1:passes[-1] + 1 + chunk]
    assert steps == between and after == ["step"] * chunk, calls  # (BURST_STEPS, then a full chunk)


def test_a_prompt_that_joins_alone_prefilled_padded_to_its_bucket_keeps_its_answer(chat_model, monkeypatch):
    """On a GPU BatchDecoder prefills a prompt that joins alone through the CUDA graph of its padded length
    (decoding._PrefillGraph, PREFILL_BUCKETS), captured at load, into a scratch cache its slots are copied out of;
    several prompts at once go through one eager pass. Eager on the CPU, the same padded prefill: one answer being
    written, five questions (one a longer multi-turn chat) join it; each greedy answer is exactly (fp32) the one
    generate() gives alone, and the prompt that came alone went through its bucket."""
    chat = ChatModel(copy.deepcopy(chat_model.model), chat_model.tokenizer, fast=True)
    batcher = chat.batcher
    batcher.prefill_graphs = True
    gen = GenerationSettings(max_new_tokens=24, temperature=0.0)
    expected = chat_model.chat_batch(TOGETHER, gen, batch_size=1)  # transformers' generate, one at a time
    prefills, hold, inside, release = [], threading.Event(), threading.Event(), threading.Event()
    forward, step = chat.model.model.forward, batcher.step

    def watched(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefills.append(tuple(kwargs["input_ids"].shape))  # (prompts, padded length) of a prefill pass
        return forward(*args, **kwargs)

    def held_step(*args, **kwargs):
        if hold.is_set():  # a decode step, held until the others have arrived
            inside.set()
            release.wait(30)
        return step(*args, **kwargs)

    chat.model.model.forward = watched
    monkeypatch.setattr(batcher, "step", held_step)
    hold.set()
    first = chat.start(chat.prompt_ids(TOGETHER[0], gen.max_new_tokens)[0], gen)
    assert inside.wait(30)  # its first decode step: the others arrive while it is being written
    others = [chat.start(chat.prompt_ids(c, gen.max_new_tokens)[0], gen) for c in TOGETHER[1:]]
    hold.clear()
    release.set()
    replies = finish([first] + others)
    assert [(r.text, r.new_tokens) for r in replies] == [(r.text, r.new_tokens) for r in expected]
    widest = max(len(chat.prompt_ids(c, gen.max_new_tokens)[0]) for c in TOGETHER[1:])
    assert prefills == [(1, 64), (5, widest)] and batcher.record["graph_prefills"] == 1
    assert all(r.text for r in replies) and len({r.text for r in replies}) > 2


def test_every_prompt_a_prefill_graph_can_take_is_captured_at_load(chat_model):
    """Capturing a graph while serving would cost the user who brings a new length two eager prefills: every
    group a prefill graph takes (one prompt of up to 1,024 tokens) has its bucket among those captured at load,
    the bucket holds the prompt, and anything else prefills eagerly."""
    batcher = ChatModel(copy.deepcopy(chat_model.model), chat_model.tokenizer, fast=True).batcher
    batcher.prefill_graphs = True  # (on the CPU the graphs are made, their capture is a GPU's)
    batcher.capture_prefill_graphs()
    taken = {(prompts, width): batcher.prefills.bucket(prompts, width)
             for prompts in range(1, batcher.slots + 1) for width in range(1, decoding.PREFILL_BUCKETS[-1] + 2)}
    assert {bucket for bucket in taken.values() if bucket} == set(batcher.prefills.graphs)
    assert all(bucket is None or bucket >= width for (_, width), bucket in taken.items())
    assert taken[(1, 140)] == 192 and taken[(1, 1024)] == 1024
    assert taken[(1, 1025)] is None and taken[(2, 10)] is None  # longer, or several at once: eager


def test_sampled_answers_keep_their_seed_in_company(chat_model):
    gen = GenerationSettings(max_new_tokens=30, temperature=1.0, repetition_penalty=1.3)
    alone = [finish(start_all(chat_model, [c], gen, seeds=[i]))[0].text for i, c in enumerate(TOGETHER)]
    together = [r.text for r in finish(start_all(chat_model, TOGETHER, gen, seeds=list(range(len(TOGETHER)))))]
    assert together == alone and len(set(alone)) > 1


@pytest.mark.gpu
def test_on_a_gpu_sampled_answers_keep_their_seed_in_company(tokenizer):
    """The fast engine on a GPU, fp32 (35th session: bf16 crowds of seeded users on an H100 wrote none of their alone
    texts, where greedy ones wrote a third; bf16's batch-dependent rounding, or a draw that depends on its
    company): with the server's default settings, each seeded answer among 16 writes what it writes alone (16 rows:
    three batch shapes to compile, where 64 would take five)."""
    if not triton_supported(torch.device("cuda"), torch.float32):
        pytest.skip("needs Triton and compute capability 8.0 or later")
    chat = ChatModel(AutoModelForCausalLM.from_pretrained(TINY).cuda(), tokenizer, fast=True, batch_slots=16)
    gen = GenerationSettings(max_new_tokens=40)  # temperature 0.7, top-p 0.9, top-k 50, repetition penalty 1.1
    chat.warm_up(gen)
    asked = [TOGETHER[i % len(TOGETHER)] for i in range(16)]
    alone = [finish(start_all(chat, [c], gen, seeds=[i]))[0].text for i, c in enumerate(asked[:8])]
    together = [r.text for r in finish(start_all(chat, asked, gen, seeds=list(range(16))))]
    assert together[:8] == alone and len(set(alone)) > 1
    assert chat.batcher.most_rows == 16


def test_answers_with_different_sampling_settings_each_keep_their_alone_answer(chat_model):
    """The rows that sample are warped together, each with its own settings (decoding.warp): greedy, penalized,
    and sampled with every warper on, off or at an extreme in one batch, each answer is what it is alone."""
    gens = [GenerationSettings(max_new_tokens=30, temperature=t, top_k=k, top_p=p, repetition_penalty=r)
            for t, k, p, r in [(0.0, 50, 0.9, 1.0), (1.0, 0, 1.0, 1.0), (1.5, 5, 1.0, 1.3), (0.7, 50, 0.9, 1.1),
                               (1.2, 0, 0.5, 1.0), (0.0, 50, 0.9, 1.5)]]
    start = [(c, g, i) for i, (c, g) in enumerate(zip(TOGETHER, gens))]
    alone = [finish([chat_model.start(chat_model.prompt_ids(c, 30)[0], g, seed=i)])[0].text for c, g, i in start]
    together = [r.text for r in finish([chat_model.start(chat_model.prompt_ids(c, 30)[0], g, seed=i)
                                        for c, g, i in start])]
    assert together == alone and len(set(alone)) == len(alone)


def test_an_answer_that_samples_where_another_sampled_before_draws_with_its_own_settings(tokenizer):
    """The sampled rows' settings stay on the device while the same answers sample in the same rows: an answer that
    takes the row another sampled answer left (one that drew only its most likely token, top-k 1) samples with its
    own settings, beside a greedy answer that ran through both, and writes what it writes alone."""
    chat = ChatModel(AutoModelForCausalLM.from_pretrained(TINY), tokenizer, batch_slots=8)  # (untrained: no EOS soon)
    ask = [{"role": "user", "content": "Hi"}]
    greedy = GenerationSettings(max_new_tokens=60, temperature=0.0, repetition_penalty=1.0)
    narrow = GenerationSettings(max_new_tokens=4, temperature=1.0, top_k=1, top_p=1.0, repetition_penalty=1.0)
    wide = GenerationSettings(max_new_tokens=20, temperature=2.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    alone = finish([chat.start(chat.prompt_ids(ask, 20)[0], wide, seed=3)])[0].text
    running = chat.start(chat.prompt_ids(ask, 60)[0], greedy)
    finish([chat.start(chat.prompt_ids(ask, 4)[0], narrow, seed=1)])
    together = finish([chat.start(chat.prompt_ids(ask, 20)[0], wide, seed=3)])[0].text
    finish([running])
    narrowed = finish([chat.start(chat.prompt_ids(ask, 20)[0], dataclasses.replace(wide, top_k=1), seed=3)])[0].text
    assert together == alone != narrowed


def test_answers_that_sample_add_few_operators_to_a_step(chat_model, monkeypatch):
    """The engine's host issues every step for all rows; each torch call it makes is a dispatch (on a GPU a kernel
    launch), and can wait for the GIL while the server's threads take requests. Rows that sample are warped together
    and each draws from its own generator: a step's calls grow by a few a sampling row, where generate()'s processors
    row by row added over ten a row (the server's default settings sample, so a team of users would run at the host's
    pace, not the GPU's)."""
    from torch.overrides import TorchFunctionMode

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls[-1] += 1
            return func(*args, **(kwargs or {}))

    batcher = chat_model.batcher
    chunk, calls, steps = batcher._decode_chunk, [0], [0]

    def counted(most):
        before = batcher.record["steps"]
        with Calls():
            chunk(most)
        steps[-1] += batcher.record["steps"] - before

    monkeypatch.setattr(batcher, "_decode_chunk", counted)
    greedy = GenerationSettings(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
    sampled = GenerationSettings(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.0)
    per_step = {}
    for name, sampling in (("greedy", 0), ("2 sampled", 2), ("8 sampled", 8)):
        calls[-1] = steps[-1] = 0
        finish([chat_model.start(chat_model.prompt_ids([{"role": "user", "content": f"Say {i}"}], 24)[0],
                                 sampled if i < sampling else greedy, seed=i) for i in range(8)])
        per_step[name] = calls[-1] / steps[-1]
    assert batcher.slots == 8 and steps[-1] >= 23, steps
    assert per_step["8 sampled"] - per_step["2 sampled"] <= 6 * 3, per_step   # a few calls a row
    assert per_step["8 sampled"] - per_step["greedy"] <= 40 + 8 * 3, per_step  # and a few for all of them


@pytest.mark.slow  # a fresh interpreter, ~20 s of contended runs (make test leaves it out)
def test_the_prefill_inputs_micro_benchmark_runs_as_a_gpu_lease_runs_it():
    """.ci/prefill_inputs_micro.py, which a GPU lease runs first (.ci/gpu tests), runs here on the CPU as it is: both
    forms of a pass's inputs, alone, beside a thread spinning in Python, and so again with a 0.5 ms switch interval,
    each a median and a maximum."""
    from conftest import ROOT, run_script
    out = run_script(str(ROOT / ".ci" / "prefill_inputs_micro.py")).stdout
    rows = re.findall(r"^(CPU.*?) +(operators|packed) +median +[\d.]+ ms +max +[\d.]+ ms$", out, re.M)
    labels = ["CPU", "CPU, a thread spinning in Python", "CPU, a thread spinning in Python, switch 0.5 ms"]
    assert rows == [(label, form) for label in labels for form in ("operators", "packed")], out


@pytest.mark.slow  # a fresh interpreter, 64 answers 20 times (make test leaves it out)
def test_the_sampling_micro_benchmark_runs_and_counts_few_calls_a_sampled_row():
    """.ci/sampling_micro.py, which a GPU lease runs (.ci/gpu tests), runs here on the CPU as it is and prints, for 64
    rows, greedy and the server's default (sampled) settings: a step's torch calls and host time, then the sampled
    rows' and the penalty's own work at Phi-2's vocabulary, timed and by operator. The sampled rows add a few calls
    a row to a greedy step's (before they were warped together, tens a row: docs/PERFORMANCE.md)."""
    from conftest import ROOT, run_script
    out = run_script(str(ROOT / ".ci" / "sampling_micro.py")).stdout
    rows = re.findall(r"^(greedy|the server's defaults \(sampled\)) +(\d+) torch calls a step; host "
                      r"([\d.]+), ([\d.]+), ([\d.]+) ms a step at 64 rows$", out, re.M)
    assert [r[0] for r in rows] == ["greedy", "the server's defaults (sampled)"], out
    (_, greedy, *_), (_, sampled, *times) = rows
    assert int(sampled) - int(greedy) <= 40 + 3 * 64 and all(float(t) > 0 for t in times), out
    for part in ("the repetition penalty", "warp, softmax and draw"):
        assert re.search(rf"^{part} at 64 rows x 51200 scores: [\d.]+ ms a step", out, re.M), out
    assert all(re.search(rf"^ +aten::{op} ", out, re.M) for op in ("sort", "topk", "exponential_")), out


def test_cancelling_one_answer_leaves_the_others_alone(tokenizer):
    chat, messages = endless(tokenizer, fast=False)
    gen = GenerationSettings(max_new_tokens=60, temperature=0.0)
    alone = chat.chat(messages, gen).text
    answers = start_all(chat, [messages] * 4, gen)
    next(iter(answers[1]))
    answers[1].cancel()
    replies = finish(answers)
    assert replies[1].stop == "cancelled" and replies[1].new_tokens < 60
    assert [r.text for i, r in enumerate(replies) if i != 1] == [alone] * 3


def test_a_failed_prefill_fails_every_answer_it_was_admitting(tokenizer):
    """An error while prompts are being prefilled (out of memory on a long prompt, say) reaches the clients of those
    prompts too, not only the ones already decoding: none hangs, and the next request is served."""
    chat, messages = endless(tokenizer, fast=False)
    gen = GenerationSettings(max_new_tokens=20, temperature=0.0)
    alone = chat.chat(messages, gen).text
    forward = chat.model.model.forward

    def failing(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    chat.model.model.forward = failing
    answers = start_all(chat, [messages] * 3, gen)
    for answer in answers:
        errors = []

        def read(answer=answer):
            try:
                for _ in answer:
                    pass
            except RuntimeError as error:
                errors.append(error)

        reader = threading.Thread(target=read, daemon=True)  # a client that hangs fails the test, not the run
        reader.start()
        reader.join(60)
        assert not reader.is_alive() and "out of memory" in str(errors[0])
    chat.model.model.forward = forward
    assert chat.chat(messages, gen).text == alone


def test_a_failed_step_fails_every_answer_it_held_and_the_next_answer_works(tokenizer):
    """An error inside the batch loop reaches each waiting client (none hangs), and the next request is served."""
    chat, messages = endless(tokenizer, fast=False)
    gen = GenerationSettings(max_new_tokens=40, temperature=0.0)
    alone = chat.chat(messages, gen).text
    forward = chat.model.model.forward
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return forward(*args, **kwargs)

    chat.model.model.forward = failing
    answers = start_all(chat, [messages] * 3, gen)
    for answer in answers:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            for _ in answer:
                pass
    assert chat.chat(messages, gen).text == alone


SHORT = GenerationSettings(max_new_tokens=24, temperature=0.0)
OTHERS = [[{"role": "user", "content": q}] for q in ("Hi", "What is the capital of France?", "Name a color.")]
PERU = [{"role": "user", "content": "What is the capital of Peru?"}]


def read(answer, timeout: float = 60):
    """(text, error) of an answer, read on a thread of its own: a client that hangs fails the test, not the run."""
    out = {"text": "", "error": None}

    def run():
        try:
            for out["text"] in answer:
                pass
        except Exception as error:
            out["error"] = error

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), "the client was left hanging"
    return out["text"], out["error"]


def poisoned(chat_model, fast: bool = False) -> ChatModel:
    """The smoke model with the embedding of " Lima" made NaN: a row that writes " Lima" (only the answer about Peru
    does) gets NaN hidden states, keys, values and scores from its next step on. fast: the GPU's engine (compiled,
    rows reading their own slots of one KV pool)."""
    model = PhiForCausalLM.from_pretrained(TINY).eval()
    model.load_state_dict(chat_model.model.state_dict())
    lima = chat_model.tokenizer(" Lima", add_special_tokens=False)["input_ids"]
    assert len(lima) == 1
    with torch.no_grad():
        model.model.embed_tokens.weight[lima[0]] = float("nan")
    return ChatModel(model, chat_model.tokenizer, fast=fast, batch_slots=4)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_a_row_whose_scores_go_non_finite_fails_alone_and_leaves_nothing_behind(chat_model, fast):
    chat = poisoned(chat_model, fast)
    alone = [chat.chat(c, SHORT).text for c in OTHERS]
    assert all(alone) and not any("Lima" in a for a in alone)
    answers = start_all(chat, OTHERS + [PERU], SHORT)  # (with the pool, its slots after theirs)
    *others, (peru, error) = [read(a) for a in answers]
    assert isinstance(error, RuntimeError) and "not finite" in str(error)  # a clear error to that client alone
    assert peru == "The capital of Peru is Lima"                            # with the text it had
    assert [text for text, _ in others] == alone and all(e is None for _, e in others)
    # The failed row's slots held NaN; the answers that take the rows next are still their alone-answers.
    again = [read(a) for a in start_all(chat, OTHERS + OTHERS[:1], SHORT)]
    assert [text for text, _ in again] == alone + alone[:1] and all(e is None for _, e in again)


def test_temperatures_below_the_floor_decode_greedily_beside_sampled_rows(chat_model):
    """1e-300 passes every range check (it is >= 0); dividing the scores by it gave inf, a NaN softmax, and a
    sampler error that failed every answer in the batch. Below config.MIN_TEMPERATURE, answers are greedy."""
    greedy = chat_model.chat(PERU, SHORT).text
    tiny = GenerationSettings(max_new_tokens=24, temperature=1e-300)
    sampled = GenerationSettings(max_new_tokens=24, temperature=1.0)
    answers = [chat_model.start(chat_model.prompt_ids(PERU, 24)[0], g, seed=i)
               for i, g in enumerate([tiny, sampled, tiny, sampled])]
    results = [read(a) for a in answers]
    assert all(error is None for _, error in results), results
    assert results[0][0] == results[2][0] == greedy


def test_an_answer_joins_at_once_whatever_the_lengths_of_the_others(tokenizer):
    """Every row has its own positions in the cache: a long prompt (A) joins a long-running answer (R) at once,
    though R's and A's prompts and answers together pass the 512-token context window (when all rows shared one
    write index, A waited until R had nearly ended); so do a short request (B) and another long-running one (C), and
    each writes all its tokens. (Steps are slowed so that R runs ~3 s.)"""
    chat, messages = endless(tokenizer, fast=False, delay=0.005)
    assert chat.context_window == 512
    running = chat.start(chat.prompt_ids(messages, 420)[0], GenerationSettings(max_new_tokens=420, temperature=0.0))
    pieces = iter(running)
    next(pieces)
    events: list[str] = []
    r_pieces = [1]  # pieces of R's answer read so far
    r_when_started = {}

    def started(name, answer):
        def watch():
            for i, _ in enumerate(answer):
                if i == 0:
                    events.append(f"{name} started")
                    r_when_started[name] = r_pieces[0]
            events.append(f"{name} ended")
        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    def read_r():
        for _ in pieces:
            r_pieces[0] += 1
        events.append("R ended")

    a_ids = chat.prompt_ids([{"role": "user", "content": "la " * 150}], 60)[0]
    assert len(a_ids) + 420 > 512  # A and R together pass the window
    budgets = {"A": 60, "B": 3, "C": 450}
    answers = {"A": chat.start(a_ids, GenerationSettings(max_new_tokens=60, temperature=0.0)),
               "B": chat.start(chat.prompt_ids(messages, 3)[0], GenerationSettings(max_new_tokens=3, temperature=0.0)),
               "C": chat.start(chat.prompt_ids(messages, 450)[0],
                               GenerationSettings(max_new_tokens=450, temperature=0.0))}
    readers = [started(name, answer) for name, answer in answers.items()]
    threading.Thread(target=read_r, daemon=True).start()
    for reader in readers:
        reader.join(120)
        assert not reader.is_alive()
    assert all(r_when_started[name] < 30 for name in budgets), r_when_started  # R has written < 30 of its 420
    assert chat.batcher.most_rows == 4
    assert {name: a.reply.new_tokens for name, a in answers.items()} == budgets
    assert running.reply.new_tokens == 420


def test_a_few_users_on_an_engine_of_64_slots_run_a_small_step(tokenizer):
    """An engine of 64 slots runs the smallest batch shape that holds its answers (BatchDecoder.shapes): three users
    share an 8-row step, not a 64-row one, and the one left alone goes on in the one-row step, each answer whole."""
    chat, messages = endless(tokenizer, fast=False)
    chat = ChatModel(chat.model, tokenizer, batch_slots=64)
    assert chat.batcher.shapes == [1, 8, 16, 32, 64]
    ids = chat.prompt_ids(messages, 40)[0]
    answers = [chat.start(ids, GenerationSettings(max_new_tokens=n, temperature=0.0)) for n in (12, 12, 40)]
    assert [r.text for r in finish(answers)] == [" ".join(["la"] * n) for n in (12, 12, 40)]
    shapes = {key.split(" x ")[0] for key in chat.batcher.record if key.startswith("steps at")}
    assert shapes == {"steps at 8 rows", "steps at 1 rows"}, chat.batcher.record
    assert chat.batcher.record["steps at 1 rows x 512 slots"] >= 20  # the last one's 28 steps after the others'


def test_the_kv_memory_held_is_the_largest_shape_used_not_the_sum(tokenizer):
    """Every batch shape's cache views one keys and one values buffer a layer: after three users (the 8-row shape)
    and one left alone (the one-row shape), the engine holds the 8-row cache's bytes; one long answer alone fits in
    them, and a long answer beside another grows them to 8 rows of its length."""
    chat, messages = endless(tokenizer, fast=False)
    chat.model.config.max_position_embeddings = 2048  # Phi-2's window (the tiny model's 512 holds no longer cache)
    chat = ChatModel(chat.model, tokenizer, batch_slots=64)
    batcher = chat.batcher
    per_token = kv_bytes_per_token(chat.model.config, chat.model.dtype)
    ids = chat.prompt_ids(messages, 40)[0]
    finish([chat.start(ids, GenerationSettings(max_new_tokens=n, temperature=0.0)) for n in (12, 12, 40)])
    assert {rows for rows, _ in batcher.kv.caches} == {1, 8}
    assert batcher.kv.bytes == 8 * 512 * per_token  # not (8 + 1) x 512
    finish([chat.start(ids, GenerationSettings(max_new_tokens=500, temperature=0.0))])
    assert batcher.kv.bytes == 8 * 512 * per_token  # one row of 1,024 slots fits in them
    answers = [chat.start(ids, GenerationSettings(max_new_tokens=n, temperature=0.0)) for n in (500, 12)]
    assert [r.new_tokens for r in finish(answers)] == [500, 12]
    assert batcher.kv.bytes == 8 * 1024 * per_token  # 8 rows of 1,024 slots did not


def test_an_answer_waits_while_the_cache_with_it_would_pass_the_kv_budget(tokenizer):
    """On a GPU the KV cache stays within what its memory holds (kv_budget; here 8 rows of 512 slots): three short
    answers run together; a long one (1,024 slots) arriving meanwhile would make the cache 8 x 1,024, so it waits at
    the head of the queue, and a short one behind it waits too (nothing passes it); the long one runs once the three
    have ended (one answer alone always runs), the last one after it. Every answer is whole, and the cache never
    grew past the budget."""
    chat, messages = endless(tokenizer, fast=False, delay=0.005)
    chat.model.config.max_position_embeddings = 2048
    per_token = kv_bytes_per_token(chat.model.config, chat.model.dtype)
    chat = ChatModel(chat.model, tokenizer, batch_slots=8, kv_budget=8 * 512 * per_token)
    ids = chat.prompt_ids(messages, 40)[0]
    order: list[str] = []

    def run(name, n):
        answer = chat.start(ids, GenerationSettings(max_new_tokens=n, temperature=0.0))

        def watch():
            for i, _ in enumerate(answer):
                if i == 0:
                    order.append(f"{name} started")
            order.append(f"{name} ended")
        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return answer, thread

    short = [run(f"short {i}", 30) for i in range(3)]
    while len(order) < 3:
        time.sleep(0.01)
    later = [run("long", 700), run("last", 30)]
    for answer, thread in short + later:
        thread.join(120)
        assert not thread.is_alive()
    assert [a.reply.new_tokens for a, _ in short + later] == [30, 30, 30, 700, 30]
    assert order.index("long started") > max(order.index(f"short {i} ended") for i in range(3)), order
    assert order.index("last started") > order.index("long ended"), order
    assert chat.batcher.kv.bytes == 8 * 512 * per_token


@pytest.mark.slow
def test_answers_take_from_one_kv_pool_only_the_slots_they_need(tokenizer):
    """The GPU's engine (compiled, each row reading its own slots; here on the CPU) keeps its KV memory as one pool
    of token slots, sized by the budget (4,096 tokens here), from which each answer takes its prompt +
    max_new_tokens: three answers of up to ~920 and ~320 tokens run together, where rows of the 8-row shape's
    length would each take 2,048 (8 x 2,048 would pass the budget). When the short one has ended, a fourth that
    needs ~1,970 slots joins the two still running: no free run of the pool is that long, but enough slots are free
    in all, so the running answers' slots are moved together first. Every answer is, exactly, the one it gets alone
    (fp32), the two that were moved included, and the pool's memory is the budget's."""
    model = AutoModelForCausalLM.from_pretrained(TINY).eval()  # random weights: no EOS in 2,000 tokens
    model.config.max_position_embeddings = 2048
    per_token = kv_bytes_per_token(model.config, model.dtype)
    plain = ChatModel(model, tokenizer, fast=False)
    asked = {"A": ("What is the capital of Peru?", 900), "B": ("Hi", 300), "C": ("Name a color.", 900),
             "D": ("What is the capital of France?", 1950)}
    conversations = {name: [{"role": "user", "content": q}] for name, (q, _) in asked.items()}
    settings = {name: GenerationSettings(max_new_tokens=n, temperature=0.0) for name, (_, n) in asked.items()}
    alone = {name: plain.chat(conversations[name], settings[name]) for name in asked}
    assert all(r.new_tokens == settings[name].max_new_tokens for name, r in alone.items())
    torch._dynamo.reset()  # what other tests compiled would otherwise serve this engine's shapes
    chat = ChatModel(copy.deepcopy(model), tokenizer, fast=True, batch_slots=8, kv_budget=4096 * per_token)
    order: list[str] = []
    replies = {}

    def run(name: str) -> threading.Thread:
        answer = chat.start(chat.prompt_ids(conversations[name], settings[name].max_new_tokens)[0], settings[name])

        def watch():
            for i, _ in enumerate(answer):
                if i == 0:
                    order.append(f"{name} started")
            order.append(f"{name} ended")
            replies[name] = answer.reply
        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    threads = [run(name) for name in "ABC"]
    threads[1].join(300)  # B has ended; A and C are ~300 tokens into their 900
    threads.append(run("D"))
    for thread in threads:
        thread.join(300)
        assert not thread.is_alive()
    assert order.index("D started") < order.index("A ended"), order  # it did not wait for A and C to end
    assert {name: (r.text, r.new_tokens) for name, r in replies.items()} == \
        {name: (r.text, r.new_tokens) for name, r in alone.items()}
    assert chat.batcher.most_rows >= 3 and chat.batcher.record["compactions"] >= 1
    assert chat.batcher.kv.bytes == (4096 + 1) * per_token  # the pool and the slot free rows write


def test_on_a_gpu_64_short_chats_are_decoded_together_from_24_gb(chat_model):
    """inference.batch_slots 0 (the default): 64 on a GPU, within the KV budget its free memory gives (free after the
    model, less max(2 GiB, a tenth)); 8 on the CPU; a number wins. README's table, computed for Phi-2 (320 KiB a
    token in bf16, 640 KiB in fp32): how many answers of 512 and of 2,048 tokens are decoded at once. With the
    Triton kernels (Ampere and newer) each takes its tokens from one pool (pool_slots); on older GPUs (a T4) each
    row is a region of its batch shape's cache (shapes 1, 8, 16, 32, 64 rows), all as long as the longest."""
    import inference
    from batching import ROW_BUCKETS
    from kv_pool import pool_slots
    from phi_layers import kv_budget_for
    gib, weights = 2**30, int(2.78e9 * 2)  # Phi-2's weights in bf16/fp16

    def pooled(budget: int, tokens: int, per_token: int) -> int:  # answers whose tokens fit the pool
        return max(1, min(64, pool_slots(64, 2048, budget, per_token) // tokens))

    def regions(budget: int, tokens: int, per_token: int) -> int:  # answers whose batch shape fits the budget
        return max([n for n in range(1, 65) if next(r for r in ROW_BUCKETS if r >= n) * tokens * per_token <= budget]
                   or [1])  # one answer alone always runs

    table = {}
    for dtype, size in (("bf16", 2), ("fp32", 4)):
        for name, total in {"16 GB": 14.7, "24 GB": 23.6, "80 GB": 79.2, "141 GB": 139.8}.items():
            budget = kv_budget_for(int(total * gib) - weights // 2 * size - gib // 2, int(total * gib))
            per_token = 160 * 1024 * size
            table[dtype, name] = tuple(pooled(budget, n, per_token) for n in (512, 2048))
            if name == "16 GB":
                table[dtype, "T4"] = tuple(regions(budget, n, per_token) for n in (512, 2048))
    assert table == {("bf16", "16 GB"): (44, 11), ("bf16", "T4"): (32, 8), ("bf16", "24 GB"): (64, 24),
                     ("bf16", "80 GB"): (64, 64), ("bf16", "141 GB"): (64, 64), ("fp32", "16 GB"): (5, 1),
                     ("fp32", "T4"): (1, 1), ("fp32", "24 GB"): (33, 8), ("fp32", "80 GB"): (64, 48),
                     ("fp32", "141 GB"): (64, 64)}
    assert inference.serving_slots(0, chat_model.model) == (8, None)
    assert inference.serving_slots(12, chat_model.model) == (12, None)


def test_the_queue_is_bounded_and_a_waiting_answer_that_leaves_it_frees_its_place(tokenizer):
    chat, messages = endless(tokenizer, fast=False, delay=0.01)
    chat = ChatModel(chat.model, tokenizer, batch_slots=2, max_waiting=1)
    ids = chat.prompt_ids(messages, 200)[0]
    gen = GenerationSettings(max_new_tokens=200, temperature=0.0)
    held = [chat.start(ids, gen) for _ in range(3)]  # two rows and one place in the queue
    with pytest.raises(Busy) as busy:
        chat.start(ids, gen)
    assert busy.value.retry_after >= 1 and "busy" in str(busy.value)
    held[2].cancel()  # the waiting one leaves: its place is free at once, before any row is
    replacement = chat.start(ids, GenerationSettings(max_new_tokens=3, temperature=0.0))
    for answer in held[:2]:
        answer.cancel()
    assert read(replacement)[0] == "la la la" and read(held[2]) == ("", None)
    assert held[2].reply.stop == "cancelled" and held[2].reply.new_tokens == 0  # it never ran


def test_shutdown_ends_every_answer_with_an_error_and_refuses_new_ones(tokenizer):
    chat, messages = endless(tokenizer, fast=False, delay=0.01)
    chat = ChatModel(chat.model, tokenizer, batch_slots=2)
    ids = chat.prompt_ids(messages, 300)[0]
    gen = GenerationSettings(max_new_tokens=300, temperature=0.0)
    answers = [chat.start(ids, gen) for _ in range(4)]  # two written, two waiting
    next(iter(answers[0]))
    chat.shutdown("the server is shutting down")
    for answer in answers:
        _, error = read(answer)
        assert isinstance(error, ShuttingDown) and "shutting down" in str(error)
    with pytest.raises(ShuttingDown):
        chat.start(ids, gen)
    calls = ScriptedPhi.calls
    time.sleep(0.3)
    assert ScriptedPhi.calls == calls  # nothing runs on


def city_history(turns: int) -> list[dict]:
    """A long conversation's history: `turns` messages, user and assistant in turn (22 make ~560 tokens)."""
    return [{"role": "user", "content": f"Tell me about city number {i}, please."} if i % 2 == 0 else
            {"role": "assistant", "content": f"City number {i} is a fine city with a river."} for i in range(turns)]


def crowd_conversations(count: int, rng) -> list[list[dict]]:
    """`count` conversations of different lengths: one to five turns, questions of different sizes."""
    subjects = ["Peru", "France", "the cat", "a color", "the river", "city number 7", "the sea", "a song"]
    conversations = []
    for _ in range(count):
        messages = []
        for turn in range(rng.randint(1, 5)):
            subject = rng.choice(subjects)
            long = f"Can you tell me about {subject}, please? I keep forgetting it, " * rng.randint(1, 3)
            question = rng.choice([f"Tell me about {subject}.", f"What is {subject}?", "Hi", long])
            messages.append({"role": "user", "content": question})
            if turn:
                messages.insert(-1, {"role": "assistant", "content": f"It is about {subject}. " * rng.randint(1, 4)})
        conversations.append(messages)
    return conversations


@pytest.mark.slow
@pytest.mark.parametrize("fast, pool", [(False, None), (True, None), (True, 4608)], ids=["plain", "fast", "fast-pool"])
def test_64_conversations_arriving_and_leaving_at_random_each_get_their_alone_answer(chat_model, monkeypatch, fast,
                                                                                       pool):
    """A crowd on one engine of 64 slots (fp32, CPU, the smoke model): 64 conversations of different lengths and
    answer budgets arrive at random moments, 16 of them sampled with settings of their own and a seed; 12 of them
    leave at random points. Every answer that was not cancelled is exactly the one it gets alone (text, stop reason,
    tokens); every cancelled one stops with "cancelled" (or had ended already) and holds a beginning of its alone
    answer; and the engine decoded many of them together. Steps are slowed a little so that arrivals overlap as they
    do on a busy GPU. fast: the GPU's engine (compiled, fused layers, each row reading its own slots, row lengths
    fixed at load) in a 2,048-token window, with 4 long conversations among the 64: after the warm-up nothing is
    compiled. pool: that engine with a KV pool of that many tokens, the least that runs 16 rows (9 x 512), so that
    its rows are freed and taken again while the others run: a freed row's steps go on in the spare slot, whatever
    run its answer had."""
    import random

    from torch._dynamo.utils import counters
    rng = random.Random(0)
    model = chat_model.model
    conversations = crowd_conversations(64, rng)
    if fast:
        model = copy.deepcopy(model)
        model.config.max_position_embeddings = 2048
        for i in rng.sample(range(64), 4):
            conversations[i] = city_history(24) + conversations[i]
    plain = ChatModel(model, chat_model.tokenizer, fast=False, batch_slots=64)
    settings = [GenerationSettings(max_new_tokens=rng.randint(4, 40), temperature=0.0) for _ in conversations]
    sampled = set(rng.sample(range(64), 16))  # seeded, each with its own settings (the server's defaults sample)
    for i in sampled:
        settings[i] = GenerationSettings(max_new_tokens=settings[i].max_new_tokens, temperature=rng.uniform(0.5, 1.5),
                                         top_k=rng.choice([0, 20]), top_p=rng.choice([0.8, 1.0]),
                                         repetition_penalty=rng.choice([1.0, 1.2]))
    prompts = [plain.prompt_ids(c, g.max_new_tokens)[0] for c, g in zip(conversations, settings)]
    assert len({len(p) for p in prompts}) > 20  # different lengths
    alone = [None if i in sampled else plain.chat(c, g) for i, (c, g) in enumerate(zip(conversations, settings))]
    chat = plain
    if fast:
        torch._dynamo.reset()  # what other tests compiled would otherwise serve this engine's shapes
        budget = None if pool is None else pool * kv_bytes_per_token(model.config, model.dtype)
        chat = ChatModel(copy.deepcopy(model), chat_model.tokenizer, fast=True, batch_slots=64, kv_budget=budget)
        chat.warm_up(GenerationSettings(max_new_tokens=40, temperature=0.0))
        assert sum(len(p) > 512 for p in prompts) == 4
    for i in sampled:  # alone, on the engine that serves them (the plain and the fast path's draws may part)
        alone[i] = finish([chat.start(prompts[i], settings[i], seed=i)])[0]
    compiled = counters["stats"]["unique_graphs"]
    leaving = set(rng.sample(range(64), 12))
    delays = [rng.uniform(0, 0.6) for _ in conversations]
    pieces_before_leaving = [rng.randint(0, 3) for _ in conversations]
    if fast:  # 8 tokens a piece, and the smoke model's answers are short: half leave at once, half after one piece
        pieces_before_leaving = [-1 if n < 2 else 0 for n in pieces_before_leaving]
    step = chat.batcher.step
    monkeypatch.setattr(chat.batcher, "step", lambda *a, **k: time.sleep(0.01) or step(*a, **k))
    replies, errors = [None] * 64, []

    def client(i: int) -> None:
        try:
            time.sleep(delays[i])
            answer = chat.start(prompts[i], settings[i], seed=i)
            if i in leaving and pieces_before_leaving[i] < 0:
                answer.cancel()
            for n, _ in enumerate(answer):
                if i in leaving and n == pieces_before_leaving[i]:
                    answer.cancel()
            replies[i] = answer.reply
        except Exception as error:  # the test fails below, naming it
            errors.append((i, error))

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(64)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(120)
    assert not any(c.is_alive() for c in clients), "a client was left hanging"
    assert errors == []
    for i, (got, expected) in enumerate(zip(replies, alone)):
        if i in leaving and got.stop == "cancelled":
            assert expected.text.startswith(got.text) and got.new_tokens <= expected.new_tokens, i
        else:
            assert (got.text, got.stop, got.new_tokens) == (expected.text, expected.stop, expected.new_tokens), i
    assert sum(replies[i].stop == "cancelled" for i in leaving) >= 4  # most leave before their end (9 of 12 here)
    assert chat.batcher.most_rows >= 16
    assert counters["stats"]["unique_graphs"] == compiled, chat.batcher.record
