"""megatron-bridge-lite: Megatron Bridge's training API and callback system in pure PyTorch.

Where things live (each sub-package loads on first use, so `import megatron.bridge` is cheap):

| what | where |
| --- | --- |
| training: `pretrain`, `finetune`; the default `forward_step` | `training.pretrain`, `.finetune`; `.gpt_step` |
| configuration: `ConfigContainer` and its sections | `training.config` |
| callbacks: `Callback`, `CallbackContext`, `CallbackManager`; built-ins | `training.callbacks`, `.builtin_callbacks` |
| run state: `GlobalState`, `TrainState` | `training.state` |
| recipes: `qwen25_500m_pretrain_config`, ... | `recipes` (`recipes.qwen`) |
| models: `GPTModelProvider`, the Qwen2 and Llama providers, `GPTModel` | `models` |
| Hugging Face checkpoints in and out: `AutoBridge` | `megatron.bridge.AutoBridge` (`models.conversion`) |
| data: tokenizers, indexed datasets, blends, loaders, finetuning data | `data` (`data.sft`) |
| LoRA and DoRA adapters | `peft` |
| the checkpoint format (layout, checksums, schemas, folder lock) | `checkpoint` |
| rank-aware printing, the parallel layout, error types | `utils` |

Commands: `megatron-bridge-pretrain` (or `python -m megatron.bridge.pretrain`), `python -m
megatron.bridge.convert`, `python -m megatron.bridge.data.train_tokenizer`, `python -m
megatron.bridge.data.preprocess`.
"""

from megatron.bridge.utils.lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY: dict[str, str | None] = {
    "AutoBridge": "models.conversion.auto_bridge",
    "checkpoint": None,
    "data": None,
    "models": None,
    "peft": None,
    "recipes": None,
    "training": None,
    "utils": None,
}

__all__ = ["__version__", *_LAZY]

# PEP 562: `AutoBridge` loads the Hugging Face conversion code only when asked for, and the
# sub-packages load on first access; `dir()` lists them all before that.
__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
del lazy_attributes
