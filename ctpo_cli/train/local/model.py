"""The policy of the local backend: a real transformers causal LM and its tokenizer.

Without ``--model`` the policy is a Qwen3-architecture model built from a small config with random
weights, and a character-level tokenizer built in code (printable ASCII plus Qwen's chat tokens),
saved and reloaded like any Hugging Face checkpoint, so ``ctpo eval --backend hf`` can load it.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

from ctpo_cli.errors import InputFileError
from ctpo_cli.train.local.config import ModelConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per printable ASCII character, Qwen-style chat tokens."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars, "<unk>"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A randomly initialised Qwen3 causal LM of the given size (deterministic in ``seed``)."""
    torch.manual_seed(seed)
    qwen = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(qwen, attn_implementation="sdpa")
    return model


def load_policy(path: str | Path, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local Hugging Face causal-LM checkpoint and its tokenizer (float32, on ``device``)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputFileError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return on_device(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), device), tokenizer


def on_device(model: PreTrainedModel, device: str) -> PreTrainedModel:
    """``model`` moved to ``device`` (transformers' typing of ``.to`` rejects a device argument)."""
    model.to(torch.device(device))  # type: ignore[arg-type]
    return model
