"""Configuration: bad values fail before any work with a message naming field, value and what is allowed;
the recipes hold the contract's values."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re

import pytest
import torch
import torch.distributed as dist

from helpers import make_tiny_config
from megatron.bridge.recipes.qwen import (
    qwen25_1p5b_pretrain_config,
    qwen25_7b_pretrain_config,
    qwen25_500m_pretrain_config,
)
from megatron.bridge.training.callbacks import VALID_EVENTS, Callback, CallbackManager
from megatron.bridge.training.config import ConfigContainer, ConfigError, GPTDatasetConfig, UnknownFieldError
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain


def _set(path, value):
    def mutate(cfg):
        target = cfg
        *parents, name = path.split(".")
        for part in parents:
            target = getattr(target, part)
        assert hasattr(target, name), path
        setattr(target, name, value)

    return mutate


def _all(*mutations):
    def mutate(cfg):
        for m in mutations:
            m(cfg)

    return mutate


# (id, mutation, field named in the message, fragments the message must also contain: value, what is allowed)
BAD_CONFIGS = [
    ("gbs_not_divisible_by_mbs", _all(_set("train.global_batch_size", 6), _set("train.micro_batch_size", 4)),
     "global_batch_size", ["6", "micro_batch_size", "4"]),
    ("heads_do_not_divide_hidden", _all(_set("model.num_attention_heads", 5), _set("model.num_query_groups", 1)),
     "hidden_size", ["64", "num_attention_heads", "5"]),
    ("query_groups_do_not_divide_heads", _set("model.num_query_groups", 3),
     "num_query_groups", ["3", "num_attention_heads", "4"]),
    ("seq_length_mismatch", _set("dataset.seq_length", 64),
     "seq_length", ["64", "model.seq_length", "32"]),
    ("eval_interval_0", _set("validation.eval_interval", 0),
     "validation.eval_interval", ["=0", "positive integer"]),
    ("log_interval_negative", _set("logger.log_interval", -1),
     "logger.log_interval", ["-1", "positive integer"]),
    ("tensorboard_log_interval_0", _set("logger.tensorboard_log_interval", 0),
     "logger.tensorboard_log_interval", ["=0", "positive integer"]),
    ("tensorboard_queue_size_text", _set("logger.tensorboard_queue_size", "big"),
     "logger.tensorboard_queue_size", ["'big'", "positive integer"]),
    ("throughput_window_size_0", _set("logger.throughput_window_size", 0),
     "logger.throughput_window_size", ["=0", "positive integer"]),
    ("timing_log_level_3", _set("logger.timing_log_level", 3),
     "logger.timing_log_level", ["=3", "0 (iteration time)", "1", "2"]),
    ("timing_log_level_bool", _set("logger.timing_log_level", True),
     "logger.timing_log_level", ["=True", "0 (iteration time)"]),
    ("unknown_timing_log_option", _set("logger.timing_log_option", "mean"),
     "logger.timing_log_option", ["'mean'", "max", "minmax", "all"]),
    ("log_validation_ppl_not_bool", _set("logger.log_validation_ppl_to_tensorboard", "yes"),
     "logger.log_validation_ppl_to_tensorboard", ["'yes'", "True or False"]),
    ("save_interval_0", _set("checkpoint.save_interval", 0),
     "checkpoint.save_interval", ["=0", "positive integer"]),
    ("unknown_lr_decay_style", _set("scheduler.lr_decay_style", "step"),
     "scheduler.lr_decay_style", ["'step'", "constant", "linear", "cosine", "WSD"]),
    ("unknown_mixed_precision", _set("mixed_precision", "int8_mixed"),
     "mixed_precision", ["'int8_mixed'", "bf16_mixed", "fp16_mixed"]),
    ("min_lr_above_lr", _all(_set("optimizer.lr", 1e-3), _set("optimizer.min_lr", 0.5)),
     "optimizer.min_lr", ["0.5", "optimizer.lr", "0.001"]),
    ("unknown_optimizer", _set("optimizer.optimizer", "lamb"),
     "optimizer.optimizer", ["'lamb'", "adam", "sgd"]),
    ("negative_eval_iters", _set("validation.eval_iters", -2),
     "validation.eval_iters", ["-2", ">= 0"]),
    ("dropout_above_one", _set("model.hidden_dropout", 1.5),
     "model.hidden_dropout", ["1.5", "[0, 1)"]),
    ("attention_dropout_negative", _set("model.attention_dropout", -0.1),
     "model.attention_dropout", ["-0.1", "[0, 1)"]),
    ("tensor_parallel_2", _set("model.tensor_model_parallel_size", 2),
     "model.tensor_model_parallel_size", ["2", "1"]),
    ("train_iters_none_without_skip_train", _set("train.train_iters", None),
     "train.train_iters", ["None", "skip_train"]),
    ("unknown_normalization", _set("model.normalization", "BatchNorm"),
     "model.normalization", ["'BatchNorm'", "RMSNorm", "LayerNorm"]),
    ("unknown_tokenizer_type", _set("tokenizer.tokenizer_type", "SentencePieceTokenizer"),
     "tokenizer.tokenizer_type", ["'SentencePieceTokenizer'", "NullTokenizer"]),
    ("micro_batch_0", _set("train.micro_batch_size", 0),
     "train.micro_batch_size", ["0", "positive integer"]),
    ("negative_learning_rate", _set("optimizer.lr", -1.0),
     "optimizer.lr", ["-1.0", ">= 0"]),
]


class Recorder:
    def __init__(self):
        self.events = []
        self.manager = CallbackManager()
        for event in sorted(VALID_EVENTS):
            self.manager.register(event, lambda context, _e=event: self.events.append(_e))


@pytest.mark.parametrize(("mutate", "field", "fragments"), [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_fails_before_any_work(chdir, mutate, field, fragments):
    cfg = make_tiny_config(checkpoint__save=str(chdir / "ckpt"), checkpoint__save_interval=2,
                           logger__tensorboard_dir=str(chdir / "tb"))
    mutate(cfg)
    calls = []

    def forward(state, data_iterator, model):
        calls.append(1)
        return forward_step(state, data_iterator, model)

    recorder = Recorder()
    with pytest.raises(ValueError, match=re.escape(field)) as info:
        pretrain(cfg, forward, callbacks=recorder.manager)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert calls == []
    assert recorder.events == []
    assert not dist.is_initialized()
    assert sorted(os.listdir(chdir)) == []


def test_bad_config_message_format_via_validate():
    cfg = make_tiny_config(validation__eval_interval=0)
    with pytest.raises(ValueError, match=r"^validation\.eval_interval=0 is invalid: "):
        cfg.validate()


def test_skip_train_allows_train_iters_none():
    cfg = make_tiny_config(train__train_iters=None, validation__skip_train=True)
    cfg.validate()


def test_skip_train_with_train_iters_none_runs_the_validation_and_test_passes():
    manager = CallbackManager()
    seen: list[str] = []
    for event in ("on_train_start", "on_eval_end", "on_test_end"):
        manager.register(event, lambda context, event=event: seen.append(event))
    pretrain(make_tiny_config(train__train_iters=None, validation__skip_train=True), forward_step, manager)
    assert seen == ["on_eval_end", "on_test_end"]


def test_a_missing_wandb_is_refused_at_start(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else real_find_spec(name, *args))
    with pytest.raises(ConfigError, match=r"logger\.wandb_project='demo' is invalid: None, or install wandb first"):
        pretrain(make_tiny_config(logger__wandb_project="demo"), forward_step)
    assert not dist.is_initialized()  # before any work, not at the first validation


def test_valid_tiny_config_validates():
    make_tiny_config().validate()


# --------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", [qwen25_500m_pretrain_config, qwen25_1p5b_pretrain_config,
                                    qwen25_7b_pretrain_config])
def test_recipes_validate(chdir, recipe):
    cfg = recipe()
    assert isinstance(cfg, ConfigContainer)
    cfg.validate()
    # Building the config does no work: nothing is written.
    assert os.listdir(chdir) == []


def test_qwen25_500m_recipe_values(chdir):
    cfg = qwen25_500m_pretrain_config()
    cwd = os.getcwd()
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size) == (
        24, 896, 14, 2, 4864)
    assert m.resolved_kv_channels == 64
    assert m.normalization == "RMSNorm"
    assert m.gated_linear_unit is True
    assert m.layernorm_epsilon == 1e-6
    assert m.rotary_base == 1_000_000
    assert m.position_embedding_type == "rope"
    assert m.add_qkv_bias is True
    assert m.add_bias_linear is False
    assert m.share_embeddings_and_output_weights is True
    assert m.hidden_dropout == 0.0 and m.attention_dropout == 0.0
    assert m.init_method_std == 0.02
    assert m.seq_length == 4096 and cfg.dataset.seq_length == 4096
    assert m.vocab_size in (None, 32_000)  # follows the tokenizer

    t = cfg.train
    assert (t.global_batch_size, t.micro_batch_size, t.train_iters) == (32, 2, 300_000)
    assert t.manual_gc is True and t.manual_gc_interval == 100

    o = cfg.optimizer
    assert o.optimizer == "adam"
    assert (o.lr, o.min_lr) == (3e-4, 3e-5)
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps) == (0.9, 0.95, 1e-8)
    assert o.clip_grad == 1.0
    assert o.weight_decay == 0.1

    s = cfg.scheduler
    assert s.lr_decay_style == "cosine"
    assert s.lr_warmup_iters == 500
    assert s.start_weight_decay == 0.033 and s.end_weight_decay == 0.033
    assert s.weight_decay_incr_style == "constant"
    assert s.override_opt_param_scheduler is True

    assert (cfg.validation.eval_interval, cfg.validation.eval_iters) == (500, 32)
    assert cfg.validation.skip_train is False
    assert cfg.checkpoint.save_interval == 500
    assert cfg.logger.log_interval == 10
    assert cfg.rng.seed == 1234
    assert cfg.mixed_precision == "bf16_mixed"
    assert cfg.compute_dtype == "bf16"
    assert cfg.ddp.check_for_nan_in_grad is True

    assert isinstance(cfg.dataset, GPTDatasetConfig)
    assert cfg.dataset.split == "9999,8,2"
    assert cfg.dataset.blend is None and cfg.dataset.data_path is None
    assert cfg.dataset.uses_mock_data
    assert cfg.tokenizer.tokenizer_type == "NullTokenizer"
    assert cfg.tokenizer.vocab_size == 32_000

    checkpoints = os.path.join(cwd, "nemo_experiments", "default", "checkpoints")
    assert cfg.checkpoint.save == checkpoints
    assert cfg.checkpoint.load == checkpoints
    assert cfg.logger.tensorboard_dir == os.path.join(cwd, "nemo_experiments", "default", "tb_logs")


def test_recipe_paths_follow_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    first = qwen25_500m_pretrain_config()
    monkeypatch.chdir(tmp_path / "b")
    second = qwen25_500m_pretrain_config()
    assert first.checkpoint.save.startswith(os.path.join(str(tmp_path), "a"))
    assert second.checkpoint.save.startswith(os.path.join(str(tmp_path), "b"))


def test_recipes_return_independent_configs(chdir):
    first, second = qwen25_500m_pretrain_config(), qwen25_500m_pretrain_config()
    first.model.num_layers = 1
    first.train.train_iters = 5
    assert second.model.num_layers == 24
    assert second.train.train_iters == 300_000


@pytest.mark.parametrize(("recipe", "shape", "tied"), [
    (qwen25_1p5b_pretrain_config, (28, 1536, 12, 2, 8960), True),
    (qwen25_7b_pretrain_config, (28, 3584, 28, 4, 18944), False),
], ids=["1p5b", "7b"])
def test_larger_qwen_recipes_shapes(chdir, recipe, shape, tied):
    cfg = recipe()
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size) == shape
    assert m.share_embeddings_and_output_weights is tied
    assert m.rotary_base == 1_000_000
    assert m.layernorm_epsilon == 1e-6
    assert m.normalization == "RMSNorm"
    assert m.add_qkv_bias is True
    assert m.add_bias_linear is False
    # Same training defaults as the 0.5B recipe.
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (32, 2)
    assert cfg.mixed_precision == "bf16_mixed"
    assert cfg.tokenizer.vocab_size == 32_000


# ------------------------------------------------------------------ non-finite and absurd numbers

# Where infinity means "no limit" and is accepted; NaN is refused everywhere.
INFINITY_ALLOWED = {"train.exit_duration_in_mins", "optimizer.clip_grad"}


def _float_fields() -> list[str]:
    """`section.field` for every float-typed field of every section and of the model provider."""
    cfg = make_tiny_config()
    paths = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        paths += [f"{section.name}.{f.name}" for f in dataclasses.fields(value) if "float" in str(f.type)]
    return paths + ["model.rotary_base"]  # an int field that also takes floats (Hugging Face's rope_theta)


def test_the_float_table_covers_every_section_that_has_floats():
    sections = {path.split(".")[0] for path in _float_fields()}
    assert sections == {"train", "optimizer", "scheduler", "logger", "model"}
    assert {"optimizer.lr", "optimizer.min_lr", "scheduler.end_weight_decay", "model.layernorm_epsilon",
            "optimizer.initial_loss_scale"} <= set(_float_fields())


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("path", _float_fields())
def test_every_float_field_refuses_nan_and_needless_infinity(path, value):
    cfg = make_tiny_config()
    _set(path, value)(cfg)
    if value == math.inf and path in INFINITY_ALLOWED:
        cfg.validate()
        return
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}=-?(nan|inf) is invalid: "):
        cfg.validate()


# (id, mutation, the config key the message starts with, fragments it must also contain)
ABSURD_CONFIGS = [
    ("lr_inf", _set("optimizer.lr", math.inf), "optimizer.lr", ["inf", "finite"]),
    ("clip_grad_nan", _set("optimizer.clip_grad", math.nan), "optimizer.clip_grad", ["nan", ">= 0"]),
    ("weight_decay_inf", _set("optimizer.weight_decay", math.inf), "optimizer.weight_decay", ["finite"]),
    ("adam_eps_inf", _set("optimizer.adam_eps", math.inf), "optimizer.adam_eps", ["finite"]),
    ("min_lr_nan", _set("optimizer.min_lr", math.nan), "optimizer.min_lr", ["nan", "optimizer.lr"]),
    ("lr_warmup_init_inf", _set("scheduler.lr_warmup_init", math.inf), "scheduler.lr_warmup_init", ["finite"]),
    ("end_weight_decay_nan", _set("scheduler.end_weight_decay", math.nan), "scheduler.end_weight_decay", ["nan"]),
    ("seed_2_to_32", _set("rng.seed", 2**32), "rng.seed", ["4294967296", "2**32"]),
    ("seed_negative", _set("rng.seed", -1), "rng.seed", ["-1", "2**32"]),
    ("dataset_seed_2_to_32", _set("dataset.random_seed", 2**32), "dataset.random_seed", ["2**32"]),
    ("split_inf", _set("dataset.split", "inf,1,1"), "dataset.split", ["'inf,1,1'", "finite"]),
    ("split_nan", _set("dataset.split", "1,nan,1"), "dataset.split", ["'1,nan,1'"]),
    ("vocab_size_1", _set("tokenizer.vocab_size", 1), "tokenizer.vocab_size", ["=1", ">= 2", "end-of-document"]),
    ("lr_a_string", _set("optimizer.lr", "1e-3"), "optimizer.lr", ["'1e-3'", "number"]),
    ("beta_a_bool", _set("optimizer.adam_beta1", True), "optimizer.adam_beta1", ["True", "[0, 1)"]),
    ("warmup_iters_a_bool", _set("scheduler.lr_warmup_iters", True), "scheduler.lr_warmup_iters", ["True"]),
    ("eval_iters_inf", _set("validation.eval_iters", math.inf), "validation.eval_iters", ["inf"]),
    ("sgd_momentum_above_one", _set("optimizer.sgd_momentum", 1.5), "optimizer.sgd_momentum", ["1.5", "[0, 1)"]),
    ("min_loss_scale_above_initial", _all(_set("optimizer.initial_loss_scale", 8.0),
                                          _set("optimizer.min_loss_scale", 16.0)),
     "optimizer.min_loss_scale", ["16.0", "initial_loss_scale=8.0"]),
    ("loss_scale_window_0", _set("optimizer.loss_scale_window", 0), "optimizer.loss_scale_window", ["positive"]),
    ("rope_scaling_inf", _set("model.rope_scaling", {"rope_type": "llama3", "factor": math.inf,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192}),
     "model.rope_scaling['factor']", ["inf", "finite"]),
]


@pytest.mark.parametrize(("mutate", "key", "fragments"), [c[1:] for c in ABSURD_CONFIGS],
                         ids=[c[0] for c in ABSURD_CONFIGS])
def test_absurd_values_are_refused_naming_the_config_key(mutate, key, fragments):
    cfg = make_tiny_config()
    mutate(cfg)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    message = str(info.value)
    assert message.startswith(f"{key}="), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(("path", "value"), [("optimizer.clip_grad", math.inf),
                                             ("train.exit_duration_in_mins", math.inf),
                                             ("rng.seed", 2**32 - 1), ("tokenizer.vocab_size", 2)])
def test_edge_values_that_make_sense_are_accepted(path, value):
    cfg = make_tiny_config()
    _set(path, value)(cfg)
    cfg.validate()


# Internal names of OptimizerParamScheduler that a config error must never be phrased in.
SCHEDULER_NAMES = re.compile(r"\b(init_lr|max_lr|start_wd|end_wd|wd_incr_steps|lr_decay_steps|lr_warmup_steps|"
                             r"wsd_decay_steps|wd_incr_style)\b")

# Configs the scheduler itself would refuse: (id, mutation, the config key the message starts with).
SCHEDULER_REFUSALS = [
    ("constant_wd_with_different_end", _all(_set("scheduler.start_weight_decay", None),
                                            _set("scheduler.end_weight_decay", 0.5)), "scheduler.end_weight_decay"),
    ("constant_wd_with_different_start", _all(_set("scheduler.end_weight_decay", None),
                                              _set("scheduler.start_weight_decay", 0.5)),
     "scheduler.start_weight_decay"),
    ("constant_wd_with_both_different", _all(_set("scheduler.start_weight_decay", 0.1),
                                             _set("scheduler.end_weight_decay", 0.2)), "scheduler.end_weight_decay"),
    ("end_wd_nan", _set("scheduler.end_weight_decay", math.nan), "scheduler.end_weight_decay"),
    ("start_wd_negative", _all(_set("scheduler.start_weight_decay", -0.1),
                               _set("scheduler.weight_decay_incr_style", "linear")), "scheduler.start_weight_decay"),
    ("warmup_init_negative", _set("scheduler.lr_warmup_init", -1.0), "scheduler.lr_warmup_init"),
    ("min_lr_above_max", _set("optimizer.min_lr", 1.0), "optimizer.min_lr"),
    ("wsd_decay_iters_0", _set("scheduler.lr_wsd_decay_iters", 0), "scheduler.lr_wsd_decay_iters"),
    ("unknown_wd_incr_style", _set("scheduler.weight_decay_incr_style", "step"), "scheduler.weight_decay_incr_style"),
]


@pytest.mark.parametrize(("mutate", "key"), [c[1:] for c in SCHEDULER_REFUSALS], ids=[c[0] for c in SCHEDULER_REFUSALS])
def test_config_validation_catches_what_the_scheduler_would_refuse(mutate, key):
    from megatron.bridge.training.optim import setup_optimizer

    cfg = make_tiny_config()
    mutate(cfg)
    with pytest.raises(ValueError):  # the scheduler does refuse it: the case is real
        setup_optimizer(cfg.optimizer, cfg.scheduler, [torch.nn.Linear(2, 2)], train_iters=cfg.train.train_iters)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    message = str(info.value)
    assert message.startswith(f"{key}="), message
    assert not SCHEDULER_NAMES.search(message), message


def test_constant_weight_decay_error_names_where_the_other_end_comes_from():
    cfg = make_tiny_config(optimizer__weight_decay=0.1, scheduler__start_weight_decay=None,
                           scheduler__end_weight_decay=0.033)
    with pytest.raises(ConfigError, match=r"^scheduler\.end_weight_decay=0\.033 is invalid: equal to "
                                          r"optimizer\.weight_decay=0\.1 with .*'constant'"):
        cfg.validate()
    cfg.scheduler.weight_decay_incr_style = "linear"
    cfg.validate()


# ---------------------------------------------------------------------------- misspelled fields


def _config_objects():
    """(label, object) for every config class: each section, the container and every model provider."""
    from megatron.bridge.models import llama, qwen
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.config import MockGPTDatasetConfig

    cfg = make_tiny_config()
    objects = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
               if dataclasses.is_dataclass(getattr(cfg, f.name))]
    objects += [("container", cfg), ("mock_dataset", MockGPTDatasetConfig())]
    providers = [GPTModelProvider, qwen.Qwen2ModelProvider, qwen.Qwen25ModelProvider500M,
                 qwen.Qwen25ModelProvider1P5B, qwen.Qwen25ModelProvider7B, llama.LlamaModelProvider,
                 llama.Llama32ModelProvider1B, llama.Llama31ModelProvider8B]
    return objects + [(provider.__name__, provider()) for provider in providers]


@pytest.mark.parametrize(("label", "obj"), _config_objects(), ids=[label for label, _ in _config_objects()])
def test_every_config_object_refuses_a_misspelled_field(label, obj):
    fields = [f.name for f in dataclasses.fields(obj)]
    real = fields[0]
    misspelled = real[:-1] if len(real) > 3 else real + "x"
    with pytest.raises(UnknownFieldError) as info:
        setattr(obj, misspelled, 1)
    err = info.value
    assert isinstance(err, AttributeError) and isinstance(err, ConfigError)
    message = str(err)
    section = obj._section
    assert f"unknown field {section + '.' if section else ''}{misspelled} " in message, message
    assert f"(did you mean {real}?)" in message, message
    assert all(name in message.split("valid fields", 1)[1] for name in fields), message
    assert not hasattr(obj, misspelled)
    setattr(obj, real, getattr(obj, real))  # real fields stay assignable
    obj._private_note = "kept"  # and private attributes free
    assert obj._private_note == "kept"


def test_misspellings_from_the_issue_are_refused_with_the_valid_fields():
    cfg = make_tiny_config()
    with pytest.raises(AttributeError, match=r"^unknown field train\.train_iter \(did you mean train_iters\?\); "
                                             r"valid fields of train: train_iters, global_batch_size, "):
        cfg.train.train_iter = 5
    with pytest.raises(ValueError, match=r"^unknown field optimizer\.learning_rate; valid fields of optimizer: "
                                         r"optimizer, lr, min_lr"):
        cfg.optimizer.learning_rate = 1e-3
    assert cfg.train.train_iters == 4 and cfg.optimizer.lr == make_tiny_config().optimizer.lr


def test_the_provider_keeps_its_hooks_and_copies_of_guarded_configs_work():
    import copy

    cfg = make_tiny_config()
    cfg.model.register_pre_wrap_hook(lambda model: None)
    clone = copy.deepcopy(cfg)
    clone.validate()
    assert len(clone.model.pre_wrap_hooks) == 1
    assert dataclasses.replace(cfg.train, train_iters=7).train_iters == 7


@pytest.mark.parametrize(("train_iters", "decay_iters", "warmup", "capped"), [(4, None, 10, 3), (4, None, 4, 3),
                                                                              (10, 2, 3, 1), (1, None, 5, 0)])
def test_a_warm_up_not_shorter_than_the_decay_span_is_capped_with_a_warning(train_iters, decay_iters, warmup, capped):
    from megatron.bridge.training.optim import setup_optimizer

    cfg = make_tiny_config(train__train_iters=train_iters, scheduler__lr_decay_iters=decay_iters,
                           scheduler__lr_warmup_iters=warmup)
    with pytest.warns(UserWarning, match=rf"scheduler.lr_warmup_iters={warmup} .* warming up over {capped} steps"):
        cfg.validate()
    assert cfg.scheduler.lr_warmup_iters == warmup  # the config is not rewritten; the schedule is capped
    _, scheduler = setup_optimizer(cfg.optimizer, cfg.scheduler, [torch.nn.Linear(2, 2)], train_iters=train_iters)
    assert scheduler.lr_warmup_steps == capped


def test_a_smoke_run_of_the_full_recipe_starts_despite_its_long_warm_up():
    cfg = qwen25_500m_pretrain_config()
    cfg.train.train_iters = 2
    with pytest.warns(UserWarning, match="lr_warmup_iters=500"):
        cfg.validate()


def test_a_zero_learning_rate_trains_without_changing_the_weights(tiny_config):
    class Weights(Callback):
        def on_train_start(self, context):
            self.before = copy.deepcopy(context.model[0].state_dict())

        def on_train_end(self, context):
            self.after = context.model[0].state_dict()

    probe = Weights()
    pretrain(tiny_config(train__train_iters=2, optimizer__lr=0.0, optimizer__min_lr=0.0), forward_step, [probe])
    assert probe.before.keys() == probe.after.keys()
    assert all(torch.equal(probe.before[k], probe.after[k]) for k in probe.before)


@pytest.mark.parametrize(("ddp", "optimizer", "sharded"), [
    (None, None, False), (True, None, True), (None, True, True), (True, True, True), (False, False, False),
])
def test_use_distributed_optimizer_is_one_switch_spelled_twice(ddp, optimizer, sharded):
    cfg = make_tiny_config(ddp__use_distributed_optimizer=ddp, optimizer__use_distributed_optimizer=optimizer)
    cfg.validate()
    assert cfg.uses_distributed_optimizer is sharded


def test_the_two_spellings_of_use_distributed_optimizer_may_not_disagree():
    cfg = make_tiny_config(ddp__use_distributed_optimizer=True, optimizer__use_distributed_optimizer=False)
    with pytest.raises(ConfigError, match="optimizer.use_distributed_optimizer=False .* ddp.use_distributed_optimizer"):
        cfg.validate()


def test_fsdp2_cannot_turn_off_overlapping_its_reduction():
    cfg = make_tiny_config(ddp__use_distributed_optimizer=True, ddp__overlap_grad_reduce=False)
    with pytest.raises(ConfigError, match="ddp.overlap_grad_reduce=False .* use_distributed_optimizer"):
        cfg.validate()


def test_megatron_bridge_s_logger_keys_are_known_with_upstream_s_defaults():
    from megatron.bridge.training.config import LoggerConfig

    logger = LoggerConfig()
    assert (logger.tensorboard_log_interval, logger.tensorboard_queue_size, logger.timing_log_level,
            logger.timing_log_option, logger.log_timers_to_tensorboard, logger.log_loss_scale_to_tensorboard,
            logger.log_validation_ppl_to_tensorboard, logger.log_throughput_to_tensorboard,
            logger.throughput_window_size) == (1, 1000, 0, "minmax", False, True, False, False, 100)
    make_tiny_config(logger__tensorboard_log_interval=5, logger__tensorboard_queue_size=10,
                     logger__timing_log_level=2, logger__timing_log_option="all",
                     logger__log_loss_scale_to_tensorboard=False, logger__log_validation_ppl_to_tensorboard=True,
                     logger__log_throughput_to_tensorboard=True, logger__throughput_window_size=3).validate()
