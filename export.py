"""Take the fine-tuned model to other tools: a merged folder that transformers 4.x and 5.x read right, GGUF files for
llama.cpp, Ollama and LM Studio, and an Ollama Modelfile, each checked against the merged model before it is kept.

    python export.py --config configs/smoke.yaml --out exported/smoke       # the smoke adapter, on the CPU
    python export.py --out exported/phi2                                    # model/final merged into Phi-2
    python export.py --inference.model merged/ --out exported/phi2          # a merged folder as it is
    python export.py --out exported/phi2 --outtype f16 q8_0 q4_k_m          # GGUF types (default: f16 q8_0)
    python export.py --out exported/phi2 --lora                             # also the adapter alone as a GGUF

Writes <out>/merged/ (fp32 safetensors, tokenizer, chat template), <out>/<name>-<type>.gguf per --outtype,
<out>/Modelfile (Ollama: our template, the `### Human:` and EOS stop strings, greedy by default) and, with --lora,
<out>/<name>-lora-f16.gguf (llama.cpp's `--lora`, Ollama's ADAPTER; on top of a GGUF of the base model).

The GGUF files come from llama.cpp's own converter (convert_hf_to_gguf.py, convert_lora_to_gguf.py) and its gguf-py
(0.19.0), as released together in llama-cpp-python 0.3.36's source distribution on PyPI (LLAMA_CPP_SOURCE: pinned
by version and sha256). On first use the file is fetched with pip from the package index (no hub, no git clone) into
~/.cache/phi2-qlora/ and the converter is unpacked from it; the gguf 0.19.0 wheel on PyPI is an older cut that this
converter does not run with, so the gguf-py beside it is used. q4_k_m needs llama.cpp's runtime (llama-cpp-python,
built from that same source: `make llama-runtime`, about 9 minutes on 2 cores, once per machine).

The converter recognises a tokenizer by a hash of the ids it gives a test string. The repo's tokenizers (Phi-2's,
the smoke model's) are byte-level BPE with GPT-2's split and no normaliser, which llama.cpp calls `phi-2`; a hash it
does not know is mapped to that only when tokenizer.json says exactly so, otherwise the export stops and says why.

The self-check (check_gguf) reads each file back with gguf-py: the architecture metadata must be the config's, the
chat template ours byte for byte, the tokenizer rebuilt from the file's vocabulary and merges must give our ids on
hard strings, and the weights, dequantized into the model, must give the merged model's greedy tokens (a token may
differ only where the merged model's two best logits are closer than the dequantized weights moved them). A
mismatch removes the file and stops the export with exit code 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adapter_utils import AdapterError
from config import Config, GenerationSettings, parse_config
from data_utils import CHAT_TEMPLATE, HUMAN
from inference import ChatModel, adapter_dir_for, load_chat_model, model_id
from model_utils import ModelLoadError

logger = logging.getLogger("export")

LLAMA_CPP_SOURCE = ("llama-cpp-python", "0.3.36",
                    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
# Strings that tell tokenizers apart: emoji (several code points), tabs, runs of spaces, CJK, long text.
HARD_STRINGS = ["Hello 🚀 world 😶\u200d🌫️!", "tab\tand\t\ttabs", "runs   of    spaces     here", "我想在apple工作 1314",
                "### Human: a forged turn ### Assistant: ok", "line\n\nbreaks\r\n", "x" * 300 + " long " * 200]
PROBES = ["What is the capital of France?", "Write one sentence about the sea.", "Hi"]
# How far a GGUF's logits may move from the merged model's, as RMS of the difference over RMS of the logits, by type:
# about 10x what each type gave on the smoke model (f16 5e-4, q8_0 0.009-0.028) -- a GGUF of another model (the base
# without the adapter) was 1.4 -- and more for q4_k_m, whose rounding is coarser.
RELATIVE_ERROR = {"f32": 1e-4, "f16": 0.01, "bf16": 0.02, "q8_0": 0.1, "q4_k_m": 0.3}


class ExportError(RuntimeError):
    """The export could not be made or did not check out; the message says what and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi2-qlora"


def llama_cpp_tools(cache: Path | None = None) -> Path:
    """The folder holding llama.cpp's converter and gguf-py from the pinned source release, fetched once."""
    name, version, sha256 = LLAMA_CPP_SOURCE
    cache = cache or cache_dir()
    tools = cache / f"llama.cpp-{version}"
    if (tools / "convert_hf_to_gguf.py").is_file():
        return tools
    archive = cache / f"{name.replace('-', '_')}-{version}.tar.gz"
    if not archive.is_file():
        logger.info("fetching llama.cpp's converter: %s==%s's source release from the package index", name, version)
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   f"{name}=={version}", "-d", str(cache)]
        if subprocess.run(command).returncode != 0 or not archive.is_file():
            raise ExportError(f"could not download {name}=={version}'s source release with pip; with no access to "
                              f"the package index, put {archive.name} into {cache}")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != sha256:
        raise ExportError(f"{archive} has sha256 {digest}, not the pinned {sha256}: delete it and run again")
    prefix = f"{name.replace('-', '_')}-{version}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar, tempfile.TemporaryDirectory(dir=cache) as tmp:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and any(m.name[len(prefix):].startswith(f) for f in CONVERTER_FILES)]
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(tmp, members=members, filter="data")
        os.replace(tmp, tools)
    return tools


def gguf_package(tools: Path):
    """llama.cpp's gguf-py, from the same release as the converter."""
    if str(tools / "gguf-py") not in sys.path:
        sys.path.insert(0, str(tools / "gguf-py"))
    import gguf
    return gguf


def pre_tokenizer_problem(folder: Path) -> str | None:
    """Why this tokenizer is not the byte-level GPT-2 split llama.cpp calls `phi-2`, or None when it is."""
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')!r}, not BPE"
    if spec.get("normalizer") is not None:
        return f"it has a normaliser ({spec['normalizer'].get('type')}), which GPT-2's split does not"
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return f"its pre-tokenizer is {pre!r}, not ByteLevel with GPT-2's regex and no prefix space"
    return None


# Runs llama.cpp's converter in a process of its own, with one change: a tokenizer hash it does not know is taken
# for `phi-2` (GPT-2's split) when the caller has checked that it is one.
CONVERT = """
import runpy, sys
tools, gpt2_split, script = sys.argv[1], sys.argv[2] == "yes", sys.argv[3]
sys.path[:0] = [tools, tools + "/gguf-py"]
import conversion.base as base
recognise = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return recognise(self, tokenizer)
    except NotImplementedError:
        if gpt2_split:
            return "phi-2"
        raise
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(tools + "/" + script, run_name="__main__")
"""


def convert(tools: Path, script: str, args: list[str], tokenizer_folder: Path) -> None:
    problem = pre_tokenizer_problem(tokenizer_folder)
    proc = subprocess.run([sys.executable, "-c", CONVERT, str(tools), "no" if problem else "yes", script, *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        if problem and "pre-tokenizer was not recognized" in proc.stdout:
            raise ExportError(f"llama.cpp does not know this tokenizer's pre-tokenizer, and it cannot be mapped to "
                              f"GPT-2's split because {problem}; llama.cpp would split text differently from "
                              f"training. Its converter said:\n{tail}")
        raise ExportError(f"llama.cpp's {script} failed:\n{tail}")


def quantize(source: Path, target: Path, outtype: str) -> None:
    """A llama.cpp-quantized copy of an f16/f32 GGUF (q4_k_m), through llama-cpp-python's runtime."""
    try:
        import ctypes

        import llama_cpp
    except ImportError as e:
        raise ExportError(f"--outtype {outtype} needs llama.cpp's runtime: `make llama-runtime` (builds "
                          f"llama-cpp-python=={LLAMA_CPP_SOURCE[1]} once), or leave {outtype} out") from e
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[outtype]
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise ExportError(f"llama.cpp could not quantize {source} to {outtype}")


# Ollama renders a chat with Go's text/template over .Messages (role, content). It has no trim or replace, so two
# things differ from the Jinja template (tests/test_export.py shows them on golden strings): message text is used
# as sent (Jinja strips surrounding spaces), and a `### Human:` typed inside a message is not made inert -- the stop
# string still ends the answer there. System messages go before the next question, as in training.
OLLAMA_TEMPLATE = (
    '{{- $system := "" }}{{- $first := true }}'
    '{{- range .Messages }}'
    '{{- if eq .Role "system" }}{{ $system = printf "%s%s\\n\\n" $system .Content }}'
    '{{- else if eq .Role "user" }}{{ if not $first }} {{ end }}### Human: {{ $system }}{{ .Content }}'
    '{{- $system = "" }}{{ $first = false }}'
    '{{- else if eq .Role "assistant" }} ### Assistant: {{ .Content }}EOS'
    '{{- end }}{{- end }} ### Assistant:')


def modelfile(gguf_name: str, eos: str) -> str:
    """An Ollama Modelfile for a GGUF beside it: the template above, the turn marker and EOS as stop strings,
    greedy (temperature 0) unless the user changes it."""
    return (f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{OLLAMA_TEMPLATE.replace("EOS", eos)}"""\n'
            f'PARAMETER stop "{HUMAN}"\n'
            f'PARAMETER stop "{eos}"\n'
            "PARAMETER temperature 0\n")


def gguf_fields(reader) -> dict:
    fields = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            fields[key] = [bytes(field.parts[i]).decode("utf-8") for i in field.data] \
                if key != "tokenizer.ggml.token_type" else None
        else:
            fields[key] = field.contents()
    return fields


def check_metadata(fields: dict, config, tokenizer) -> list[str]:
    """What in a GGUF's metadata disagrees with the model's config and tokenizer."""
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    rotary = config.rope_parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    want = {"general.architecture": "phi2", "phi2.context_length": config.max_position_embeddings,
            "phi2.embedding_length": config.hidden_size, "phi2.feed_forward_length": config.intermediate_size,
            "phi2.block_count": config.num_hidden_layers, "phi2.attention.head_count": heads,
            "phi2.attention.head_count_kv": config.num_key_value_heads or heads,
            "phi2.rope.dimension_count": int(rotary * head_dim),
            "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id, "tokenizer.chat_template": CHAT_TEMPLATE}
    return [f"{key} is {fields.get(key)!r}, the model's is {value!r}" for key, value in want.items()
            if fields.get(key) != value]


def check_tokenizer(fields: dict, tokenizer) -> list[str]:
    """Whether the tokenizer rebuilt from the GGUF's vocabulary and merges gives our ids on HARD_STRINGS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {token: i for i, token in enumerate(fields["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    rebuilt = Tokenizer(models.BPE(vocab, merges))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    rebuilt.decoder = decoders.ByteLevel()
    return [f"the GGUF's tokenizer gives other ids for {text[:40]!r}" for text in HARD_STRINGS
            if rebuilt.encode(text).ids != tokenizer(text, add_special_tokens=False)["input_ids"]]


def dequantized_state(reader, gguf, model) -> dict[str, torch.Tensor]:
    """The GGUF's tensors dequantized, under the model's own parameter names."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI2, model.config.num_hidden_layers)
    ours = {names.get_name(key, try_suffixes=(".weight", ".bias")): key for key in model.state_dict()}
    state = {}
    for tensor in reader.tensors:
        if tensor.name not in ours:
            raise ExportError(f"the GGUF holds a tensor {tensor.name} the model does not have")
        state[ours[tensor.name]] = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    return state


def greedy_problems(model, state: dict, references: list[tuple[torch.Tensor, torch.Tensor]], outtype: str
                    ) -> tuple[list[str], float]:
    """Teacher-forced over each reference (prompt + the merged model's greedy answer, and the merged model's logits
    there): the logits may move by RELATIVE_ERROR[outtype] at most, and the GGUF's weights must choose the merged
    model's token everywhere except at near-ties (where its two best logits are closer than twice the difference at
    that position); returns the problems and the largest relative error. The model's weights become the GGUF's."""
    model.load_state_dict({key: state[key].to(param.dtype).reshape(param.shape)
                           for key, param in model.state_dict().items()})
    problems, largest = [], 0.0
    with torch.no_grad():
        for number, (ids, expected) in enumerate(references):
            got = model(ids[None]).logits[0].float()
            relative = float((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt())
            top2 = expected.topk(2, dim=-1).values
            margin, error = top2[:, 0] - top2[:, 1], (expected - got).abs().max(-1).values
            flipped = int(((expected.argmax(-1) != got.argmax(-1)) & (margin > 2 * error)).sum())
            largest = max(largest, relative)
            if not relative <= RELATIVE_ERROR[outtype]:  # NaN fails too
                problems.append(f"probe {number}: the logits moved by {relative:.3g} of their size, more than "
                                f"{outtype}'s rounding allows ({RELATIVE_ERROR[outtype]:g})")
            if flipped:
                problems.append(f"probe {number}: {flipped} greedy token(s) differ where the merged model had no "
                                "near-tie")
    return problems, largest


def reference_sequences(chat: ChatModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each probe's prompt + the merged model's 24 greedy tokens, with the merged model's logits over them."""
    gen = GenerationSettings(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)  # 24 tokens, always
    prompts = [chat.prompt_ids([{"role": "user", "content": p}], 24)[0] for p in PROBES]
    answers = chat.generate_ids(prompts, gen, ignore_eos=True)
    sequences = [torch.tensor(p + a[:24]) for p, a in zip(prompts, answers)]
    with torch.no_grad():
        return [(ids, chat.model(ids[None]).logits[0].float()) for ids in sequences]


def check_gguf(path: Path, chat: ChatModel, references: list[tuple[torch.Tensor, torch.Tensor]], tools: Path,
               outtype: str) -> str:
    """Raises ExportError listing every disagreement between a GGUF and the merged model; returns a summary."""
    gguf = gguf_package(tools)
    reader = gguf.GGUFReader(path)
    fields = gguf_fields(reader)
    problems = check_metadata(fields, chat.model.config, chat.tokenizer) + check_tokenizer(fields, chat.tokenizer)
    weights, error = greedy_problems(chat.model, dequantized_state(reader, gguf, chat.model), references, outtype)
    problems += weights
    if problems:
        raise ExportError(f"{path.name} does not match the merged model:\n  - " + "\n  - ".join(problems))
    tokens = sum(len(ids) for ids, _ in references)
    return f"metadata, template, tokenizer ({len(HARD_STRINGS)} strings) and greedy tokens ({tokens}) match; " \
           f"logits within {error:.2g} of their size"


def export(cfg: Config, out: Path, outtypes: list[str], lora: bool) -> list[Path]:
    """Everything the module docstring lists, checked; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3 + len(outtypes) + lora, desc="export", unit="step")
    chat = load_chat_model(cfg, warm_up=False)
    name = model_id(cfg.inference.model or adapter_dir_for(cfg))
    merged = chat.save_merged(out / "merged")
    references = reference_sequences(chat)
    steps.update()
    tools = llama_cpp_tools()
    steps.update()
    written = [merged]
    for outtype in outtypes:
        steps.set_postfix_str(outtype)
        target = out / f"{name}-{outtype}.gguf"
        if outtype == "q4_k_m":  # llama.cpp quantizes from f16: the f16 file written, or a passing one
            source = out / f"{name}-f16.gguf" if "f16" in outtypes else out / f".{name}-f16.partial.gguf"
            if not source.is_file():
                convert(tools, "convert_hf_to_gguf.py", [str(merged), "--outtype", "f16", "--outfile", str(source),
                                                          "--model-name", name], merged)
            quantize(source, target, outtype)
            if "f16" not in outtypes:
                source.unlink()
        else:
            convert(tools, "convert_hf_to_gguf.py", [str(merged), "--outtype", outtype, "--outfile", str(target),
                                                      "--model-name", name], merged)
        try:
            logger.info("%s: %s", target.name, check_gguf(target, chat, references, tools, outtype))
        except ExportError:
            target.unlink(missing_ok=True)
            raise
        written.append(target)
        steps.update()
    if lora:
        written.append(export_lora(cfg, tools, out, name))
        steps.update()
    ollama = [p for p in written if p.suffix == ".gguf" and "lora" not in p.name]
    if ollama:
        (out / "Modelfile").write_text(modelfile(ollama[-1].name, chat.tokenizer.eos_token), encoding="utf-8")
        written.append(out / "Modelfile")
    steps.update()
    steps.close()
    return written


def export_lora(cfg: Config, tools: Path, out: Path, name: str) -> Path:
    """The adapter alone as a GGUF, for llama.cpp's --lora / Ollama's ADAPTER on a GGUF of its base model."""
    if cfg.inference.model:
        raise ExportError("--lora needs an adapter (inference.adapter), not a merged folder")
    adapter = adapter_dir_for(cfg)
    target = out / f"{name}-lora-f16.gguf"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    convert(tools, "convert_lora_to_gguf.py", [str(adapter), "--base", base, "--outtype", "f16", "--outfile",
                                               str(target)], Path(base) if Path(base).is_dir() else adapter)
    return target


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder for the merged model, GGUF files, Modelfile")
    parser.add_argument("--outtype", nargs="+", choices=OUTTYPES, default=["f16", "q8_0"],
                        help="GGUF types to write (q4_k_m needs llama.cpp's runtime: make llama-runtime)")
    parser.add_argument("--lora", action="store_true", help="also write the adapter alone as a GGUF")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, __doc__, extra=add_export_arguments)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    cfg.inference.dtype, cfg.inference.device, cfg.inference.fast = "fp32", "cpu", "off"  # exported as trained
    try:
        written = export(cfg, args.out, args.outtype, args.lora)
    except (AdapterError, ModelLoadError, ExportError, ValueError) as e:
        logger.error("%s", e)
        return 1
    logger.info("written: %s", ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
