"""SIFT's settings (the ``sift`` section of the run config), owned by the method (engine/methods/sift.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class SiftConfig:
    policy: str = "topk"
    """topk: keep the highest-scoring B of G (SIFT); random: keep a random B of G (control).
    stratified: keep every row above a threshold, fill B with a uniform draw from the rest, weighted to
    stay unbiased (InfoBatch's rule); importance: draw B with probabilities proportional to the tempered
    scores, weighted 1 / probability (engine/selection.py). none: the same as ``method: none`` (vanilla),
    kept for configs written before ``method`` existed."""
    threshold_quantile: float | None = None
    """stratified: the threshold is this quantile of the gross batch's scores (None: their mean); above
    1 - keep, or the rows above it would fill B."""
    temperature: float = 1.0
    """importance: sizes proportional to exp(score / temperature) (higher: closer to uniform)."""
    uniform_mix: float = 0.1
    """importance: the share of uniform mixed into the sizes, which bounds every weight by G / (B x it)."""
    criterion: str = "loss"
    """loss: mean token cross-entropy at the exit (BERT: the masked tokens; decoders: the next tokens);
    entropy: mean predictive entropy there; reducible: the loss minus ``reference``'s loss on the same
    tokens (RHO-LOSS's reducible loss at exit_layer = L)."""
    exit_layer: int = 1
    """Score with the embeddings + the first j blocks + the model's own output head (j = L: exact loss)."""
    keep: float = 0.5
    """B / G: the fraction of the gross micro-batch that is back-propagated."""
    warmup_steps: int = 0
    """No selection (draw B, like vanilla) for the first N optimizer steps (the paper: 20K of 800K);
    counted in draws / gradient-accumulation steps, so a skipped non-finite micro-batch counts too."""
    stop_fraction: float | None = None
    """No selection after this fraction of train.steps (greedy selection can hurt asymptotically)."""
    schedule: str = "serial"
    """serial: score, then train (the reference). pipelined: score the next gross batch while this
    one trains (a side CUDA stream on GPU); its scores are one optimizer step stale. No effect without
    a selecting method, which scores nothing."""
    fidelity_every: int = 0
    """Every K steps, also compute exact full-model losses on the gross batch and log the Spearman
    correlation and top-B overlap with the early-exit scores (0 = never)."""
    score_positions: int = 0
    """Score each row on this many of its target positions, drawn at random per row and draw (0 = all):
    the output head and the criterion then run on G x this many positions. For decoder LMs every
    position is a target (T - 1 per row) and the LM head dominates an early exit's cost; the fidelity
    cost shows in the ``spearman`` and ``topk_overlap`` that ``fidelity_every`` logs."""
    reference: str | None = None
    """criterion reducible: the reference model, a SIFT-Train run directory or a local Hugging Face
    checkpoint with the data's tokenizer, trained on other data (`sift reference`); engine/reference.py."""
    reference_losses: str | None = None
    """Decoders: the reference's per-token losses on the training split, precomputed by `sift reference
    --sidecar` (no reference forward per step). None: the reference runs on each gross batch (BERT must)."""

    def gross_batch(self, micro_batch: int) -> int:
        """G = B / keep: the rows drawn per micro-step when SIFT selects (load_config checks it is whole)."""
        return round(micro_batch / self.keep)
