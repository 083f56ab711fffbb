"""Model FLOPs of BERT pretraining with the MLM head at the masked positions only, and MFU.

Counted (multiply-add = 2 FLOPs), per sequence of T positions (padding included: the kernels run on it),
hidden h, feed-forward width i, vocabulary V, P = ceil(0.15 T) masked slots (the fixed (G, P) shape
the head runs on), L layers:

    encoder layer, per position:  8 h^2 + 4 h i + 4 T h
        (Q, K, V and output projections 4 x 2h^2; FFN up and down 2 x 2hi; scores QK^T and the
         weighted sum AV 2 x 2Th)
    MLM head, per masked slot:    2 h^2 + 2 h V          (transform dense + tied decoder)
    NSP (sentence pairs), per sequence: 2 h^2 + 4 h     (pooler + classifier)

    forward(seq)        = T L (8h^2 + 4hi + 4Th) + P (2h^2 + 2hV) [+ 2h^2 + 4h]
    training(seq)       = 3 x forward(seq)               (backward ~ 2 x forward)
    scoring(seq, exit j) = T j (8h^2 + 4hi + 4Th) + P (2h^2 + 2hV)   (no grad, no NSP)

Left out (< 1% for BERT-base): embedding lookups, layer norms, softmax, GELU, biases, dropout, the loss.
BERT-base at T = 512: training 3 x 100.3 = 301 GFLOP per sequence; exit-1 scoring 11.8 GFLOP per
scored sequence, so scoring G = 64 for B = 32 adds 7.8% (the issue's figure).
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendor data sheets, TFLOP/s. Matched in order
# against torch.cuda.get_device_name(), so "H100 PCIe" must precede "H100".
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


@dataclass(frozen=True, slots=True)
class BertDims:
    layers: int
    hidden: int
    ffn: int
    vocab: int
    seq_len: int
    masked: int
    """P: masked-position slots per sequence."""
    nsp: bool = True


def layer_flops_per_position(d: BertDims) -> float:
    h = d.hidden
    return 8 * h * h + 4 * h * d.ffn + 4 * d.seq_len * h


def head_flops_per_slot(d: BertDims) -> float:
    return 2 * d.hidden * d.hidden + 2 * d.hidden * d.vocab


def forward_flops_per_seq(d: BertDims) -> float:
    nsp = 2 * d.hidden * d.hidden + 4 * d.hidden if d.nsp else 0
    return d.seq_len * d.layers * layer_flops_per_position(d) + d.masked * head_flops_per_slot(d) + nsp


def train_flops_per_seq(d: BertDims) -> float:
    return 3.0 * forward_flops_per_seq(d)


def scoring_flops_per_seq(d: BertDims, exit_layer: int) -> float:
    return d.seq_len * exit_layer * layer_flops_per_position(d) + d.masked * head_flops_per_slot(d)


def peak_flops(device_name: str, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s for MFU: the override, else the bf16/fp16 dense peak of a known GPU, else None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if precision not in ("bf16", "fp16"):
        return None
    for key, tflops in PEAK_TFLOPS_BF16:
        if key in device_name:
            return tflops * 1e12
    return None
