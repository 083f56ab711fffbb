"""Decoder-only causal LMs behind the model adapter: what GPT-2 (gpt2.py) and Llama (llama.py) share.

A family module subclasses ``DecoderExit`` (how token ids become the first hidden states and what each
block gets: learned positions for GPT-2, rotary embeddings for Llama; how to build a fresh copy) and
``SiftDecoder`` (where the stock model keeps its blocks, final norm and LM head). Everything else is
here: the training forward, which is the exit path at block L with autograd on; the early exit at block
j, which is the logit lens (the model's own final norm and LM head after block j, no parameter added);
the loss contract; metrics (``lm_loss``, ``lm_acc``, ``lm_ppl``); the FLOP model; export.

Attention is causal over the whole packed row (data_pipeline/batch.py: no padding, positions 0..T-1).
Under SDPA the blocks get no mask at all, so SDPA runs its causal kernel (``is_causal``) and nothing
reads a mask to the host; other attention implementations get transformers' causal mask.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask

from engine.config import ModelConfig
from engine.models.base import Batch, DataFacts, Exp, FlopCounts, Metric, Ratio, SiftModel, token_sums
from engine.models.errors import ModelError
from engine.scoring import per_sequence_mean, token_cross_entropy


def causal_mask(config: PretrainedConfig, hidden: torch.Tensor) -> torch.Tensor | None:
    """The mask every block gets: None under SDPA (its causal kernel; no mask built, no host sync),
    else transformers' causal mask for the configured attention implementation."""
    if config._attn_implementation == "sdpa":
        return None
    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=None)


def block_output(out: Any) -> torch.Tensor:
    """A block's hidden states: a tensor (transformers 5), or the first element of a tuple (4.x)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def unique_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    """Each parameter of ``modules`` once (a tied LM head shares the embedding matrix), in module order."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def chunked_head_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, T, H) hidden states, (G, T) labels -> (G, T) fp32 next-token CE and (G, T) hits (argmax = label),
    running ``head`` and the loss over ``chunk`` positions at a time under activation checkpointing, so
    that one chunk's logits and fp32 buffers exist at a time, in the forward and in the backward (which
    runs the head again on each chunk). Equal to the unchunked values up to fp32 summation order."""
    G, T, H = hidden.shape

    def piece(h: torch.Tensor, lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h)
        # CE first: the backward's recompute stops once the CE has saved its tensors (checkpoint's early
        # stop), so it never runs the argmax
        return token_cross_entropy(logits, lab), logits.detach().argmax(-1) == lab

    ces, hits = [], []
    for h, lab in zip(hidden.reshape(G * T, H).split(chunk), labels.reshape(G * T).split(chunk)):
        ce, hit = checkpoint(piece, h, lab, use_reentrant=False)
        ces.append(ce)
        hits.append(hit)
    return torch.cat(ces).view(G, T), torch.cat(hits).view(G, T)


class DecoderExit:
    """The early exit after block j (an ``ExitPath``): the embeddings, blocks 1..j, then the model's own
    final norm and LM head at every position (the logit lens). Views of the live model, or a replica.

    Subclasses implement ``embed`` and ``fresh``.
    """

    def __init__(self, config: PretrainedConfig, embed_modules: list[nn.Module], layers: list[nn.Module],
                 norm: nn.Module, head: nn.Linear):
        self.config, self.embed_modules, self.layers, self.norm, self.head = config, embed_modules, layers, norm, head
        self.vocab_size = head.out_features

    # -- the family's part ------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """(G, T) ids -> (G, T, H) first hidden states and the keyword arguments every block gets."""
        raise NotImplementedError

    def fresh(self) -> DecoderExit:
        """The same structure with new, unshared modules (weights not copied; a tied head stays tied)."""
        raise NotImplementedError

    # -- ExitPath ----------------------------------------------------------------------------------

    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(G, T) ids -> (G, T, H) the hidden states after the last of ``layers`` (before the final norm)."""
        hidden, kwargs = self.embed(input_ids)
        for layer in self.layers:
            hidden = block_output(layer(hidden, **kwargs))
        return hidden

    def modules(self) -> list[nn.Module]:
        return [*self.embed_modules, *self.layers, self.norm, self.head]

    def parameters(self) -> list[nn.Parameter]:
        return unique_parameters(self.modules())

    def hidden(self, batch: Batch) -> torch.Tensor:
        """(G, T, H): block j's hidden states at every position (each one predicts the next token)."""
        return self.run(batch["input_ids"])

    def targets(self, batch: Batch) -> torch.Tensor:
        """(G, T) the next token at each position; -100 at the last."""
        return batch["labels"]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, P, H) -> (rows, P, V): the final norm, then the LM head."""
        return self.head(self.norm(hidden))

    def replicate(self, device: torch.device | str, dtype: torch.dtype) -> DecoderExit:
        """An unshared copy (weights filled by the caller), for the scorer under ZeRO-3: see BertExit."""
        replica = self.fresh()
        for m in replica.modules():
            m.to(device=device, dtype=dtype).requires_grad_(False)
        return replica


DECODER_FLOP_FORMULA = (
    "training = 3 x forward; forward/seq = T L (block + 4Th) + T (2hV); block per position: GPT-2 8h^2 + 4hi, "
    "Llama 4h^2 + 4h h_kv + 6hi; 4Th: attention scores and weighted sum over the full T x T square; LM head 2hV "
    "at every position; scoring/seq at exit j = T j (block + 4Th) + T (2hV) (x P/T with sift.score_positions = P)"
)
"""The FLOP model of ``decoder_flop_counts`` in one line (for benchmark records)."""


def decoder_flop_counts(*, layers: int, block_per_position: float, hidden: int, vocab: int,
                        seq_len: int) -> FlopCounts:
    """A decoder's FLOPs per sequence of T = ``seq_len`` positions (multiply-add = 2; backward = 2 x
    forward): ``block_per_position`` from the family (its projections and MLP) plus attention's scores
    and weighted sum, 4 T h per position, counted over the full T x T square as PaLM's MFU convention
    does (a causal kernel skips about half of it); the LM head, 2 h V at every position, in training and
    in scoring (``sift.score_positions`` P scores only P of them: head x P / T). Left out: embedding
    lookups, norms, activations, softmax, the loss."""
    T = seq_len
    return FlopCounts(layers=layers, block=T * (block_per_position + 4 * T * hidden), head=T * 2 * hidden * vocab)


class SiftDecoder(SiftModel):
    """A stock Hugging Face causal LM (``hf``) whose forward takes a ``clm`` batch (data_pipeline/batch.py)
    and follows the loss contract; export is a plain ``save_pretrained``. Subclasses say where the stock
    model keeps its parts (``blocks``, ``exit_path``) and count their FLOPs (``block_flops``)."""

    token_loss_name = "lm"

    def __init__(self, hf: PreTrainedModel, loss_chunk: int = 0):
        super().__init__()
        self.hf, self.loss_chunk = hf, loss_chunk

    @property
    def config(self) -> PretrainedConfig:
        return self.hf.config

    def exit_path(self, exit_layer: int) -> DecoderExit:
        raise NotImplementedError

    def block_flops(self) -> float:
        """FLOPs of one block's projections and MLP per position (attention's T x T part is added)."""
        raise NotImplementedError

    def metrics(self) -> dict[str, Metric]:
        return {"lm_loss": Ratio("loss_sum", "loss_tokens"), "lm_acc": Ratio("correct", "loss_tokens"),
                "lm_ppl": Exp("lm_loss")}

    def flops(self, seq_len: int) -> FlopCounts:
        c = self.config
        return decoder_flop_counts(layers=c.num_hidden_layers, block_per_position=self.block_flops(),
                                   hidden=c.hidden_size, vocab=c.vocab_size, seq_len=seq_len)

    def export_config(self) -> dict[str, Any]:
        return {"family": self.family, "class": type(self.hf).__name__, "config": self.config.to_dict()}

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                sample_ids: torch.Tensor | None = None, row_weights: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Token-mean next-token cross-entropy over this device's rows, weighted by ``row_weights`` when
        given (the loss contract of engine/models/base.py) plus ``correct`` (next tokens predicted right).
        ``attention_mask`` is all ones for packed rows and is not read (no host sync)."""
        path = self.exit_path(self.num_layers)
        hidden = path.run(input_ids)
        if self.loss_chunk:  # model.loss_chunk: the (G, T, V) logits never exist at once
            ce, hits = chunked_head_loss(path.logits, hidden, labels, self.loss_chunk)
        else:
            logits = path.logits(hidden)  # (G, T, V)
            ce = token_cross_entropy(logits, labels)  # (G, T) fp32, 0 where labels are -100
            hits = logits.detach().argmax(-1) == labels
        valid = labels >= 0
        loss_sum, count, correct = token_sums(ce, valid, hits, row_weights)
        return {
            "loss": loss_sum / count.clamp(min=1),
            "loss_sum": loss_sum,
            "loss_tokens": count,
            "per_seq_loss": per_sequence_mean(ce.detach(), valid),
            "correct": correct,
        }


def special_token_ids(data: DataFacts) -> dict[str, int | None]:
    """The ids the Hugging Face config records for generation (``pipeline("text-generation")``)."""
    eos = data.eos_id if data.eos_id is not None else data.pad_id
    return {"eos_token_id": eos, "bos_token_id": data.bos_id if data.bos_id is not None else eos,
            "pad_token_id": data.pad_id}


def check_heads(hidden: int, heads: int, kv_heads: int | None = None) -> None:
    """ModelError unless the hidden size splits into ``heads`` heads (and those into ``kv_heads`` groups)."""
    if heads < 1 or hidden % heads:
        raise ModelError(f"model.hidden_size {hidden} is not a multiple of model.num_heads {heads}")
    if kv_heads is not None and (kv_heads < 1 or heads % kv_heads):
        raise ModelError(f"model.num_heads {heads} is not a multiple of model.num_kv_heads {kv_heads}")


def check_objective(family: str, data: DataFacts) -> None:
    if data.objective != "clm":
        raise ModelError(f"model.family {family} trains on data prepared with --objective clm, not "
                         f"{data.objective!r}")


def load_pretrained(cls: type[PreTrainedModel], cfg: ModelConfig, data: DataFacts, max_positions: str,
                    **overrides: Any) -> PreTrainedModel:
    """``cls`` from the local checkpoint ``cfg.init_from``, checked against the data (vocabulary,
    positions); ModelError naming the mismatch."""
    path = Path(cfg.init_from)
    if not (path / "config.json").is_file():
        raise ModelError(f"model.init_from: {path} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        hf = cls.from_pretrained(path, local_files_only=True, attn_implementation=cfg.attn_implementation,
                                 **overrides)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.init_from: cannot load {path}: {e}") from None
    if hf.config.vocab_size < data.vocab_size:
        raise ModelError(
            f"model.init_from: {path} has a vocabulary of {hf.config.vocab_size} tokens but the data's "
            f"tokenizer has {data.vocab_size}; prepare the data with that checkpoint's tokenizer"
        )
    positions = getattr(hf.config, max_positions)
    if positions < data.seq_len:
        raise ModelError(f"model.init_from: {path} supports sequences of {positions} tokens, the data has "
                         f"{data.seq_len}")
    return hf


def rebuild(cls: type[PreTrainedModel], config_cls: type[PretrainedConfig], state: dict[str, torch.Tensor],
            spec: dict[str, Any]) -> PreTrainedModel:
    """The stock model of ``spec`` (``export_config()``) holding ``state`` (the adapter's parameter names);
    a tied LM head may be missing from ``state`` (ZeRO stores a shared tensor once)."""
    state = {k.removeprefix("hf."): v for k, v in state.items()}
    if spec["class"] != cls.__name__:
        raise ModelError(f"the checkpoint records class {spec['class']!r}, expected {cls.__name__}")
    model = cls(config_cls.from_dict(spec["config"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ModelError(f"the checkpoint does not match {spec['class']}: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    return model
