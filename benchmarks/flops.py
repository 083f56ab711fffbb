"""Peak FLOP/s for MFU; the FLOP counts themselves come from each model adapter (``model.flops(T)``,
engine/models/base.py FlopCounts; BERT's formula is in engine/models/bert.py ``flop_counts``):

    forward(seq)        = T L (8h^2 + 4hi + 4Th) + P (2h^2 + 2hV) [+ NSP 2h^2 + 4h]
    training(seq)       = 3 x forward(seq)               (backward ~ 2 x forward)
    scoring(seq, exit j) = T j (8h^2 + 4hi + 4Th) + P (2h^2 + 2hV)   (no grad, no NSP)

BERT-base at T = 512: training 3 x 100.3 = 301 GFLOP per sequence; exit-1 scoring 11.8 GFLOP per
scored sequence, so scoring G = 64 for B = 32 adds 7.8% (the issue's figure).
"""

from __future__ import annotations

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets. The H100/H200 sheets
# print only the "with sparsity" figures, twice the dense ones (H100 SXM and H200 SXM 1,979, H100 NVL 1,671,
# H100 PCIe 1,513); the A100 and L40S sheets also give the dense ones (312; 362.05). Matched in order as
# substrings of torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" is the SXM part), so the H100
# variants precede "H100". Other parts (an "H200 NVL" would match "H200") need --peak-tflops.
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


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
