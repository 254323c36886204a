"""Typed configuration for every entry point: YAML file + command-line overrides, validated all at once.

    python train.py --config configs/phi2-oasst1.yaml --lora.r 32 --training.learning_rate 1e-4
    python train.py --help          # every key, its default and what it trades off

One dataclass per concern; each entry point asks only for the sections it needs and hands each function only its
own section. Precedence: dataclass default < YAML file < command line. Unknown keys (in the file or on the command
line) are errors, and `validate` collects every problem before raising once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DTYPES = ("auto", "bf16", "fp16", "fp32")


def doc(default: Any, help: str, secret: bool = False) -> Any:
    """A dataclass field with its one-line documentation (shown by --help and in docs/CONFIG.md). A secret field is
    never written to a saved config (config.yaml next to checkpoints and adapters, which people share)."""
    metadata = {"help": help, "secret": secret}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    name_or_path: str = doc("microsoft/phi-2", "Hub id or local folder of the base model")
    revision: str | None = doc(None, "Hub commit/tag to pin the base model to (reproducible runs); None = main")
    tokenizer: str | None = doc(None, "Hub id or folder of the tokenizer; None = same as the model")
    trust_remote_code: bool = doc(False, "run model code shipped with the checkpoint (Phi-2 is native: keep off)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = doc(
        "auto", "compute dtype; auto = bf16 on GPUs that have it, fp32 on older GPUs and the CPU")
    attn_implementation: Literal["auto", "varlen", "sdpa", "eager", "flex_attention"] = doc(
        "auto", "attention kernel; auto = varlen (FlashAttention-2 within packed conversations) when packing on a "
                "bf16 GPU, else sdpa")


@dataclass
class QuantizationConfig:
    mode: Literal["nf4", "fp4", "int8", "none"] = doc(
        "nf4", "base weight storage: nf4 (QLoRA), fp4, int8, or none (plain LoRA, ~4x the weight memory)")
    double_quant: bool = doc(True, "quantize the 4-bit scales too: ~0.4 bit/param less memory, slightly slower")
    storage: Literal["uint8", "compute"] = doc(
        "uint8", "dtype the packed 4-bit weights are stored in; 'compute' (= the compute dtype) lets FSDP shard them")
    products: Literal["auto", "dequantized", "fp8"] = doc(
        "auto", "how the frozen 4-bit layers multiply in training: dequantized (QLoRA: the 4-bit weights dequantized "
                "to the compute dtype in every product); fp8 (dequantized once into fp8, activations and gradients "
                "rounded to fp8 per row: 1.24x the steps on an H200, fp8 rounding, 1 byte a weight more, 2 where "
                "memory allows); auto = fp8 for compiled bf16 runs on fp8 GPUs (Ada, Hopper), dequantized elsewhere")


@dataclass
class LoraSettings:
    r: int = doc(64, "adapter rank; higher learns more and costs memory linearly")
    alpha: int = doc(16, "scaling numerator (effective scale alpha/r)")
    dropout: float = doc(0.05, "dropout on the adapter input; 0 is faster and lets kernels fuse")
    target_modules: list[str] = doc(
        ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], "linear layers that get adapters (Phi-2 names)")
    bias: Literal["none", "all", "lora_only"] = doc("none", "which biases to train")


@dataclass
class DataConfig:
    dataset: str = doc("OpenAssistant/oasst1", "Hub dataset id, or a local file/folder (parquet, jsonl, json, csv)")
    revision: str | None = doc(None, "Hub commit/tag of the dataset")
    languages: list[str] = doc([], "keep only these oasst1 `lang` codes; empty = all languages")
    validation_fraction: float = doc(
        0.05, "share of conversations held out when the data has no validation split (split by tree)")
    max_length: int = doc(2048, "tokens per training sequence (Phi-2's context is 2048)")
    max_train_conversations: int | None = doc(None, "cap on training conversations (quick experiments); None = all")
    max_eval_conversations: int | None = doc(None, "cap on validation conversations; None = all")
    seed: int = doc(42, "seed of the tree-level train/validation split")


@dataclass
class TrainingConfig:
    method: Literal["sft", "dpo"] = doc(
        "sft", "sft: supervised on the chat answers; dpo: preference pairs (section preference), continuing from an "
               "SFT adapter, which is also DPO's reference")
    output_dir: str = doc("model", "checkpoints go to <output_dir>/checkpoint-<step>, the adapter to <output_dir>/final")
    num_train_epochs: float = doc(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = doc(-1, "stop after this many optimizer steps; -1 = use num_train_epochs")
    memory_plan: Literal["auto", "off"] = doc(
        "auto", "auto: on a CUDA GPU (not under FSDP), micro-batch, accumulation and gradient checkpointing that the "
                "config file and command line leave unset are chosen from the GPU's free memory, keeping micro-batch "
                "x accumulation (logged with the estimate); off: the values below as they are")
    memory_budget_gib: float | None = doc(
        None, "GPU memory this run may use: the plan sizes for it and the process is capped to it (a shared GPU); "
              "None = the GPU's free memory at start")
    per_device_train_batch_size: int = doc(
        4, "sequences per micro-batch per GPU; bigger is faster until memory runs out (on a GPU: the memory plan's)")
    per_device_eval_batch_size: int = doc(8, "sequences per evaluation batch")
    gradient_accumulation_steps: int = doc(
        4, "micro-batches per optimizer step (effective batch = micro x accum x GPUs; on a GPU: the memory plan's)")
    learning_rate: float = doc(2e-4, "peak learning rate of the adapters")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = doc(
        "cosine", "learning-rate schedule after warm-up")
    warmup_ratio: float = doc(0.03, "fraction of the steps spent warming up the learning rate")
    weight_decay: float = doc(0.0, "AdamW weight decay on the adapters")
    max_grad_norm: float = doc(1.0, "gradient clipping norm (0 disables)")
    optim: str = doc("auto", "optimizer name from transformers; auto = on a GPU adamw_torch_fused, or paged_adamw_8bit "
                             "with gradient checkpointing (memory tight); adamw_torch on CPU")
    gradient_checkpointing: bool = doc(
        True, "recompute activations in backward: slower steps, far less activation memory (on a GPU: the plan's)")
    packing: bool = doc(True, "pack conversations into full sequences (no padding, no cross-attention between them)")
    torch_compile: Literal["auto", "on", "off"] = doc(
        "auto", "compile the model: faster steps after a slow first one; auto = on for bf16 GPUs, off elsewhere")
    autocast: Literal["auto", "on", "off"] = doc(
        "auto", "bf16 compute only. on: autocast, with layer norms, embeddings, lm_head and the residual stream in "
                "fp32 (peft's k-bit preparation); off: every weight and activation in bf16 (torchtune's recipe): "
                "faster steps, less activation memory; auto = off, on under FSDP")
    compile_scope: Literal["regions", "model"] = doc(
        "regions", "with torch_compile: regions compiles one decoder layer and reuses it for all of them (compiles "
                   "in a fraction of the time); model compiles the whole model as one graph")
    logging_steps: int = doc(10, "optimizer steps between log lines")
    eval_steps: int = doc(200, "optimizer steps between validation-loss evaluations; the last step is always "
                               "evaluated (0 = only there)")
    save_steps: int = doc(200, "optimizer steps between checkpoints")
    save_total_limit: int | None = doc(3, "keep at most this many checkpoints (oldest deleted first); None = all")
    report_to: list[str] = doc(["tensorboard"], "trackers for transformers' Trainer (tensorboard, wandb, none, ...)")
    dataloader_num_workers: int = doc(0, "worker processes that collate batches")
    seed: int = doc(42, "seed of adapter init, shuffling and dropout")


# Sampling divides the scores by the temperature: below this floor the quotient overflows fp32 (1e-300 gave inf, a
# NaN softmax and a failed sampler), and the distribution is one token anyway, so such temperatures decode greedily.
MIN_TEMPERATURE = 1e-5


@dataclass
class PreferenceConfig:
    sft_adapter: str | None = doc(None, "training.method dpo: the SFT adapter DPO continues from and measures against "
                                        "(its reference), e.g. model/final")
    beta: float = doc(0.1, "DPO's beta: how far the adapter may move from the reference; higher keeps it closer")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = doc("sigmoid", "DPO's loss, TRL's names (sigmoid: the paper's)")
    max_pairs_per_prompt: int = doc(3, "oasst1: pairs one prompt gives at most (its best-ranked reply against each "
                                       "worse one, best first)")


@dataclass
class GenerationSettings:
    max_new_tokens: int = doc(256, "upper bound on the answer length in tokens")
    temperature: float = doc(0.7, f"sampling temperature, 0 to 2; below {MIN_TEMPERATURE:g} (0 too) greedy, "
                                  "deterministic")
    top_p: float = doc(0.9, "nucleus sampling: keep the smallest token set with this much probability (0.01 to 1)")
    top_k: int = doc(50, "sample only among the k most likely tokens (0 = off)")
    repetition_penalty: float = doc(1.1, ">1 discourages repeating tokens")

    @property
    def samples(self) -> bool:
        """Whether answers are sampled; below MIN_TEMPERATURE they are greedy."""
        return self.temperature >= MIN_TEMPERATURE


# What a request may set (the app's page, gradio_client and the API alike) and its range; checked in one place,
# request_settings. max_new_tokens is also bounded by the context window left after the prompt.
REQUEST_LIMITS: dict[str, tuple[type, float, float]] = {
    "max_new_tokens": (int, 1, math.inf),
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.01, 1.0),
}


class SettingsError(ValueError):
    """Generation settings a request may not use; `param` names the first bad one in the caller's own words."""

    def __init__(self, problems: list[str], param: str):
        super().__init__("; ".join(problems))
        self.problems, self.param = problems, param


def request_settings(defaults: GenerationSettings, given: dict[str, Any], context_window: int,
                     names: dict[str, str] | None = None) -> GenerationSettings:
    """The defaults with a request's values (None keeps the default), each checked against REQUEST_LIMITS; raises
    SettingsError listing every bad value under the name the caller knows it by (`names`: "max_tokens" for the
    API, say). Numbers only: a bool or a string is refused, an integral float is an integer (a slider's 40.0)."""
    names = names or {}
    problems, first, values = [], None, {}
    for key, value in given.items():
        if value is None:
            continue
        kind, low, high = REQUEST_LIMITS[key]
        if key == "max_new_tokens":
            high = context_window - 1
        name = names.get(key, key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if kind is int and number and float(value).is_integer():
            value = int(value)
        if not number or (kind is int and not isinstance(value, int)) or not low <= value <= high:
            what = "an integer" if kind is int else "a number"
            problems.append(f"{name} must be {what} between {low:g} and {high:g} (got {value!r})")
            first = first or name
            continue
        values[key] = kind(value)
    if problems:
        raise SettingsError(problems, first)
    return dataclasses.replace(defaults, **values)


@dataclass
class InferenceConfig:
    adapter: str | None = doc(None, "adapter folder; None = <training.output_dir>/final")
    model: str | None = doc(None, "a whole model folder to serve as it is (e.g. from --save-merged) instead of "
                                  "merging the adapter into its base")
    dtype: Literal["fp32", "bf16", "fp16"] = doc("fp32", "dtype of the merged model (fp32: 11 GB; bf16/fp16: 5.6 GB)")
    device: Literal["auto", "cuda", "cpu"] = doc("auto", "where to run; auto = cuda when available")
    fast: Literal["auto", "on", "off"] = doc(
        "auto", "static KV cache + compiled decode step; auto = on for CUDA, off on CPU")
    batch_slots: int = doc(0, "chat answers decoded together at most (continuous batching: app, API and CLI "
                              "users); 0 = 64 on a GPU, 8 on the CPU. On a GPU answers also wait while their KV "
                              "cache (each its prompt + max_new_tokens) would pass what its free memory holds "
                              "(Phi-2: 320 KiB a token in bf16)")


@dataclass
class AppConfig:
    host: str = doc("127.0.0.1", "address to bind; anything but loopback requires --app.auth")
    port: int = doc(7860, "port to serve on")
    share: bool = doc(False, "create a public gradio.live link (off: the model stays on your machine)")
    auth: str | None = doc(None, "user:password required to open the app; the API takes the password as its "
                                 "bearer key. Never saved to a config file", secret=True)
    max_queue: int = doc(32, "chat requests (page and API together) that may wait for one of inference.batch_slots; "
                             "more are turned away at once: the API with 429 and Retry-After, the page with a notice")
    model_id: str | None = doc(None, "the model's name in the API (/v1/models, responses, the `model` a request "
                                     "must name); None = the served adapter's folder name (its run's for `final`) "
                                     "or the model folder's")
    max_messages: int = doc(64, "most messages in one conversation the app or the API accepts")
    max_chars: int = doc(32000, "most characters in one conversation (all messages) the app or the API accepts")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "quantization": QuantizationConfig,
    "lora": LoraSettings,
    "data": DataConfig,
    "training": TrainingConfig,
    "preference": PreferenceConfig,
    "generation": GenerationSettings,
    "inference": InferenceConfig,
    "app": AppConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    app: AppConfig = field(default_factory=AppConfig)
    explicit: set[str] = field(default_factory=set, repr=False)  # "section.key"s set by the file or the CLI

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every section as plain values, secret fields (app.auth) as None: what may be saved or shown."""
        return {name: {f.name: None if f.metadata.get("secret") else getattr(getattr(self, name), f.name)
                       for f in dataclasses.fields(getattr(self, name))} for name in SECTIONS}


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check/convert one value against its annotation; a problem is recorded instead of raised."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, problems)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            return "on" if value else "off"  # YAML 1.1 reads an unquoted on/off as a boolean
        if value not in args:
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return value
        return [_coerce(v, args[0], key, problems) for v in value]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        # YAML gives numbers, the command line gives strings; bools are ints in Python but never valid here.
        accepted = (int, str) if tp is int else (int, float, str)
        what = "an integer" if tp is int else "a number"
        try:
            if isinstance(value, bool) or not isinstance(value, accepted):
                raise ValueError
            return tp(value)
        except ValueError:
            problems.append(f"{key}: expected {what}, got {value!r}")
            return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            problems.append(f"{key}: expected a string, got {value!r}")
            return value
        return str(value)
    return value


def build_config(values: dict[str, dict[str, Any]], problems: list[str]) -> Config:
    """Merge nested {section: {key: value}} onto the defaults, recording unknown keys and type errors."""
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        given = values.get(name) or {}
        if not isinstance(given, dict):
            problems.append(f"{name}: expected a mapping of keys, got {given!r}")
            given = {}
        types = _field_types(cls)
        kwargs = {}
        for key, value in given.items():
            if key not in types:
                allowed = ", ".join(sorted(types))
                problems.append(f"{name}.{key}: unknown key (allowed in {name}: {allowed})")
                continue
            kwargs[key] = _coerce(value, types[key], f"{name}.{key}", problems)
        sections[name] = cls(**kwargs)
    for name in values:
        if name not in SECTIONS:
            problems.append(f"{name}: unknown section (allowed: {', '.join(SECTIONS)})")
    return Config(**sections)


def validate(cfg: Config, problems: list[str] | None = None) -> None:
    """Range and consistency checks; raises ConfigError listing every problem (type errors included)."""
    problems = list(problems or [])
    m, lo, d, t, g, a = cfg.model, cfg.lora, cfg.data, cfg.training, cfg.generation, cfg.app

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    def num(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    need(bool(m.name_or_path), "model.name_or_path: must name a Hub id or a local folder")
    need(num(lo.r) and lo.r > 0, f"lora.r: must be > 0 (got {lo.r})")
    need(num(lo.alpha) and lo.alpha > 0, f"lora.alpha: must be > 0 (got {lo.alpha})")
    need(num(lo.dropout) and 0 <= lo.dropout < 1, f"lora.dropout: must be in [0, 1) (got {lo.dropout})")
    need(bool(lo.target_modules), "lora.target_modules: name at least one linear layer (e.g. q_proj)")
    need(num(d.validation_fraction) and 0 < d.validation_fraction < 1,
         f"data.validation_fraction: must be in (0, 1) (got {d.validation_fraction})")
    need(num(d.max_length) and d.max_length >= 16, f"data.max_length: must be >= 16 tokens (got {d.max_length})")
    for key in ("max_train_conversations", "max_eval_conversations"):
        v = getattr(d, key)
        need(v is None or (num(v) and v > 0), f"data.{key}: must be > 0 or None (got {v})")
    need(num(t.learning_rate) and t.learning_rate > 0, f"training.learning_rate: must be > 0 (got {t.learning_rate})")
    need(num(t.num_train_epochs) and t.num_train_epochs > 0,
         f"training.num_train_epochs: must be > 0 (got {t.num_train_epochs})")
    need(num(t.max_steps) and (t.max_steps == -1 or t.max_steps > 0),
         f"training.max_steps: must be -1 (use epochs) or > 0 (got {t.max_steps})")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps"):
        v = getattr(t, key)
        need(num(v) and v > 0, f"training.{key}: must be > 0 (got {v})")
    need(num(t.eval_steps) and t.eval_steps >= 0, f"training.eval_steps: must be >= 0 (got {t.eval_steps})")
    need(t.memory_budget_gib is None or (num(t.memory_budget_gib) and t.memory_budget_gib > 0),
         f"training.memory_budget_gib: must be > 0 or None (got {t.memory_budget_gib})")
    need(t.save_total_limit is None or (num(t.save_total_limit) and t.save_total_limit > 0),
         f"training.save_total_limit: must be > 0 or None (got {t.save_total_limit})")
    need(num(t.warmup_ratio) and 0 <= t.warmup_ratio < 1, f"training.warmup_ratio: must be in [0, 1) (got {t.warmup_ratio})")
    need(num(t.weight_decay) and t.weight_decay >= 0, f"training.weight_decay: must be >= 0 (got {t.weight_decay})")
    need(num(t.max_grad_norm) and t.max_grad_norm >= 0, f"training.max_grad_norm: must be >= 0 (got {t.max_grad_norm})")
    need(num(t.dataloader_num_workers) and t.dataloader_num_workers >= 0,
         f"training.dataloader_num_workers: must be >= 0 (got {t.dataloader_num_workers})")
    need(m.dtype != "fp16",
         "model.dtype: fp16 training is refused: Phi-2's attention overflows in fp16, and trl keeps QLoRA adapter "
         "weights in bf16, which the fp16 grad scaler rejects. Use model.dtype: auto (bf16, or fp32 on GPUs "
         "without bf16 such as the T4); fp16 remains available for serving via inference.dtype")
    try:  # the limits every request is held to (request_settings): the defaults are held to them too
        request_settings(GenerationSettings(), {k: getattr(g, k) for k in REQUEST_LIMITS}, math.inf,
                         {k: f"generation.{k}" for k in REQUEST_LIMITS})
    except SettingsError as e:
        problems += e.problems
    need(num(g.top_k) and g.top_k >= 0, f"generation.top_k: must be >= 0 (got {g.top_k})")
    need(num(g.repetition_penalty) and g.repetition_penalty > 0,
         f"generation.repetition_penalty: must be > 0 (got {g.repetition_penalty})")
    pref = cfg.preference
    need(t.method != "dpo" or bool(pref.sft_adapter),
         "preference.sft_adapter: DPO continues from an SFT adapter and uses it as its reference; set it (e.g. "
         "model/final, after `python train.py`)")
    need(num(pref.beta) and pref.beta > 0, f"preference.beta: must be > 0 (got {pref.beta})")
    need(num(pref.max_pairs_per_prompt) and pref.max_pairs_per_prompt > 0,
         f"preference.max_pairs_per_prompt: must be > 0 (got {pref.max_pairs_per_prompt})")
    need(num(cfg.inference.batch_slots) and cfg.inference.batch_slots >= 0,
         f"inference.batch_slots: must be >= 0, 0 for what the GPU memory holds (got {cfg.inference.batch_slots})")
    need(num(a.port) and 0 < a.port < 65536, f"app.port: must be in 1..65535 (got {a.port})")
    user, _, password = (a.auth or "").partition(":")
    need(a.auth is None or (isinstance(a.auth, str) and ":" in a.auth and user.strip() != "" and password != ""),
         "app.auth: must look like user:password, with neither part empty (an empty password would let anyone in)")
    need(num(a.max_queue) and a.max_queue > 0, f"app.max_queue: must be > 0 (got {a.max_queue})")
    need(num(a.max_messages) and a.max_messages > 0, f"app.max_messages: must be > 0 (got {a.max_messages})")
    need(num(a.max_chars) and a.max_chars > 0, f"app.max_chars: must be > 0 (got {a.max_chars})")
    if a.share and a.auth is None:
        problems.append("app.share: a public gradio.live link exposes the model to anyone with the link; set "
                        "--app.auth user:password as well (or drop --app.share)")
    if a.host not in ("127.0.0.1", "localhost", "::1") and a.auth is None:
        problems.append(f"app.host: binding to {a.host!r} exposes the model to the network; set --app.auth "
                        "user:password (or keep the default 127.0.0.1)")
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(problems)


def load_yaml(path: str | Path, problems: list[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        problems.append(f"--config: no such file {str(path)!r} (see configs/ for the presets)")
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        problems.append(f"--config {path}: not valid YAML: {e}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"--config {path}: the top level must be a mapping of sections (model:, lora:, ...)")
        return {}
    return data


def load_config(path: str | Path) -> Config:
    """A saved config.yaml (next to an adapter) as a validated Config; raises ConfigError."""
    problems: list[str] = []
    cfg = build_config(load_yaml(path, problems), problems)
    validate(cfg, problems)
    return cfg


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config plus one --section.key flag per field, documented from the dataclasses."""
    parser.add_argument("--config", help="YAML file with the sections below (CLI flags override it)")
    for name, cls in SECTIONS.items():
        group = parser.add_argument_group(name)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            group.add_argument(f"--{name}.{f.name}", dest=f"{name}.{f.name}", default=argparse.SUPPRESS,
                               metavar="V",
                               help=f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%"))


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults < YAML < CLI, validated; raises ConfigError with every problem."""
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {}
    if getattr(args, "config", None):
        values = load_yaml(args.config, problems)
    for dest, value in vars(args).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            if not isinstance(values.get(section), dict):
                values[section] = {}
            values[section][key] = yaml.safe_load(value) if isinstance(value, str) and value[:1] in "[{" else value
    cfg = build_config(values, problems)
    cfg.explicit = {f"{section}.{key}" for section, keys in values.items() if isinstance(keys, dict) for key in keys}
    validate(cfg, problems)
    return cfg


def parse_config(argv: list[str] | None = None, description: str = "",
                 extra: typing.Callable[[argparse.ArgumentParser], None] | None = None
                 ) -> tuple[Config, argparse.Namespace]:
    """The one parser of every entry point. `extra` adds the entry point's own flags (e.g. --prompt)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(parser)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return cfg, args


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config, secrets left out; `--config` on this file reproduces the run."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def reference_markdown() -> str:
    """Every key with its default and documentation: the source of docs/CONFIG.md."""
    lines = ["# Configuration reference", "",
             "Generated by `python config.py > docs/CONFIG.md`; a test keeps it in sync with config.py.",
             "Set a key in a YAML file (`section:` then `key: value`) or on the command line (`--section.key value`).",
             ""]
    for name, cls in SECTIONS.items():
        lines += [f"## {name}", "", "| key | default | meaning |", "| --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{f.name}` | `{default}` | {f.metadata.get('help', '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
