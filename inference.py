"""Merge the trained adapter into the full-precision base model and chat with it.

    python inference.py --config configs/smoke.yaml --prompt "What is the capital of France?"
    python inference.py --config configs/smoke.yaml --chat          # multi-turn chat in the terminal
    python inference.py --prompt "..." --inference.adapter model/final --inference.dtype bf16   # real Phi-2, GPU
    python inference.py --config configs/smoke.yaml --save-merged merged/   # standalone model folder
    python inference.py --inference.model merged/ --chat               # chat with a merged folder as it is

The base is loaded in fp32 (never 4-bit: merging into quantized weights loses accuracy), the adapter attached and
merged with `merge_and_unload`; the merge is checked on a probe batch (max |logit difference| logged). The model
can then be cast to bf16/fp16 for serving. Prompts use the training template from data_utils; generation stops at
EOS or when the model starts a new `### Human:` turn, and returns only the answer.

Chat answers (CLI, app, API) go through batching.py's `BatchDecoder`, which decodes every user's answer together;
batches given at once (evaluate.py, bench.py) go through transformers' `generate` (the plain path, CPU default) or
decoding.py's `FastDecoder` (CUDA default, `--inference.fast`). All give the same greedy tokens in fp32. On CUDA both
decoders use a static KV cache and a decode step compiled with CUDA graphs, driven by a loop that never waits for
the GPU between tokens.

`ChatModel` is the object the CLI, app.py (UI and OpenAI-compatible API) and evaluate.py use: load once, generate
many; `load_chat_model` (adapter + base, or a merged folder) and `load_model_folder` (a whole model) are the ways
to load one.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from adapter_utils import AdapterError, check_adapter_base, check_adapter_fits, merge_adapter, read_adapter_config
from answers import AnswerStream, Reply, reply_for
from config import Config, GenerationSettings, InferenceConfig, parse_config
from data_utils import HUMAN, Message, PromptTooLong, encode_prompt
from batching import ROW_BUCKETS, BatchDecoder
from decoding import PREFILL_BUCKETS, FastDecoder, penalty_processors
from model_utils import DTYPE_NAMES, ModelLoadError, load_model, load_tokenizer, readable_by_transformers_4
from phi_layers import kv_budget_for, kv_bytes_per_token

logger = logging.getLogger("inference")

class _OneThread:
    """Every generate call of every ChatModel runs on one thread. The fast path's CUDA graphs (inductor's cudagraph
    trees) work only in the thread that set them up, so a second model with its own thread (evaluate.py compares
    the base and the fine-tuned model) failed in its first step on a GPU; and requests take turns on the GPU (the
    app's queue holds the rest). The thread is started on first use: nothing starts at import."""

    def __init__(self):
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def __call__(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
            return self._executor


generation_thread = _OneThread()  # generation_thread(): the one thread every generation runs on


def adapter_dir_for(cfg: Config) -> Path:
    return Path(cfg.inference.adapter or Path(cfg.training.output_dir) / "final")


def generation_config(gen: GenerationSettings, tokenizer) -> GenerationConfig:
    sample = gen.samples
    return GenerationConfig(
        max_new_tokens=gen.max_new_tokens,
        do_sample=sample,
        temperature=gen.temperature if sample else None,
        top_p=gen.top_p if sample else None,
        top_k=gen.top_k if sample else None,
        repetition_penalty=None,  # decoding.AnswerRepetitionPenalty, passed as a logits processor
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=[HUMAN],
        disable_compile=True,  # the compiled path is FastDecoder
    )


class ChatModel:
    """A merged model plus tokenizer that answers in the training template."""

    def __init__(self, model, tokenizer, fast: bool = False, batch_slots: int = 8, max_waiting: int = 32,
                 name: str = "phi2-qlora", kv_budget: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.fast = fast
        self.name = name  # what the API calls the model
        self.context_window = int(getattr(model.config, "max_position_embeddings", 2048))
        self._decoder = FastDecoder(model, tokenizer, self.context_window, HUMAN) if fast else None
        # Chat answers (CLI, app, API) of all users are decoded together, at most batch_slots at once and
        # max_waiting more in its queue; batches given at once (evaluate.py, bench.py) go to FastDecoder or generate().
        self.batch_slots = batch_slots
        self.batcher = BatchDecoder(model, tokenizer, self.context_window, batch_slots, fast, generation_thread,
                                    HUMAN, max_waiting, kv_budget)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prompt_ids(self, messages: list[Message], max_new_tokens: int) -> tuple[list[int], int]:
        budget = self.context_window - max_new_tokens
        if budget <= 0:
            raise PromptTooLong(f"generation.max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                                f"{self.context_window}-token context window")
        return encode_prompt(self.tokenizer, messages, budget)

    def _inputs(self, batch_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-padded batch with its attention mask (left padding keeps every prompt's end next to its answer)."""
        width = max(len(ids) for ids in batch_ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch_ids], device=self.device)
        return {"input_ids": input_ids, "attention_mask": mask}

    def _generate_plain(self, inputs: dict[str, torch.Tensor], gen: GenerationSettings, ignore_eos: bool,
                        output_logits: bool):
        config = generation_config(gen, self.tokenizer)
        if ignore_eos:  # benchmarks: always generate max_new_tokens
            config.min_new_tokens, config.stop_strings = gen.max_new_tokens, None
        config.output_logits, config.return_dict_in_generate = output_logits, True
        width = inputs["input_ids"].shape[1]
        out = self.model.generate(
            **inputs, generation_config=config, tokenizer=self.tokenizer,
            logits_processor=penalty_processors(gen, width, self.tokenizer.eos_token_id))
        new_ids = out.sequences[:, width:].tolist()
        return new_ids, (torch.stack(out.logits, 1).float().cpu() if output_logits else None)

    def _submit(self, batch_ids: list[list[int]], gen: GenerationSettings, ignore_eos: bool = False,
                output_logits: bool = False, cache_length: int = 0, seed: int | None = None) -> Future:
        """Queue one batch generation on the generation thread. seed: seeds sampling for this generation alone (the
        thread runs one generation at a time)."""
        def work():
            if seed is not None:
                torch.manual_seed(seed)
            with torch.inference_mode():
                inputs = self._inputs(batch_ids)
                if self._decoder is not None:
                    return self._decoder.generate(**inputs, gen=gen, ignore_eos=ignore_eos,
                                                  output_logits=output_logits, cache_length=cache_length)
                return self._generate_plain(inputs, gen, ignore_eos, output_logits)

        return generation_thread().submit(work)

    def generate_ids(self, batch_ids: list[list[int]], gen: GenerationSettings, ignore_eos: bool = False
                     ) -> list[list[int]]:
        """New token ids per prompt, up to gen.max_new_tokens (the plain path pads after EOS, the fast path cuts
        there); ignore_eos: always gen.max_new_tokens (benchmarks)."""
        return self._submit(batch_ids, gen, ignore_eos).result()[0]

    def generate_with_logits(self, batch_ids: list[list[int]], gen: GenerationSettings
                             ) -> tuple[list[list[int]], torch.Tensor]:
        """gen.max_new_tokens new ids and the logits of each step, (batch, steps, vocab); for checking the fast path
        (bench.py)."""
        return self._submit(batch_ids, gen, ignore_eos=True, output_logits=True).result()

    def chat(self, messages: list[Message], gen: GenerationSettings) -> Reply:
        ids, dropped = self.prompt_ids(messages, gen.max_new_tokens)
        answer = self.start(ids, gen, turns_dropped=dropped)
        for _ in answer:
            pass
        return answer.reply

    def chat_batch(self, conversations: list[list[Message]], gen: GenerationSettings, batch_size: int = 16,
                   progress: str | None = None, seed: int | None = None) -> list[Reply]:
        """Answers for many conversations, batched with left padding (evaluate.py); `progress` labels a bar; `seed`
        seeds each batch's sampling (seed + batch number), so sampled answers repeat.

        On the fast path every batch has one shape (the last is filled up with repeats, the cache sized for the
        longest prompt), so the whole call compiles once instead of once per batch size and length."""
        encoded = [self.prompt_ids(m, gen.max_new_tokens) for m in conversations]
        # Sorting by length keeps padding small; results are put back in input order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        cache_length = max((len(ids) for ids, _ in encoded), default=0) + gen.max_new_tokens
        replies: list[Reply | None] = [None] * len(encoded)
        starts = range(0, len(order), batch_size)
        for number, start in enumerate(tqdm(starts, desc=progress, leave=False, disable=progress is None)):
            idx = order[start:start + batch_size]
            batch = [encoded[i][0] for i in idx]
            if self.fast:
                batch += [batch[0]] * (min(batch_size, len(order)) - len(batch))
            outs = self._submit(batch, gen, cache_length=cache_length,
                                seed=None if seed is None else seed + number).result()[0]
            for i, new in zip(idx, outs):
                replies[i] = reply_for(self.tokenizer, new, encoded[i][1])
        return replies  # type: ignore[return-value]

    def start(self, ids: list[int], gen: GenerationSettings, stop: tuple[str, ...] = (), seed: int | None = None,
              turns_dropped: int = 0) -> AnswerStream:
        """Begin generating the answer to prompt ids (from prompt_ids); iterate the result for the growing text.
        Raises answer_queue.Busy when the queue is full, answer_queue.ShuttingDown after shutdown()."""
        return AnswerStream(self.batcher, self.tokenizer, ids, gen, stop, seed, turns_dropped)

    def stream(self, messages: list[Message], gen: GenerationSettings) -> Iterator[str]:
        """Yields the answer so far, growing token by token; a stop marker is never shown. Closing the generator
        early (a client that left) stops the generation within one decode chunk."""
        ids, dropped = self.prompt_ids(messages, gen.max_new_tokens)
        answer = self.start(ids, gen, turns_dropped=dropped)
        try:
            yield from answer
        finally:
            answer.cancel()

    def shutdown(self, reason: str = "the server is shutting down", timeout: float = 60) -> None:
        """End every answer in flight with an error that says `reason` (streams get it as their last event), refuse
        new ones, and wait until the generation thread is idle."""
        self.batcher.shutdown(reason)
        generation_thread().submit(lambda: None).result(timeout=timeout)

    def close(self) -> None:
        """Free the model now (evaluate.py loads one model at a time): weights, compiled step, caches. The
        ChatModel cannot generate afterwards."""
        self.model = self._decoder = self.batcher = None
        if self.fast:  # compiled code and CUDA-graph trees are per thread: reset them on the generation thread
            generation_thread().submit(torch._dynamo.reset).result()
        gc.unfreeze()  # (warm_up froze it with the rest)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def warm_up(self, gen: GenerationSettings) -> None:
        """Ready the model for its first users: the fast path compiled (_compile_shapes), then what is loaded and
        compiled put out of the garbage collector's full passes, which would otherwise walk it all while every answer
        waits (docs/PERFORMANCE.md; vLLM and SGLang freeze their heaps after warm-up too). close() gives it back to
        the collector."""
        if self.fast:
            self._compile_shapes(gen)
        gc.collect()
        gc.freeze()
        logger.info("%d objects (the model, the compiled code, the libraries) left out of the garbage collector's "
                    "full passes", gc.get_freeze_count())

    def _compile_shapes(self, gen: GenerationSettings) -> None:
        """Compile the fast path at load in every batch shape (one user; up to batch_slots at once:
        BatchDecoder.shapes), capture the prefill graphs of users' prompts, and run once what a burst of users
        costs (several prompts joining a running answer: one compiled prefill of them all) and a prompt alone
        too long for a prefill graph (the same prefill for one prompt), so the first users do not wait for any
        of it. Where the shapes' row lengths are fixed (BatchDecoder.lengths: GPUs with the Triton kernels)
        nothing is compiled after this; elsewhere this compiles the usual length (a short prompt +
        max_new_tokens), and longer chats compile a longer one (at most 2 more per shape) when they first occur."""
        batcher = self.batcher
        if batcher.lengths is not None:
            logger.info("batch shapes (answers x cache slots a row): %s", ", ".join(
                f"{rows} x {length}" for rows, lengths in batcher.lengths.items() for length in lengths))
        batcher.capture_prefill_graphs()
        ids, _ = self.prompt_ids([{"role": "user", "content": "Hello"}], gen.max_new_tokens)
        # Largest shape first, so the KV buffers are allocated once and the smaller shapes' caches view them. For
        # each shape of several rows, one answer running, then the rest of that shape's users at once, with
        # questions of a usual length (~64 tokens): the shape's step, the move to its cache and the prefill of
        # several prompts (its compile; eager, the first such prefill of a process cost more than later ones:
        # docs/PERFORMANCE.md); then one answer alone, the one-row shape.
        word = len(self.tokenizer(" Hello", add_special_tokens=False).input_ids)
        words = "Hello" + " Hello" * max(0, (64 - len(ids)) // max(word, 1))
        question, _ = self.prompt_ids([{"role": "user", "content": words}], gen.max_new_tokens)
        runs = [(rows, *run, "") for rows in reversed(batcher.shapes)
                for run in self._warm_up_runs(rows, ids, question, gen)]
        # A prompt alone longer than the largest prefill graph takes goes through the compiled prefill of prompts,
        # which compiles a graph of its own for one prompt: a prompt one token longer, and one new token
        longest = PREFILL_BUCKETS[-1] + 1
        if batcher.prefill_graphs and longest < self.context_window:
            runs.append((1, (question * longest)[:longest], replace(gen, max_new_tokens=1),
                         batcher.lengths[1][-1] if batcher.lengths else None,
                         f", a prompt of {longest} tokens (longer than a prefill graph takes)"))
        began = time.perf_counter()
        for i, (rows, first, settings, slots, note) in enumerate(runs, 1):
            # each compiles a shape: the person starting the server sees where the minutes go
            logger.info("warm-up %d of %d: %d answer(s) together%s%s", i, len(runs), rows,
                        f", rows of {slots} slots" if slots else "", note)
            answers = [self.start(first, settings)]
            if rows > 1:
                next(iter(answers[0]), None)  # running: the others join it
                answers += [self.start(question, settings) for _ in range(rows - 1)]
            for answer in answers:
                for _ in answer:
                    pass
        logger.info("warm-up done in %.0f s", time.perf_counter() - began)

    def _warm_up_runs(self, rows: int, ids: list[int], question: list[int], gen: GenerationSettings
                      ) -> list[tuple[list[int], GenerationSettings, int | None]]:
        """What warm_up runs for the `rows`-row shape: the first answer's prompt, everyone's settings and the row
        length where it is fixed, once for each row length the shape is compiled at. Sized by need: the usual length
        (a short prompt + gen.max_new_tokens), where the GPU's memory holds the shape. Fixed lengths: each one,
        whatever max_new_tokens a request asks for; answers as long as fit it and the pool together, the first one's
        prompt long enough to need more than the shorter length. Nothing for a shape the GPU's memory cannot hold
        (it is never run)."""
        batcher = self.batcher
        if batcher.lengths is None:
            holds = rows == 1 or batcher.holds(rows, len(question) + gen.max_new_tokens)
            return [(ids, gen, None)] if holds else []
        runs = []
        for shorter, length in zip((0,) + batcher.lengths[rows], batcher.lengths[rows]):
            # as long as the pool holds all of them together (a shape has 512 slots a row at least)
            new = max(1, min(gen.max_new_tokens, min(length, batcher.pool // rows) - len(question)))
            first = ids if len(ids) + new > shorter else (question * length)[:shorter + 1 - new]
            runs.append((first, replace(gen, max_new_tokens=new), length))
        return runs

    def save_merged(self, out_dir: str | Path) -> Path:
        """A standalone model: safetensors weights, tokenizer and a generation config with the right eos/pad."""
        out = Path(out_dir)
        self.model.config.use_cache = True
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id, max_new_tokens=256)
        # Fused layers (fuse_phi_layers) keep dense/fc2 as column views of one matrix; safetensors wants each
        # tensor contiguous, and the file keeps the ordinary layout.
        state = {name: t.contiguous() for name, t in self.model.state_dict().items()}
        self.model.save_pretrained(out, state_dict=state, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        readable_by_transformers_4(out)
        return out


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("inference.device cuda was requested but no CUDA GPU is visible; use auto or cpu")
    return "cuda" if requested == "auto" and torch.cuda.is_available() else ("cpu" if requested == "auto" else requested)


def use_fast_path(icfg: InferenceConfig, device: str) -> bool:
    return icfg.fast == "on" or (icfg.fast == "auto" and device == "cuda")


def load_model_folder(name_or_path: str, cfg: Config, tokenizer=None) -> ChatModel:
    """A whole model (a --save-merged folder, or a base alone) in inference.dtype on inference.device."""
    device = resolve_device(cfg.inference.device)
    if tokenizer is None:
        tokenizer = load_tokenizer(name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    model = load_model(name_or_path, cfg.model, DTYPE_NAMES[cfg.inference.dtype], device)
    return _serving(model, tokenizer, cfg, device, name_or_path)


def trained_base(cfg: Config, adapter_config: dict) -> str:
    """The base the adapter was trained on (its adapter_config), unless --model.name_or_path says otherwise."""
    if "model.name_or_path" in cfg.explicit:
        return cfg.model.name_or_path
    return adapter_config.get("base_model_name_or_path") or cfg.model.name_or_path


def load_chat_model(cfg: Config, allow_pickle: bool = False, warm_up: bool = True) -> ChatModel:
    """The model to chat with (CLI, app, evaluate.py): a merged folder as it is (inference.model, e.g. from
    --save-merged), or base in fp32 -> adapter checked against it -> merged; in inference.dtype on its device."""
    icfg: InferenceConfig = cfg.inference
    device = resolve_device(icfg.device)
    if icfg.model:
        model = load_model_folder(icfg.model, cfg)
    else:
        model = _merge_for_chat(cfg, allow_pickle, device)
    logger.info("the model on %s in %s, fast decoding %s, %d answers decoded together at most", device, icfg.dtype,
                "on" if model.fast else "off", model.batch_slots)
    if warm_up:
        model.warm_up(cfg.generation)
    return model


def _merge_for_chat(cfg: Config, allow_pickle: bool, device: str) -> ChatModel:
    icfg = cfg.inference
    adapter_dir = adapter_dir_for(cfg)
    adapter_config = read_adapter_config(adapter_dir, allow_pickle=allow_pickle)
    base_name = trained_base(cfg, adapter_config)
    check_adapter_base(adapter_dir, base_name, adapter_config)
    # the adapter's own tokenizer (saved with it), else the configured one, else the base's
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else \
        cfg.model.tokenizer or base_name
    tokenizer = load_tokenizer(tokenizer_source, cfg.model.revision, cfg.model.trust_remote_code)
    base = load_model(base_name, cfg.model, torch.float32)  # fp32, on the CPU: merged there, moved after
    check_adapter_fits(adapter_dir, base_name, base, adapter_config)
    merged, diff = merge_adapter(base, adapter_dir, tokenizer)
    logger.info("merged %s into %s (fp32); max |logit diff| merged vs unmerged on a probe: %.2e",
                adapter_dir, base_name, diff)
    merged = merged.to(device=device, dtype=DTYPE_NAMES[icfg.dtype])
    return _serving(merged, tokenizer, cfg, device, adapter_dir)


def model_id(served: str | Path) -> str:
    """The name the API gives a served folder: its own name; a training run's `final` or `checkpoint-N` adapter is
    named after its run (`model/final` -> `model`, `runs/a/checkpoint-200` -> `a-checkpoint-200`)."""
    path = Path(served)
    if path.name == "final" and path.parent.name:
        return path.parent.name
    if path.name.startswith("checkpoint-") and path.parent.name:
        return f"{path.parent.name}-{path.name}"
    return path.name or str(served)


def _serving(model, tokenizer, cfg: Config, device: str, served: str | Path) -> ChatModel:
    slots, budget = serving_slots(cfg.inference.batch_slots, model)
    return ChatModel(model, tokenizer, fast=use_fast_path(cfg.inference, device), batch_slots=slots,
                     max_waiting=cfg.app.max_queue, name=cfg.app.model_id or model_id(served), kv_budget=budget)


def serving_slots(requested: int, model) -> tuple[int, int | None]:
    """inference.batch_slots (0, auto: 64 on a GPU, 8 on the CPU) and, on a GPU, the bytes its KV cache may take
    (phi_layers.kv_budget_for; answers wait rather than pass it), logged with the estimate they came from."""
    if model.device.type != "cuda":
        return requested or 8, None
    slots = requested or ROW_BUCKETS[-1]
    window = int(getattr(model.config, "max_position_embeddings", 2048))
    per_token = kv_bytes_per_token(model.config, model.dtype)
    free, total = torch.cuda.mem_get_info(model.device)
    budget = kv_budget_for(free, total)
    tokens = max(0, budget) // per_token
    logger.info("%d answers decoded together at most, their KV cache within %.1f GiB (%.1f of %.1f GiB free after the "
                "model, less a reserve): %d KiB a token in %s, so %d tokens, each answer taking its prompt + "
                "max_new_tokens: %d answers of 512 tokens at once, %d of %d", slots, budget / 2**30, free / 2**30,
                total / 2**30, per_token >> 10, str(model.dtype).removeprefix("torch."), tokens,
                max(1, min(slots, tokens // 512)), max(1, min(slots, tokens // window)), window)
    return slots, budget


def chat_loop(model: ChatModel, gen: GenerationSettings, read=input, write=print) -> None:
    """Interactive multi-turn chat; /reset clears the history, /exit or Ctrl-D leaves."""
    history: list[Message] = []
    write("Chat with the model. /reset clears the history, /exit quits.")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = []
            write("(history cleared)")
            continue
        if not line.strip():
            write("(empty message: type a question)")
            continue
        messages = history + [{"role": "user", "content": line}]
        try:
            ids, dropped = model.prompt_ids(messages, gen.max_new_tokens)
        except PromptTooLong as e:
            write(f"(not sent: {e})")
            continue
        if dropped:
            write(f"(the oldest {dropped} turn(s) no longer fit the context window and were left out)")
            history = history[2 * dropped:]
            messages = history + [{"role": "user", "content": line}]
        answer = _stream_to(model, messages, gen, write)
        history = messages + [{"role": "assistant", "content": answer}]


def _stream_to(model: ChatModel, messages: list[Message], gen: GenerationSettings, write) -> str:
    """Prints the answer as it grows when `write` is print; otherwise hands `write` the finished answer."""
    shown = ""
    for text in model.stream(messages, gen):
        if write is print and text.startswith(shown):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
        shown = text
    if write is print:
        print()
    else:
        write(shown)
    return shown


def add_inference_arguments(parser) -> None:
    parser.add_argument("--prompt", help="ask one question and print the streamed answer")
    parser.add_argument("--chat", action="store_true", help="interactive multi-turn chat in the terminal")
    parser.add_argument("--save-merged", metavar="DIR", help="write the merged model as a standalone folder")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept an adapter saved only as pickle (.bin); pickle can run code when loaded")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, __doc__, extra=add_inference_arguments)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    if not (args.prompt or args.chat or args.save_merged):
        logger.error("nothing to do: pass --prompt \"...\", --chat or --save-merged DIR")
        return 2
    if not cfg.inference.batch_slots:  # auto: the terminal has one user, whose one-row shape is all the warm-up needs
        cfg.inference.batch_slots = 1
    try:
        model = load_chat_model(cfg, allow_pickle=args.allow_pickle, warm_up=bool(args.prompt or args.chat))
        if args.save_merged:
            logger.info("merged model written to %s", model.save_merged(args.save_merged))
        if args.prompt:
            _stream_to(model, [{"role": "user", "content": args.prompt}], cfg.generation, print)
        if args.chat:
            chat_loop(model, cfg.generation)
    except (AdapterError, ModelLoadError, ValueError) as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
