"""The command line: recipes, YAML merging, key=value overrides, the errors they give, and a short run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml

from megatron.bridge import cli
from megatron.bridge.cli import build_config, check_config, load_forward_step, main, parse_override, set_field
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.state import GlobalState

RECIPES = ("gemma3_1b", "llama32_1b", "llama32_3b", "llama3_8b", "llama31_8b", "qwen25_500m", "qwen25_1p5b",
           "qwen25_7b", "qwen25_tiny", "qwen3_600m", "qwen3_1p7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b")


def test_overrides_are_typed_and_applied_in_order():
    config = build_config("qwen25_500m", overrides=[
        "train.train_iters=100", "model.num_layers=4", "optimizer.lr=1e-3", "checkpoint.save=null",
        "optimizer.bf16=false", "dataset.split=98,1,1", "model.num_layers=6", "mixed_precision=fp32",
        "dataset.blend=[a, b]", "logger.wandb_project=", "scheduler.lr_decay_iters=null",
    ])
    assert config.train.train_iters == 100 and config.model.num_layers == 6
    assert config.optimizer.lr == 1e-3 and isinstance(config.optimizer.lr, float)  # YAML reads 1e-3 as text
    assert config.checkpoint.save is None and config.optimizer.bf16 is False
    assert config.dataset.split == "98,1,1" and config.dataset.blend == ["a", "b"]
    assert config.mixed_precision == "fp32" and config.logger.wandb_project == ""
    assert config.scheduler.lr_decay_iters is None
    assert config.model.hidden_size == 896  # untouched fields keep the recipe's values


def test_recipe_names_with_or_without_suffix():
    assert build_config("qwen25_7b").model.num_layers == 28
    assert build_config("qwen25_1p5b_pretrain_config").model.hidden_size == 1536
    assert tuple(cli.available_recipes()) == RECIPES  # every family's recipes, package by package
    assert build_config("gemma3_1b").model.window_size == (511, 0)
    with pytest.raises(ValueError, match="--recipe='qwen3' is invalid: choose one of .*qwen25_tiny"):
        build_config("qwen3")


def test_yaml_file_is_merged_before_the_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "train": {"train_iters": 50, "global_batch_size": 8},
        "model": {"num_layers": 3, "_target_": "ignored.Class"},
        "optimizer": {"lr": 2.0e-4},
        "mixed_precision": "fp32",
    }))
    config = build_config("qwen25_tiny", str(path), ["train.train_iters=70"])
    assert config.train.train_iters == 70 and config.train.global_batch_size == 8
    assert config.model.num_layers == 3 and config.optimizer.lr == 2e-4 and config.mixed_precision == "fp32"


def test_a_saved_run_config_reads_back(tmp_path):
    original = build_config("qwen25_tiny", overrides=["train.train_iters=33", "dataset.blend=[[x], [1.0]]"])
    path = tmp_path / "run_config.yaml"
    path.write_text(yaml.safe_dump(original.to_dict()))
    assert build_config("qwen25_tiny", str(path)).to_dict() == original.to_dict()


def test_the_run_config_a_training_checkpoint_holds_loads_back_as_config_file(tmp_path, capsys):
    from helpers import make_tiny_config
    from megatron.bridge.training.pretrain import pretrain

    pretrain(make_tiny_config(train__train_iters=1, checkpoint__save=str(tmp_path / "ckpt"),
                              optimizer__lr=2.5e-3, dataset__split="90,5,5"), forward_step)
    path = tmp_path / "ckpt" / "iter_0000001" / "run_config.yaml"
    written = yaml.safe_load(path.read_text())
    config = build_config("qwen25_tiny", config_file=str(path))
    check_config(config)
    capsys.readouterr()
    main(["--recipe", "qwen25_tiny", "--config-file", str(path), "--print-config"])
    assert yaml.safe_load(capsys.readouterr().out) == written


@pytest.mark.parametrize("with_tokenizer", [False, True], ids=["no-tokenizer", "hf-tokenizer"])
def test_the_run_config_an_imported_checkpoint_holds_loads_back_as_config_file(tmp_path, with_tokenizer):
    transformers = pytest.importorskip("transformers")
    from megatron.bridge import AutoBridge
    from megatron.bridge.data.train_tokenizer import train_tokenizer

    hf = tmp_path / "hf"
    config = transformers.Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(hf)
    if with_tokenizer:
        (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
        train_tokenizer([str(tmp_path / "text.txt")], vocab_size=300, output_dir=str(hf))
    AutoBridge.import_ckpt(hf, tmp_path / "imported")
    path = tmp_path / "imported" / "iter_0000000" / "run_config.yaml"
    loaded = build_config("qwen25_tiny", config_file=str(path))
    check_config(loaded)
    assert loaded.model.vocab_size == 320 and loaded.model.num_layers == 1
    assert loaded.tokenizer.tokenizer_type == ("HuggingFaceTokenizer" if with_tokenizer else "NullTokenizer")


@pytest.mark.parametrize(("item", "pattern"), [
    ("train.trian_iters=5", r"^unknown key train\.trian_iters \(did you mean train\.train_iters\?\); valid keys of "
                            r"train: .*exit_interval, .*global_batch_size, .*train_iters"),
    ("trian.train_iters=5", r"^unknown key trian \(did you mean train\?\); valid top-level keys: .*checkpoint, "
                            r"dataset, .*train"),
    ("model.padded_vocab_size=5", r"^unknown key model\.padded_vocab_size .*; valid keys of model: .*num_layers"),
    ("train=5", r"^train is a section: set its fields instead, e\.g\. train\.\w+=\.\.\."),
    ("mixed_precision.x=5", r"^mixed_precision is a value, not a section"),
    ("train.train_iters", r"^override 'train\.train_iters' is invalid: expected key=value"),
])
def test_bad_keys_list_the_valid_ones(item, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_config("qwen25_tiny", overrides=[item])


@pytest.mark.parametrize(("item", "message"), [
    ("train.train_iters=abc", "train.train_iters='abc' is invalid: expected int"),
    ("train.train_iters=1.5", "train.train_iters=1.5 is invalid: expected int"),
    ("train.micro_batch_size=null", "train.micro_batch_size=None is invalid: expected int"),
    ("optimizer.lr=fast", "optimizer.lr='fast' is invalid: expected float"),
    ("optimizer.bf16=1", "optimizer.bf16=1 is invalid: expected bool"),
    ("checkpoint.save=[a]", "checkpoint.save=['a'] is invalid: expected str or null"),
])
def test_wrong_types_name_the_expected_type(item, message):
    with pytest.raises(ValueError) as info:
        build_config("qwen25_tiny", overrides=[item])
    assert message in str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  trian_iters: 4\n")
    with pytest.raises(ValueError, match=r"--config-file .*bad\.yaml: unknown key train\.trian_iters"):
        build_config("qwen25_tiny", str(path))
    path.write_text("model:\n  padded_vocab_size: 4\n")  # a property, not a field
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown key model\.padded_vocab_size"):
        build_config("qwen25_tiny", str(path))
    with pytest.raises(ValueError, match="cannot read it"):
        build_config("qwen25_tiny", str(tmp_path / "missing.yaml"))


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=null") == ("a", None) and parse_override("a=") == ("a", "")
    assert parse_override("a=x=y") == ("a", "x=y")


def test_set_field_keeps_the_config_a_dataclass_tree():
    config = build_config("qwen25_tiny")
    set_field(config, "validation.eval_interval", None)
    assert config.validation.eval_interval is None


def test_forward_step_is_importable_by_name():
    assert load_forward_step("megatron.bridge.training.gpt_step:forward_step") is forward_step
    for spec, fragment in [("nodots", "expected module:function"), ("no.such.module:f", "cannot import"),
                           ("megatron.bridge.training.gpt_step:nope", "has no function nope")]:
        with pytest.raises(ValueError, match=fragment):
            load_forward_step(spec)


def test_main_reports_errors_without_a_traceback(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--recipe", "qwen25_tiny", "train.trian_iters=5"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: unknown key train.trian_iters" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["--recipe", "qwen25_tiny", "dataset.blend=[/nowhere/corpus]"])
    assert "dataset file /nowhere/corpus.idx does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a cross-field rule, checked before any work starts
        main(["--recipe", "qwen25_tiny", "dataset.seq_length=64"])
    assert "dataset.seq_length=64 is invalid: equal to model.seq_length=128" in capsys.readouterr().err


def test_print_config_prints_yaml_and_does_not_train(capsys, monkeypatch):
    monkeypatch.setattr("megatron.bridge.training.pretrain.pretrain", lambda *a, **k: pytest.fail("trained"))
    main(["--recipe", "qwen25_tiny", "--print-config", "train.train_iters=70"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["train_iters"] == 70 and printed["model"]["num_layers"] == 2


def test_main_trains_with_the_overrides(chdir, monkeypatch):
    seen = []

    def recording_forward_step(state: GlobalState, data_iterator, model):
        seen.append(state.train_state.step)
        return forward_step(state, data_iterator, model)

    monkeypatch.setattr(sys.modules[__name__], "recording_forward_step", recording_forward_step, raising=False)
    main(["--recipe", "qwen25_tiny", "--forward-step", f"{__name__}:recording_forward_step",
          "train.train_iters=2", "train.global_batch_size=4", "train.micro_batch_size=4", "model.num_layers=1",
          "scheduler.lr_warmup_iters=0", "validation.eval_iters=0", "logger.tensorboard_dir=null"])
    assert seen == [0, 1]


def test_help_lists_the_recipes():
    result = subprocess.run([sys.executable, "-m", "megatron.bridge.pretrain", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=os.getcwd())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m megatron.bridge.pretrain ")
    assert "--recipe" in result.stdout and "--config-file" in result.stdout and "KEY=VALUE" in result.stdout
    for name in RECIPES:
        assert name in result.stdout


def test_the_console_script_is_named_as_it_was_typed(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/megatron-bridge-pretrain", "--help"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: megatron-bridge-pretrain ")
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/megatron-bridge-pretrain", "--recipe", "qwen25_tiny",
                                      "train.trian_iters=5"])
    with pytest.raises(SystemExit):
        main()
    assert capsys.readouterr().err.startswith("megatron-bridge-pretrain: error: unknown key train.trian_iters")


def test_the_tiny_recipe_trains_fewer_steps_than_its_warm_up_with_one_warning(chdir):
    from megatron.bridge.checkpoint import io as checkpoint_io

    with pytest.warns(UserWarning, match=r"scheduler\.lr_warmup_iters=10 is not shorter than the decay span "
                                         r"\(3 steps\): warming up over 2 steps instead") as record:
        main(["--recipe", "qwen25_tiny", "train.train_iters=3", "train.global_batch_size=4", "train.micro_batch_size=4",
              "model.num_layers=1", "validation.eval_iters=0", "logger.tensorboard_dir=null", "checkpoint.save=ckpt",
              "checkpoint.save_interval=null"])
    assert checkpoint_io.list_iterations("ckpt") == [3]
    # The config is checked twice (by the command line, then by pretrain), from one place: Python shows it once.
    warm_up = [w for w in record if "lr_warmup_iters" in str(w.message)]
    assert len({(w.filename, w.lineno) for w in warm_up}) == 1


TINY_RUN = ["--recipe", "qwen25_tiny", "train.global_batch_size=4", "train.micro_batch_size=4", "model.num_layers=1",
            "scheduler.lr_warmup_iters=0", "validation.eval_iters=0", "logger.tensorboard_dir=null"]
PROG = "python -m megatron.bridge.pretrain"


def last_error_line(capsys) -> str:
    """The one line a failed command printed last on stderr (and no traceback anywhere)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.rstrip("\n").splitlines()[-1]
    assert line.startswith(f"{PROG}: error: ")
    return line


def test_errors_after_the_start_are_one_line_with_status_1(chdir, capsys):
    main([*TINY_RUN, "train.train_iters=1", "checkpoint.save=ckpt", "checkpoint.save_interval=1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # a checkpoint that does not fit the model
        main([*TINY_RUN, "train.train_iters=2", "model.num_layers=2", "checkpoint.load=ckpt"])
    assert info.value.code == 1
    assert "iter_0000001 does not fit this run: missing tensors ['model.layers.1." in last_error_line(capsys)
    with pytest.raises(SystemExit) as info:
        main([*TINY_RUN, "train.train_iters=1", "checkpoint.pretrained_checkpoint=nowhere"])
    assert info.value.code != 0
    assert "checkpoint.pretrained_checkpoint='nowhere' holds no checkpoint" in last_error_line(capsys)


def test_a_scheduler_error_is_one_line(capsys):
    # Once found only when the scheduler was built (a traceback); now refused with the config.
    with pytest.raises(SystemExit) as info:
        main([*TINY_RUN, "train.train_iters=2", "optimizer.weight_decay=0.1", "scheduler.start_weight_decay=0.1",
              "scheduler.end_weight_decay=0.2"])
    assert info.value.code == 2
    assert "scheduler.end_weight_decay=0.2 is invalid: equal to scheduler.start_weight_decay=0.1" in last_error_line(
        capsys)


def test_ctrl_c_ends_a_run_with_one_line_and_status_130(tmp_path):
    run = subprocess.Popen(
        [sys.executable, "-m", "megatron.bridge.pretrain", *TINY_RUN, "train.train_iters=1000000",
         "logger.log_interval=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A shell runs background jobs with Ctrl-C ignored; the run must see it as a terminal would send it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in run.stdout:
            if "iteration" in line:  # training has started: exit_signal_handler is off, so Python raises
                break
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130
    assert err == f"{PROG}: interrupted\n"


def test_finetune_lists_and_loads_the_finetuning_recipes():
    recipes = cli.available_recipes("finetune")
    assert {"qwen25_500m_sft", "qwen25_500m_peft", "qwen3_600m_sft", "qwen3_600m_peft", "llama32_1b_sft",
            "llama32_1b_peft", "qwen25_tiny_sft", "qwen25_tiny_peft"} <= set(recipes)
    assert not set(recipes) & set(cli.available_recipes())  # pretraining recipes are not finetuning ones
    config = build_config("qwen25_500m_peft_config", overrides=["peft.dim=8"], kind="finetune")
    settings = (config.peft.dim, config.peft.alpha, config.optimizer.lr, config.train.global_batch_size)
    assert settings == (8, 32, 1e-4, 128)


def test_finetune_refuses_to_start_from_random_weights_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.finetune_main(["--recipe", "qwen25_tiny_peft", "dataset.dataset_root=/nowhere"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint.pretrained_checkpoint=None is invalid for finetune" in err
    assert err.startswith("python -m megatron.bridge.finetune: error: ")


def test_finetune_runs_the_tiny_lora_recipe_from_a_checkpoint(chdir):
    base = chdir / "base"
    main(["--recipe", "qwen25_tiny", "train.train_iters=1", "tokenizer.vocab_size=64", f"checkpoint.save={base}",
          "validation.eval_iters=0", "logger.tensorboard_dir=null"])
    data = chdir / "data"
    data.mkdir()
    rows = "".join(f'{{"input": "{i} {i + 1} {i + 2}", "output": "{i + 3} {i + 4}"}}\n' for i in range(40))
    (data / "training.jsonl").write_text(rows)
    (data / "validation.jsonl").write_text("".join(rows.splitlines(keepends=True)[:8]))
    cli.finetune_main(["--recipe", "qwen25_tiny_peft", f"checkpoint.pretrained_checkpoint={base}",
                       f"dataset.dataset_root={data}", "dataset.do_test=false",
                       "tokenizer.tokenizer_type=NullTokenizer", "tokenizer.vocab_size=64", "train.train_iters=2",
                       "validation.eval_iters=1",
                       f"checkpoint.save={chdir / 'lora'}", "logger.tensorboard_dir=null"])
    assert (chdir / "lora" / "iter_0000002").is_dir()


def test_each_recipe_logs_and_saves_in_a_folder_of_its_own(chdir):
    configs = {name: fn() for kind in ("pretrain", "finetune") for name, fn in cli.available_recipes(kind).items()}
    folders = {name: (cfg.logger.tensorboard_dir, cfg.checkpoint.save) for name, cfg in configs.items()}
    assert len({tb for tb, _ in folders.values()}) == len(folders), folders
    assert len({save for _, save in folders.values()}) == len(folders), folders
    # The flagship recipe keeps upstream's folder (the api contract's nemo_experiments/default).
    assert folders["qwen25_500m"] == (str(chdir / "nemo_experiments" / "default" / "tb_logs"),
                                      str(chdir / "nemo_experiments" / "default" / "checkpoints"))
