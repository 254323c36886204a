"""config.py: YAML + CLI precedence, unknown keys, all problems reported at once, the generated reference."""

from __future__ import annotations

import argparse

import pytest

import config
from config import ConfigError, config_from_args, parse_config, reference_markdown
from conftest import ROOT


def parse(argv):
    return parse_config(argv)[0]


def test_defaults_are_the_real_job():
    cfg = parse([])
    assert cfg.model.name_or_path == "microsoft/phi-2"
    assert cfg.data.dataset == "OpenAssistant/oasst1"
    assert (cfg.quantization.mode, cfg.quantization.double_quant) == ("nf4", True)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    assert cfg.data.max_length == 2048 and cfg.training.output_dir == "model"


def test_yaml_then_cli_cli_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 8\n  alpha: 32\ntraining:\n  learning_rate: 1.0e-4\n")
    cfg = parse(["--config", str(path), "--lora.r", "4", "--data.languages", "en,de"])
    assert cfg.lora.r == 4            # CLI over YAML
    assert cfg.lora.alpha == 32       # YAML over default
    assert cfg.training.learning_rate == 1e-4
    assert cfg.data.languages == ["en", "de"]
    assert cfg.lora.dropout == config.LoraSettings().dropout  # default kept


def test_unknown_key_in_file_is_an_error_naming_allowed_keys(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 8\n")
    with pytest.raises(SystemExit) as e:
        parse(["--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "lora.rank: unknown key" in err and "alpha" in err


def test_unknown_cli_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse(["--lora.rank", "8"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_every_problem_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 0\n  dropout: 1.5\ntraining:\n  learning_rate: -1\n  per_device_train_batch_size: "
                    "x\n  memory_budget_gib: 0\n  autocast: maybe\nmodel:\n  dtype: float8\nquantization:\n  mode: int3\n"
                    "whatever:\n  a: 1\n")
    args = argparse.Namespace(config=str(path))
    with pytest.raises(ConfigError) as e:
        config_from_args(args)
    text = str(e.value)
    for expected in ("lora.r: must be > 0", "lora.dropout: must be in [0, 1)", "training.learning_rate: must be > 0",
                     "training.per_device_train_batch_size: expected an integer", "model.dtype: 'float8' is not one",
                     "quantization.mode: 'int3' is not one", "whatever: unknown section",
                     "training.memory_budget_gib: must be > 0", "training.autocast: 'maybe' is not one"):
        assert expected in text
    assert len(e.value.problems) >= 9


def test_yaml_syntax_error_is_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora: [r: 8\n")
    args = argparse.Namespace(config=str(path))
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_from_args(args)


def test_missing_config_file_is_reported(tmp_path):
    args = argparse.Namespace(config=str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="no such file"):
        config_from_args(args)


def test_fp16_training_refused_with_the_fix():
    args = argparse.Namespace(**{"model.dtype": "fp16"})
    with pytest.raises(ConfigError, match="fp16 training is refused.*model.dtype: auto"):
        config_from_args(args)


def test_network_bind_requires_auth():
    with pytest.raises(ConfigError, match="app.auth"):
        config_from_args(argparse.Namespace(**{"app.host": "0.0.0.0"}))
    cfg = config_from_args(argparse.Namespace(**{"app.host": "0.0.0.0", "app.auth": "me:pw"}))
    assert cfg.app.auth == "me:pw"


def test_saved_config_reproduces_the_run(tmp_path):
    cfg = parse(["--config", "configs/smoke.yaml", "--lora.r", "7"])
    config.save_config(cfg, tmp_path / "config.yaml")
    again = parse(["--config", str(tmp_path / "config.yaml")])
    assert again.to_dict() == cfg.to_dict()


def test_presets_are_valid():
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        parse(["--config", str(preset)])


def test_config_reference_doc_is_in_sync():
    assert (ROOT / "docs" / "CONFIG.md").read_text() == reference_markdown()


def test_help_lists_every_key_with_its_documentation(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for section, cls in config.SECTIONS.items():
        for name in cls.__dataclass_fields__:
            assert f"--{section}.{name}" in out
    assert "recompute activations in backward" in out


def test_unquoted_yaml_on_off_mean_on_and_off(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  torch_compile: off\ninference:\n  fast: on\n")  # YAML 1.1 reads these as booleans
    cfg = parse(["--config", str(path)])
    assert (cfg.training.torch_compile, cfg.inference.fast) == ("off", "on")
    path.write_text("training:\n  torch_compile: yes\n")
    assert parse(["--config", str(path)]).training.torch_compile == "on"
    path.write_text("training:\n  torch_compile: 3\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(path)])


def test_public_share_link_requires_auth(capsys):
    with pytest.raises(SystemExit):
        parse(["--app.share", "true"])
    err = capsys.readouterr().err
    assert "app.share: a public gradio.live link" in err and "--app.auth user:password" in err
    assert parse(["--app.share", "true", "--app.auth", "me:pw"]).app.share


def test_saved_config_never_holds_the_password(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("app:\n  auth: me:hunter2-secret\n")
    cfg = parse(["--config", str(path)])
    assert cfg.app.auth == "me:hunter2-secret"  # in use while the program runs
    config.save_config(cfg, tmp_path / "saved.yaml")
    saved = (tmp_path / "saved.yaml").read_text()
    assert "hunter2" not in saved and "auth: null" in saved
    assert parse(["--config", str(tmp_path / "saved.yaml")]).app.auth is None  # and it still loads
