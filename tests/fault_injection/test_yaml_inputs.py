"""Hostile YAML: every YAML this package reads refuses alias bombs, deep nesting, huge and non-UTF-8
files at once, with a short message naming the file (the `--config-file`, an override, a checkpoint's
run_config.yaml)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from megatron.bridge.cli import build_config, main, parse_override
from megatron.bridge.utils.errors import UserError
from megatron.bridge.utils.safe_yaml import MAX_YAML_BYTES, load_yaml_file, safe_load

SRC = Path(__file__).resolve().parents[2] / "src" / "megatron" / "bridge"

# The 292-byte file of the report: nine levels of nine aliases, 9**9 strings once expanded.
ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{n}: &{n} [{','.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
    + ["train: {train_iters: *i}"]
) + "\n"

HOSTILE = [
    (ALIAS_BOMB, r"line 1, column 4: YAML anchor &a is refused"),
    ("base: &base {train_iters: 5}\ntrain:\n  <<: *base\n", r"line 1, column 7: YAML anchor &base is refused"),
    ("train: {train_iters: *nowhere}\n", r"line 1, column 22: YAML alias \*nowhere is refused"),
    ("train: " + "[" * 200 + "]" * 200 + "\n", r"line 1, column 71: nested deeper than 64 levels"),
    ("train: {train_iters: " + "9" * 5000 + "}\n", r"unreadable value \(Exceeds the limit"),
    ("train: {train_iters: [1,\n", r"not valid YAML \(while parsing a flow node; .* at line 2, column 1\)"),
    ("!!python/object/apply:os.system [echo hi]\n", r"not valid YAML \(could not determine a constructor for the "
                                                    r"tag 'tag:yaml\.org,2002:python/object/apply:os\.system' at "
                                                    r"line 1, column 1\)"),
]


@pytest.mark.parametrize(("text", "match"), HOSTILE, ids=[t[:30] for t, _ in HOSTILE])
def test_hostile_config_files_are_refused_naming_the_file(tmp_path, text, match):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"^--config-file {re.escape(str(path))}: {match}") as info:
        build_config("qwen25_tiny", str(path))
    assert len(str(info.value)) < 600 and "\n" not in str(info.value)


def test_the_alias_bomb_ends_in_one_short_line_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 400
    with pytest.raises(SystemExit) as info:
        main(["--recipe", "qwen25_tiny", "--config-file", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and len(err) < 600
    assert err.startswith("python -m megatron.bridge.pretrain: error: --config-file ")


def test_non_utf8_and_oversized_files_are_named(tmp_path):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("train: {train_iters: 5}  # café\n".encode("latin-1"))
    with pytest.raises(UserError, match=rf"--config-file {re.escape(str(latin))}: not UTF-8 text \(byte 0xe9 at "
                                        r"offset 30\)"):
        build_config("qwen25_tiny", str(latin))
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:  # sparse: the read must stop at the limit, not take the whole file
        f.truncate(MAX_YAML_BYTES + 1)
    with pytest.raises(UserError, match=r"big\.yaml: larger than 1 MiB"):
        build_config("qwen25_tiny", str(big))


def test_long_values_and_keys_are_not_echoed_in_full(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("train: {train_iters: [" + ", ".join(["1"] * 10_000) + "]}\n")
    with pytest.raises(UserError, match=r"train\.train_iters=\[1, 1, .*\.\.\. \(30000 characters\) is invalid: "
                                        r"expected int") as info:
        build_config("qwen25_tiny", str(path))
    assert len(str(info.value)) < 600
    with pytest.raises(UserError, match=r"unknown key train\.k+\.\.\.; valid keys of train") as info:
        build_config("qwen25_tiny", overrides=["train." + "k" * 100_000 + "=1"])
    assert len(str(info.value)) < 2000


def test_overrides_refuse_aliases_and_keep_plain_text():
    with pytest.raises(UserError, match=r"override train\.train_iters: line 1, column 2: YAML anchor &a is refused"):
        parse_override("train.train_iters=[&a [1, 2], *a, *a]")
    with pytest.raises(UserError, match=r"override train\.train_iters: unreadable value"):
        parse_override("train.train_iters=" + "9" * 5000)
    with pytest.raises(UserError, match=r"YAML alias \*not-an-alias is refused .*quote text starting with \*"):
        parse_override("logger.wandb_project=*not-an-alias")
    assert parse_override("logger.wandb_project='*quoted'") == ("logger.wandb_project", "*quoted")
    assert parse_override("dataset.blend=[a, b") == ("dataset.blend", "[a, b")  # not YAML: the raw text


def test_a_checkpoints_run_config_is_read_the_same_way(tmp_path):
    from test_hf_inputs import CONFIG, write_folder

    from megatron.bridge import AutoBridge

    ckpt = AutoBridge.import_ckpt(write_folder(tmp_path / "hf", CONFIG, max_shard_size=10**9), tmp_path / "ckpt")
    iteration = ckpt / "iter_0000000"
    shutil.rmtree(iteration / "hf")  # export now rebuilds config.json from run_config.yaml
    # Without its manifest the checkpoint is read as one written before checksums: the YAML reader decides.
    (iteration / "manifest.json").unlink()
    (iteration / "run_config.yaml").write_text(ALIAS_BOMB)
    with pytest.raises(UserError, match=r"run_config\.yaml: line 1, column 4: YAML anchor &a is refused"):
        AutoBridge.export_ckpt(ckpt, tmp_path / "out")
    (iteration / "run_config.yaml").write_bytes(b"model: {num_layers: \xff}\n")
    with pytest.raises(UserError, match=r"run_config\.yaml: not UTF-8 text \(byte 0xff at offset 20\)"):
        AutoBridge.export_ckpt(ckpt, tmp_path / "out")
    (iteration / "run_config.yaml").write_text("checkpoint: [1]\nmodel: {num_layers: abc}\n")
    with pytest.raises(UserError, match=r"run_config\.yaml: its model section is invalid: model\.num_layers='abc'"):
        AutoBridge.export_ckpt(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_plain_yaml_still_reads():
    assert safe_load("a: [1, 2.5, x]\nb: {c: null, d: true}\n") == {"a": [1, 2.5, "x"], "b": {"c": None, "d": True}}
    assert safe_load("") is None


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"nope\.yaml: cannot read it \(No such file or directory\)"):
        load_yaml_file(tmp_path / "nope.yaml")


def test_every_yaml_reader_goes_through_safe_yaml():
    """A new `yaml.safe_load` (or `load`, `compose`, ...) elsewhere would read YAML without the bounds."""
    reader = re.compile(r"\byaml\.(safe_load|load|full_load|unsafe_load|compose|parse|load_all|safe_load_all)\b")
    offenders = [str(path.relative_to(SRC)) for path in SRC.rglob("*.py")
                 if path.name != "safe_yaml.py" and reader.search(path.read_text())]
    assert offenders == []


def test_main_reports_a_bomb_override_in_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--recipe", "qwen25_tiny", "dataset.blend=[&x [a], *x, *x]"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "YAML anchor &x is refused" in err
