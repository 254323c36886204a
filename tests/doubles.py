"""Test doubles: real Phi models whose next token is forced (a script, a near tie), and helpers that start and
finish several answers; shared by the engine's and the app's tests."""

from __future__ import annotations

import dataclasses
import time

import torch
from transformers import PhiForCausalLM

from config import GenerationSettings
from conftest import TINY
from inference import ChatModel


def limited(gen: GenerationSettings, max_new_tokens: int) -> GenerationSettings:
    """The same settings for another number of new tokens."""
    return dataclasses.replace(gen, max_new_tokens=max_new_tokens)


GREEDY = GenerationSettings(max_new_tokens=40, temperature=0.0)


ARGMAX = GenerationSettings(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)  # no penalty: FastDecoder
# picks one row's tokens inside its compiled step (_greedy_step)


class ScriptedPhi(PhiForCausalLM):
    """A real PhiForCausalLM whose next token follows a script, to drive transformers' generate loop and the engines.
    The script is forced where every pass goes, whether through forward or the layers and lm_head on their own (a
    group prefill): the layers' pass is counted and timed, and lm_head's scores replaced."""

    script: list[int] = []
    prompt_len = 0
    calls = 0  # passes of all instances (plain path: one per generated token)
    delay = 0.0  # seconds per pass: a model slow enough for a person to press Stop while it writes

    def __init__(self, config):
        super().__init__(config)
        self.model.register_forward_pre_hook(self._passing, with_kwargs=True)
        self.lm_head.register_forward_hook(self._forced)
        self.step = 0

    def _passing(self, module, args, kwargs):
        type(self).calls += 1
        if self.delay:  # (only then: dynamo cannot trace the sleep of a compiled pass, and warns)
            time.sleep(self.delay)
        # tokens generated before this one, by the position of the last input (BatchDecoder's cache has no one
        # length: each row has its own)
        position_ids, cache = kwargs.get("position_ids"), kwargs.get("past_key_values")
        last = cache.get_seq_length() - 1 if position_ids is None else int(position_ids[0, -1])
        self.step = last + 1 - self.prompt_len

    def _forced(self, module, args, scores):
        forced = torch.full_like(scores, -1e9)
        forced[..., self.script[min(self.step, len(self.script) - 1)]] = 0
        return forced


def scripted(tokenizer, text: str, tail: list[int] | None = None, fast: bool = False
             ) -> tuple[ChatModel, list[dict]]:
    model = ScriptedPhi.from_pretrained(TINY).eval()
    model.script = tokenizer(text, add_special_tokens=False)["input_ids"] + (tail or [])
    chat = ChatModel(model, tokenizer, fast=fast)
    messages = [{"role": "user", "content": "Say something"}]
    model.prompt_len = len(chat.prompt_ids(messages, 64)[0])
    return chat, messages


class TiedPhi(PhiForCausalLM):
    """A real PhiForCausalLM whose every next-token distribution is a near tie: `top` at logit 1.0, `runner_up` at
    0.95, all else far below (lm_head's scores replaced, whatever calls it). A repetition penalty of 1.1 on `top`
    (1.0 / 1.1 = 0.91) flips the choice."""

    top = 0
    runner_up = 1

    def __init__(self, config):
        super().__init__(config)
        self.lm_head.register_forward_hook(self._tied)

    def _tied(self, module, args, scores):
        forced = torch.full_like(scores, -1e9)
        forced[..., self.top], forced[..., self.runner_up] = 1.0, 0.95
        return forced


def tied(tokenizer, top: int, runner_up: int, fast: bool) -> ChatModel:
    model = TiedPhi.from_pretrained(TINY).eval()
    model.top, model.runner_up = top, runner_up
    return ChatModel(model, tokenizer, fast=fast)


PENALIZED = GenerationSettings(max_new_tokens=6, temperature=0.0, repetition_penalty=1.1)


def endless(tokenizer, fast: bool, delay: float = 0.0) -> tuple[ChatModel, list[dict]]:
    """A model that never emits EOS or the marker: it would run to max_new_tokens unless stopped."""
    chat, messages = scripted(tokenizer, " la" * 400, fast=fast)
    chat.model.delay = delay
    return chat, messages


TOGETHER = [[{"role": "user", "content": q}] for q in (
    "What is the capital of Peru?", "Hi", "What is the capital of France?", "Name a color.",
    "Can you tell me the capital of Peru, please? I keep forgetting it.")] + [[
        {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And what is the capital of Peru, the country in South America?"}]]


def start_all(chat, conversations, gen, seeds=None):
    return [chat.start(chat.prompt_ids(c, gen.max_new_tokens)[0], gen, seed=None if seeds is None else seeds[i])
            for i, c in enumerate(conversations)]


def finish(answers):
    for answer in answers:
        for _ in answer:
            pass
    return [a.reply for a in answers]
