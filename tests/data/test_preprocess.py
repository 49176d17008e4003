"""Preprocessing: JSON lines and plain text to an indexed dataset, with worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron.bridge.data import preprocess as preprocess_module
from megatron.bridge.data.documents import iter_documents
from megatron.bridge.data.indexed_dataset import IndexedDataset
from megatron.bridge.data.preprocess import preprocess
from megatron.bridge.data.tokenizer import HuggingFaceTokenizer
from megatron.bridge.data.train_tokenizer import main as train_tokenizer_main

TEXTS = ["import os\nprint(os.getcwd())\n", "def add(a, b):\n    return a + b\n", "x = [i * i for i in range(10)]\n"]


@pytest.fixture
def inputs(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "content": t}) + "\n" for i, t in enumerate(TEXTS)) + "\n")
    text = tmp_path / "notes.txt"
    text.write_text("first paragraph\nstill first\n\n  \nsecond paragraph\n\n\nthird\n")
    return str(jsonl), str(text)


def test_documents_from_json_lines_and_text(inputs):
    jsonl, text = inputs
    assert [d.text for d in iter_documents([jsonl], json_key="content")] == TEXTS
    assert [d.text for d in iter_documents([text])] == [open(text).read()]
    assert [d.text for d in iter_documents([text], text_documents="paragraph")] == [
        "first paragraph\nstill first", "second paragraph", "third"]


def test_each_document_is_its_tokens_then_eod(inputs, tokenizer_dir, tmp_path):
    jsonl, text = inputs
    stats = preprocess([jsonl, text], tokenizer_model=tokenizer_dir, output_prefix=str(tmp_path / "out" / "corpus"),
                       json_key="content", text_documents="paragraph", progress=False)
    tokenizer = HuggingFaceTokenizer(tokenizer_dir)
    expected = [tokenizer.tokenize(t) + [tokenizer.eod] for t in
                [*TEXTS, "first paragraph\nstill first", "second paragraph", "third"]]
    ds = IndexedDataset(str(tmp_path / "out" / "corpus"))
    assert ds.dtype == np.uint16  # a 400-id vocabulary fits
    assert [ds.get(i).tolist() for i in range(len(ds))] == expected
    assert stats.documents == 6 and stats.tokens == sum(map(len, expected)) and stats.dtype == "uint16"


def test_worker_processes_write_identical_files(tokenizer_dir, corpus, tmp_path):
    files = corpus
    preprocess(files, tokenizer_model=tokenizer_dir, output_prefix=str(tmp_path / "one"), progress=False)
    preprocess(files, tokenizer_model=tokenizer_dir, output_prefix=str(tmp_path / "two"), workers=2,
               chunk_documents=2, progress=False)
    for suffix in (".bin", ".idx"):
        with open(tmp_path / f"one{suffix}", "rb") as a, open(tmp_path / f"two{suffix}", "rb") as b:
            assert a.read() == b.read()
    assert len(IndexedDataset(str(tmp_path / "two"))) == len(files)


def test_large_vocabularies_are_stored_as_int32(inputs, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess_module, "optimal_dtype", lambda vocab_size: np.int32)
    stats = preprocess([inputs[0]], tokenizer_model=tokenizer_dir, output_prefix=str(tmp_path / "wide"),
                       json_key="content", progress=False)
    assert stats.dtype == "int32" and IndexedDataset(str(tmp_path / "wide")).dtype == np.int32


@pytest.mark.parametrize(("line", "fragment"), [
    ('{"text": "a"}', "docs.jsonl:2: no key 'content' (found: text); choose one with --json-key"),
    ("not json", "docs.jsonl:2: not a JSON object"),
    ('{"content": 3}', "docs.jsonl:2: 'content' holds int, not text"),
])
def test_bad_json_lines_name_file_and_line(tmp_path, tokenizer_dir, line, fragment):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"content": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ValueError) as info:
        preprocess([str(path)], tokenizer_model=tokenizer_dir, output_prefix=str(tmp_path / "x"), json_key="content",
                   workers=2, progress=False)
    assert fragment in str(info.value)
    assert not os.path.exists(tmp_path / "x.idx")  # nothing half-written is published


def test_command_line(inputs, tokenizer_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "megatron.bridge.data.preprocess", "--input", inputs[0], "--json-key", "content",
         "--tokenizer-model", tokenizer_dir, "--output-prefix", str(tmp_path / "cli"), "--workers", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "3 documents" in result.stdout and "preprocess: 100%" in result.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "megatron.bridge.data.preprocess", "--input", str(tmp_path / "nope.txt"),
         "--tokenizer-model", tokenizer_dir, "--output-prefix", str(tmp_path / "cli2")],
        capture_output=True, text=True, timeout=120,
    )
    assert missing.returncode == 2 and "input file" in missing.stderr and "nope.txt does not exist" in missing.stderr
    assert missing.stderr.count("\n") == 1 and "usage:" not in missing.stderr  # one line, not the usage block


@pytest.mark.parametrize(("command", "args", "message"), [
    (preprocess_module.main, ["--tokenizer-model", "TOK", "--output-prefix", "OUT/x", "--workers", "0"],
     "workers=0 and chunk_documents=64 must be at least 1"),
    (preprocess_module.main, ["--tokenizer-model", "OUT", "--output-prefix", "OUT/x"],
     "tokenizer.tokenizer_model='OUT' is invalid: OUT holds no tokenizer.json"),
    (train_tokenizer_main, ["--vocab-size", "1000", "--output", "OUT/tok", "--text-documents", "file"], None),
])
def test_data_commands_print_one_line_errors(command, args, message, inputs, tokenizer_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n[1, 2]\n')
    argv = [a.replace("TOK", tokenizer_dir).replace("OUT", str(tmp_path)) for a in ["--input", str(bad), *args]]
    with pytest.raises(SystemExit) as info:
        command(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "usage:" not in err
    assert err.startswith(f"python -m megatron.bridge.data.{command.__module__.rsplit('.', 1)[1]}: error: ")
    assert (message or "bad.jsonl:2: no key 'text' (found: list)").replace("OUT", str(tmp_path)) in err
