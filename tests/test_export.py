"""export.py: the smoke model leaves the repo as a merged folder, GGUF files and an Ollama Modelfile, and each is what
the tools people take it to read: transformers 4.57 and 5.x, llama.cpp's runtime, Ollama's Go template."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PhiConfig, PhiForCausalLM

import export
from config import GenerationSettings
from conftest import TINY, run_script
from data_utils import render_text
from inference import ChatModel

GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
QUESTIONS = ["What is the capital of France?", "Write one sentence about the sea.", "Hi"]


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory) -> Path:
    """`python export.py` on the smoke run, as README says: f16 and q8_0, and the adapter alone."""
    out = tmp_path_factory.mktemp("exported")
    proc = run_script("export.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(smoke_run),
                      "--out", str(out), "--lora")
    assert proc.stderr.count("greedy tokens") == 2, proc.stderr[-3000:]
    return out


def test_the_export_writes_checked_files_other_tools_read(exported, smoke_run):
    name = smoke_run.name
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        ["merged", f"{name}-f16.gguf", f"{name}-q8_0.gguf", f"{name}-lora-f16.gguf", "Modelfile"])
    config = json.loads((exported / "merged" / "config.json").read_text())
    assert config["partial_rotary_factor"] == config["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert json.loads((exported / "merged" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    modelfile = (exported / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{name}-q8_0.gguf\n") and 'PARAMETER stop "### Human:"' in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and "PARAMETER temperature 0" in modelfile


def test_the_self_check_fails_on_a_gguf_that_is_not_the_model(exported, smoke_run, tokenizer):
    tools = export.llama_cpp_tools()
    merged = ChatModel(AutoModelForCausalLM.from_pretrained(exported / "merged"), tokenizer)
    gguf = exported / f"{smoke_run.name}-f16.gguf"
    export.check_gguf(gguf, merged, export.reference_sequences(merged), tools, "f16")  # the model it came from passes
    base = ChatModel(PhiForCausalLM.from_pretrained(TINY), tokenizer)  # the base, without the adapter
    with pytest.raises(export.ExportError, match="logits moved by 1.[0-9]+ of their size"):
        export.check_gguf(gguf, base, export.reference_sequences(base), tools, "f16")
    other = ChatModel(copy.deepcopy(merged.model), tokenizer)
    other.model.config.rope_parameters["partial_rotary_factor"] = 0.25
    with pytest.raises(export.ExportError, match="phi2.rope.dimension_count is 16, the model's is 8"):
        export.check_gguf(gguf, other, export.reference_sequences(merged), tools, "f16")


def test_a_tokenizer_llama_cpp_would_split_otherwise_stops_the_export(exported, tmp_path):
    """The converter knows tokenizers by a hash; the smoke tokenizer's is unknown and is mapped to GPT-2's split only
    because tokenizer.json says it is that split. With a normaliser it is not: the export stops and says why."""
    folder = tmp_path / "normalised"
    shutil.copytree(exported / "merged", folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFKC"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    assert export.pre_tokenizer_problem(exported / "merged") is None
    with pytest.raises(export.ExportError, match="normaliser"):
        export.convert(export.llama_cpp_tools(), "convert_hf_to_gguf.py",
                       [str(folder), "--outtype", "f16", "--outfile", str(tmp_path / "x.gguf")], folder)


# ----------------------------------------------------------------------------------------------------------------
# The tools themselves (slow: each is built or installed once per machine)
# ----------------------------------------------------------------------------------------------------------------

def cached_venv(name: str, packages: list[str]) -> Path:
    """A virtual environment of its own under ~/.cache/phi2-qlora, made once per machine; its python."""
    folder = export.cache_dir() / name
    python = folder / "bin" / "python"
    if not (folder / ".installed").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        venv.create(folder, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True, timeout=1800)
        (folder / ".installed").touch()
    return python


GREEDY_SCRIPT = textwrap.dedent("""
    import json, sys, torch, transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, prompts = sys.argv[1], json.loads(sys.argv[2])
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    out = {"version": transformers.__version__, "class": type(tok).__name__, "runs": []}
    for prompt in prompts:
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, ids.shape[1]:]
            logits = model(torch.cat([ids[0], new])[None]).logits[0]
        out["runs"].append({"ids": ids[0].tolist(), "new": new.tolist(), "logits": logits.tolist()})
    print(json.dumps(out))
""")


def greedy_in(python: str | Path, folder: Path, prompts: list[str]) -> dict:
    proc = subprocess.run([str(python), "-c", GREEDY_SCRIPT, str(folder), json.dumps(prompts)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
def test_the_merged_folder_loads_the_same_in_transformers_4_57(tmp_path, tokenizer):
    """A Phi model with Phi-2's rotary fraction, 0.4 (the smoke model's is 0.5, 4.x's default, so it cannot show the
    difference), saved as export.py saves it: transformers 4.57 reads the same tokenizer, greedy tokens and logits as
    5.23 (4.57 read 0.5 without the top-level key)."""
    config = PhiConfig.from_pretrained(TINY)
    config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 0.4}
    torch.manual_seed(0)
    folder = ChatModel(PhiForCausalLM(config).eval(), tokenizer).save_merged(tmp_path / "merged")
    prompts = [render_text([{"role": "user", "content": q}]) for q in QUESTIONS]
    old = greedy_in(cached_venv("venv-transformers-4.57.6", ["torch==2.13.0", "transformers==4.57.6"]), folder,
                    prompts)
    new = greedy_in(sys.executable, folder, prompts)
    assert old["version"] == "4.57.6" and old["class"] == "PreTrainedTokenizerFast"
    for a, b in zip(old["runs"], new["runs"]):
        assert a["ids"] == b["ids"] and a["new"] == b["new"]
        assert torch.allclose(torch.tensor(a["logits"]), torch.tensor(b["logits"]), atol=1e-4)


def llama_runtime():
    """llama-cpp-python, which `make llama-runtime` builds once per machine; in CI its absence is a failure."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("llama.cpp's runtime is not installed: make llama-runtime (CI builds it)")
    return llama_cpp


def llama_greedy(gguf: Path, prompt_ids: list[int], eos: int, n: int = 24, lora: Path | None = None) -> list[int]:
    """Greedy tokens from llama.cpp's runtime, up to and with EOS."""
    model = llama_runtime().Llama(model_path=str(gguf), n_ctx=512, verbose=False, seed=0,
                                  lora_path=str(lora) if lora else None)
    out = []
    for token in model.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n or token == eos:
            break
    return out


def transformers_greedy(chat: ChatModel, prompt_ids: list[int], n: int = 24) -> list[int]:
    new = chat.generate_ids([prompt_ids], GREEDY)[0][:n]
    eos = chat.tokenizer.eos_token_id
    return new[:new.index(eos) + 1] if eos in new else new


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llama_cpp_runs_the_gguf_as_transformers_runs_the_merged_folder(exported, smoke_run, outtype):
    merged = ChatModel(AutoModelForCausalLM.from_pretrained(exported / "merged"),
                       AutoTokenizer.from_pretrained(exported / "merged"))
    for question in QUESTIONS:
        ids = merged.prompt_ids([{"role": "user", "content": question}], 24)[0]
        got = llama_greedy(exported / f"{smoke_run.name}-{outtype}.gguf", ids, merged.tokenizer.eos_token_id)
        assert got == transformers_greedy(merged, ids) and len(got) > 3, (question, outtype)


@pytest.mark.slow
def test_q4_k_m_is_quantized_by_llama_cpp_and_checked(smoke_run, tmp_path):
    llama_runtime()
    proc = run_script("export.py", "--config", "configs/smoke.yaml", "--training.output_dir", str(smoke_run),
                      "--out", str(tmp_path), "--outtype", "q4_k_m")
    assert f"{smoke_run.name}-q4_k_m.gguf: metadata, template, tokenizer" in proc.stderr
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == [f"{smoke_run.name}-q4_k_m.gguf"]


@pytest.mark.slow
def test_the_lora_gguf_on_the_base_answers_like_the_merged_model(exported, smoke_run, tmp_path):
    """llama.cpp's --lora (Ollama's ADAPTER): the adapter GGUF applied to a GGUF of the base model."""
    base = tmp_path / "base-f16.gguf"
    export.convert(export.llama_cpp_tools(), "convert_hf_to_gguf.py",
                   [str(TINY), "--outtype", "f16", "--outfile", str(base)], TINY)
    merged = ChatModel(AutoModelForCausalLM.from_pretrained(exported / "merged"),
                       AutoTokenizer.from_pretrained(exported / "merged"))
    for question in QUESTIONS:
        ids = merged.prompt_ids([{"role": "user", "content": question}], 24)[0]
        got = llama_greedy(base, ids, merged.tokenizer.eos_token_id, lora=exported / f"{smoke_run.name}-lora-f16.gguf")
        assert got == transformers_greedy(merged, ids) and len(got) > 3, question


GO = shutil.which("go")
needs_go = pytest.mark.skipif(GO is None and not os.environ.get("CI"),
                              reason="Go (Debian golang-go) renders Ollama's template language; .ci/run installs it")
GO_RENDER = textwrap.dedent("""
    package main
    import ("encoding/json"; "os"; "text/template")
    type Message struct { Role string `json:"role"`; Content string `json:"content"` }
    func main() {
        var messages []Message
        json.Unmarshal([]byte(os.Args[2]), &messages)
        t := template.Must(template.New("ollama").Parse(os.Args[1]))
        if err := t.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil { panic(err) }
    }
""")

# Each conversation's rendering by both templates. They agree where the text is as the template expects; they
# differ on what Go's template language cannot do: trim the text (the first and last conversations' spaces) and
# make a typed `### Human:` inert (the last one) -- Ollama's stop string still ends an answer at a real one.
CONVERSATIONS = [
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 plus 3?"}],
     "### Human: Be brief.\n\nHi ### Assistant: Hello!<|endoftext|> ### Human: What is 2 plus 3? ### Assistant:",
     None),
    ([{"role": "user", "content": "One"}, {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two"},
      {"role": "assistant", "content": "2"}, {"role": "system", "content": "Now in words."},
      {"role": "user", "content": "Three"}],
     "### Human: One ### Assistant: 1<|endoftext|> ### Human: Two ### Assistant: 2<|endoftext|> ### Human: Now in "
     "words.\n\nThree ### Assistant:", None),
    ([{"role": "user", "content": "  spaced  "}],
     "### Human: spaced ### Assistant:", "### Human:   spaced   ### Assistant:"),
    ([{"role": "user", "content": "Say ### Human: hi"}],
     "### Human: Say ### Human : hi ### Assistant:", "### Human: Say ### Human: hi ### Assistant:"),
]


@pytest.mark.slow
@needs_go
@pytest.mark.parametrize("messages, jinja, ollama", CONVERSATIONS, ids=["system", "late-system", "spaces", "marker"])
def test_the_ollama_template_renders_as_the_jinja_template(exported, tokenizer, tmp_path, messages, jinja, ollama):
    template = (exported / "Modelfile").read_text().split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    program = tmp_path / "render.go"
    program.write_text(GO_RENDER)
    rendered = subprocess.run([GO, "run", str(program), template, json.dumps(messages)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "GOCACHE": str(export.cache_dir() / "go"),
                                                           "GOFLAGS": "-mod=mod", "GO111MODULE": "off"})
    assert rendered.returncode == 0, rendered.stderr
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == jinja
    assert rendered.stdout == (ollama or jinja)
