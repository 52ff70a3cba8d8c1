"""Shared by the examples: a tiny word-level tokenizer and a tiny Llama built from a config (nothing downloaded).

Swap these for ``AutoTokenizer.from_pretrained(...)`` / ``AutoModelForCausalLM.from_pretrained(...)`` in real use.
"""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = (
    "what color is the sky sea grass snow sun night it blue green white yellow black red maybe "
    "name a fruit animal apple banana cat dog rock car i do not know sure here one two three four five "
    "count to say hello hi bye please thanks great bad good answer question , . ? !"
).split()


def tiny_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A word-level tokenizer over :data:`WORDS`; prompts get a BOS token, completions get EOS from the helper."""
    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


def tiny_model(tokenizer, seed: int = 0) -> transformers.PreTrainedModel:
    """A 2-layer Llama with hidden size 32, random weights."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.AutoModelForCausalLM.from_config(config)


def training_args(output_dir: str, **overrides) -> transformers.TrainingArguments:
    """A few CPU-friendly steps, logging every step, no checkpoints, no reporting integrations."""
    kwargs = dict(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
                  logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                  dataloader_pin_memory=False)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)
