"""Per-rank against global selection: how many of the rows a global top-k would keep does SIFT keep?

    python -m benchmarks.probes.selection_scope --out benchmarks/results     # a few seconds on one CPU core

SIFT selects per rank (each of W ranks keeps its own top B of G), as the paper does; a global selection
would keep the top W x B of all W x G rows, which needs the scores of every rank and then rows moved
between ranks so that each still trains B. This simulates both on iid scores (the sampler shuffles the
whole dataset before splitting it over ranks, so a rank's rows are a uniform draw) and reports the
overlap (the share of the global selection that per-rank selection also keeps) and where the rows they
disagree on sit (their global quantiles: near 1 - B / G means "at the threshold"). Overlap depends only
on ranks, so any continuous score distribution gives the same figures. A ``--shift`` row repeats it
with rank r's scores offset by r x shift standard deviations: data that is not shuffled across ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sift_common.provenance import provenance


def per_rank_and_global(scores: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, G) scores -> boolean (W, G) masks: each row's own top B, and the top W x B of all."""
    W, G = scores.shape
    local = torch.zeros(W, G, dtype=torch.bool)
    local.scatter_(1, scores.topk(B, dim=1).indices, True)
    glob = torch.zeros(W * G, dtype=torch.bool)
    glob[scores.flatten().topk(W * B).indices] = True
    return local, glob.view(W, G)


def simulate(W: int, G: int, B: int, *, trials: int, shift: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Mean overlap |local & global| / (W x B) over ``trials`` draws, and the 5% and 95% points of the
    global quantiles (0: lowest score, 1: highest) of the rows the two selections disagree on."""
    gen = torch.Generator().manual_seed(seed)
    offsets = shift * torch.arange(W, dtype=torch.float64).unsqueeze(1)
    overlap, quantiles = 0.0, []
    for _ in range(trials):
        scores = torch.randn(W, G, generator=gen, dtype=torch.float64) + offsets
        local, glob = per_rank_and_global(scores, B)
        overlap += (local & glob).sum().item() / (W * B)
        quantile = scores.flatten().argsort().argsort().view(W, G).double() / (W * G - 1)
        quantiles.append(quantile[local ^ glob])
    q = torch.cat(quantiles)
    return {"W": W, "G": G, "B": B, "shift": shift, "trials": trials, "overlap": overlap / trials,
            "disagreed_quantile_p05": q.quantile(0.05).item() if q.numel() else float("nan"),
            "disagreed_quantile_p95": q.quantile(0.95).item() if q.numel() else float("nan")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for selection_scope.json and .md")
    p.add_argument("--G", type=int, default=64, help="gross rows per rank (the paper: 64)")
    p.add_argument("--B", type=int, default=32, help="kept rows per rank (the paper: 32)")
    p.add_argument("--worlds", default="2,8,64,512", help="numbers of ranks, comma-separated")
    p.add_argument("--shifts", default="0.05,0.2", help="per-rank offsets (in score s.d.) for the unshuffled case")
    p.add_argument("--trials", type=int, default=200)
    a = p.parse_args(argv)
    if not 0 < a.B <= a.G:
        p.error(f"need 0 < B <= G, got B={a.B}, G={a.G}")
    worlds = [int(w) for w in a.worlds.split(",")]
    rows = [simulate(W, a.G, a.B, trials=a.trials) for W in worlds]
    rows += [simulate(8, a.G, a.B, trials=a.trials, shift=float(s)) for s in a.shifts.split(",")]
    command = "python -m benchmarks.probes.selection_scope " + " ".join(argv if argv is not None else sys.argv[1:])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "selection_scope.json").write_text(json.dumps({"provenance": provenance(command), "rows": rows},
                                                           indent=1) + "\n")
    lines = ["| ranks W | per-rank shift (s.d.) | overlap with global top-k | rows they disagree on: "
             "global quantiles, 5-95% |", "|---|---|---|---|"]
    lines += [f"| {r['W']} | {r['shift']:g} | {r['overlap']:.3f} | {r['disagreed_quantile_p05']:.2f}-"
              f"{r['disagreed_quantile_p95']:.2f} |" for r in rows]
    (a.out / "selection_scope.md").write_text(
        f"# Per-rank against global top-k selection (G = {a.G}, B = {a.B}, {a.trials} draws)\n\n"
        f"    {command}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
