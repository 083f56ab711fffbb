"""Tiny stock Hugging Face models and datasets for the sift_hf tests: BERT masked LM, GPT-2 and Llama
causal LM (hidden 32, 2 blocks), rows of random tokens, some right-padded."""

from __future__ import annotations

import logging

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

V, T, PAD, MASK = 120, 16, 0, 4
FAMILIES = ("gpt2", "bert", "llama")


def hf_model(family: str, seed: int = 0, layers: int = 2, dropout: float = 0.1):
    torch.manual_seed(seed)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=layers, n_head=2,
                                          resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
    if family == "bert":
        return BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=T, pad_token_id=PAD,
                                          hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=T,
                                        attention_dropout=dropout, tie_word_embeddings=False, pad_token_id=PAD))


class Rows(torch.utils.data.Dataset):
    """Fixed-length rows as a collator would give them (the default collator stacks them)."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def rows(family: str, n: int = 64, seed: int = 0) -> Rows:
    """n rows of T tokens; every fourth right-padded to a random length. BERT: 15% of the real tokens
    masked ([MASK], labels = the token, -100 elsewhere); decoders: labels = input_ids, -100 at the pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (n, T), generator=g)
    lengths = torch.full((n,), T)
    lengths[::4] = torch.randint(T // 2, T, (len(lengths[::4]),), generator=g)
    real = torch.arange(T)[None, :] < lengths[:, None]
    ids = torch.where(real, ids, PAD)
    if family == "bert":
        masked = real & (torch.rand(n, T, generator=g) < 0.15)
        masked[:, 1] = True  # every row has a target
        labels = torch.where(masked, ids, -100)
        ids = torch.where(masked, MASK, ids)
    else:
        labels = torch.where(real, ids, -100)
    return Rows({"input_ids": ids, "attention_mask": real.long(), "labels": labels})


def training_args(out, *, B: int = 4, ga: int = 2, steps: int = 3, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=B, gradient_accumulation_steps=ga, max_steps=steps,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    return TrainingArguments(**(base | kw))


class InOrder(Trainer):
    """A plain Trainer that reads its dataset in order (to feed it the rows another run kept)."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def quiet() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
