"""Small builders shared by tests: a tiny BERT and masked batches from random tokens; tiny decoders
(GPT-2, Llama) and causal-LM batches."""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.batch import Batch
from data_pipeline.masking import MaskingConfig, mask_tokens, row_seeds
from engine.config import ModelConfig, load_config
from engine.methods import MethodStack, build_methods
from engine.models import build_model as build_family
from engine.models.base import DataFacts
from engine.models.bert import SiftBert, build_model
from engine.models.decoder import SiftDecoder
from engine.schedule import Schedule
from engine.setup import attach_methods
from engine.streams import DevicePrefetcher, PhaseTimer, Streams

VOCAB = 120
SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def tiny_model(seed: int = 0, use_nsp: bool = True, layers: int = 3, dropout: float = 0.1) -> SiftBert:
    torch.manual_seed(seed)
    cfg = ModelConfig(preset="tiny", hidden_size=32, num_layers=layers, num_heads=2, intermediate_size=64,
                      dropout=dropout)
    return build_model(cfg, vocab_size=VOCAB, seq_len=32, pad_id=SPECIAL["pad"], use_nsp=use_nsp)


def random_batch(G: int = 8, T: int = 32, seed: int = 0, short_rows: int = 2) -> Batch:
    """G pair-style rows ([CLS] A [SEP] B [SEP], some shorter than T, padded), masked like the loader."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, VOCAB, (G, T), generator=g)
    lengths = torch.full((G,), T)
    lengths[:short_rows] = torch.randint(T // 2, T, (short_rows,), generator=g)
    seg_b = lengths // 2
    rows = torch.arange(G)
    tokens[:, 0] = SPECIAL["cls"]
    tokens[rows, seg_b - 1] = SPECIAL["sep"]
    tokens[rows, lengths - 1] = SPECIAL["sep"]
    cols = torch.arange(T)[None, :]
    tokens = torch.where(cols < lengths[:, None], tokens, torch.full_like(tokens, SPECIAL["pad"]))
    cfg = MaskingConfig(mask_token_id=SPECIAL["mask"], vocab_size=VOCAB, special_ids=tuple(SPECIAL.values()))
    ids, pos, labels = mask_tokens(tokens, lengths, cfg, row_seeds(seed, 0, np.arange(G)))
    return {
        "input_ids": ids,
        "token_type_ids": ((cols >= seg_b[:, None]) & (cols < lengths[:, None])).long(),
        "attention_mask": (cols < lengths[:, None]).long(),
        "mlm_positions": pos,
        "mlm_labels": labels,
        "nsp_labels": torch.randint(0, 2, (G,), generator=g),
        "sample_ids": torch.arange(G),
    }


EOS = 0


def tiny_decoder(family: str, seed: int = 0, layers: int = 3, dropout: float = 0.1, attn: str = "sdpa",
                 seq_len: int = 32) -> SiftDecoder:
    """A tiny GPT-2 or Llama (hidden 32, 2 heads; Llama: 1 key/value head, an untied head)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, preset="tiny", hidden_size=32, num_layers=layers, num_heads=2,
                      num_kv_heads=1 if family == "llama" else None, intermediate_size=64, dropout=dropout,
                      attn_implementation=attn)
    return build_family(cfg, DataFacts(vocab_size=VOCAB, seq_len=seq_len, objective="clm", pad_id=EOS, eos_id=EOS))


def clm_batch(G: int = 8, T: int = 32, seed: int = 0) -> Batch:
    """G packed causal-LM rows of random tokens with a few end-of-text tokens, collated like the loader."""
    from data_pipeline.loader import collate_clm

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (G, T), generator=g)
    tokens[torch.rand(G, T, generator=g) < 0.05] = EOS
    return collate_clm({"tokens": tokens.numpy()}, np.arange(G) + 100 * seed)


def model_and_batches(family: str, seed: int = 0, dropout: float = 0.1):
    """(model, batches(rows_for_draw)) for the schedule and method tests: a tiny BERT with pair batches,
    or a tiny decoder with causal-LM batches."""
    if family == "bert":
        return tiny_model(seed=seed, dropout=dropout), batch_stream
    model = tiny_decoder(family, seed=seed, dropout=dropout)

    def stream(rows_for_draw, start: int = 0):
        d = start
        while True:
            yield clm_batch(G=rows_for_draw(d), seed=1000 + d)
            d += 1

    return model, stream


class PlainEngine:
    """The slice of DeepSpeed's engine API the schedules use, on a plain torch optimizer (for unit tests)."""

    def __init__(self, model, lr: float = 1e-3, grad_accum: int = 1):
        self.module = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.grad_accum = grad_accum
        self.micro_steps = 0

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss):
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1


def batch_stream(rows_for_draw, start: int = 0, T: int = 32):
    """Deterministic device-free loader: draw d is random_batch(rows_for_draw(d), seed=d)."""
    d = start
    while True:
        yield random_batch(G=rows_for_draw(d), T=T, seed=1000 + d)
        d += 1


def methods_for(model, engine, *, B: int, method: str = "sift", grad_accum: int = 1, seed: int = 0,
                device: str = "cpu", plugins: tuple[str, ...] = (), overrides: tuple[str, ...] = (),
                **sift) -> MethodStack:
    """The run's methods as `sift train` builds them (``sift`` keys as keyword arguments, other dotted
    ``overrides``), given the model to change (``prepare_model``: the same parameters, so an engine built
    before still holds them) and attached to it and an engine (PlainEngine or DeepSpeed's)."""
    overrides = [f"method={method}", f"train.micro_batch_size={B}", f"train.grad_accum={grad_accum}",
                 f"train.seed={seed}", f"train.plugins=[{','.join(plugins)}]",
                 *(f"sift.{k}={v}" for k, v in sift.items()), *overrides]
    methods = build_methods(load_config(None, overrides))
    methods.prepare_model(model)
    attach_methods(methods, model, engine, stage=0, device=torch.device(device), rank=0, world_size=1)
    return methods


def schedule_for(cls: type[Schedule], engine, methods: MethodStack, batches, *, grad_accum: int = 1,
                 device: str = "cpu", skip_nonfinite: bool = True) -> Schedule:
    dev = torch.device(device)
    streams = Streams(dev)
    return cls(engine, methods, rank=0, world_size=1, grad_accum=grad_accum, streams=streams,
               timer=PhaseTimer(dev.type == "cuda"), prefetcher=DevicePrefetcher(batches, dev, streams),
               skip_nonfinite=skip_nonfinite)
