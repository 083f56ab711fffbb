"""SiftSelector (sift_hf) in a plain accelerate loop, on CPU."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from engine.scoring import exit_scores
from engine.selection import topk_indices
from sift_hf import SiftArguments, SiftSelector
from sift_hf.models import adapter_batch, adapter_for
from tests.hf_helpers import hf_model, rows, weights

B, GA = 4, 2


def _loop(model, batches, selector=None):
    """A short accelerate loop; returns the kept batches, the weights at each window's start, the losses."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    kept, starts, losses = [], [], []
    torch.manual_seed(1)  # dropout
    for i, batch in enumerate(batches):
        if i % GA == 0:
            starts.append(weights(model))
        with accelerator.accumulate(model):
            if selector is not None:
                batch = selector(batch)
            kept.append(batch)
            loss = model(**batch).loss
            losses.append(loss.detach())
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    return kept, starts, losses


def test_selector_keeps_the_top_rows_of_each_window_and_trains_like_a_plain_loop_on_them():
    data = rows("gpt2", n=32)
    gross = [data[i:i + 2 * B] for i in range(0, 32, 2 * B)]  # 4 micro-steps of G = 8
    model = hf_model("gpt2")
    selector = SiftSelector(Accelerator(cpu=True, gradient_accumulation_steps=GA), model, micro_batch_size=B,
                            settings=SiftArguments(keep=0.5))
    assert selector.gross_batch_size == 2 * B
    kept, starts, losses = _loop(model, gross, selector)
    for i, (g, k) in enumerate(zip(gross, kept)):
        live = hf_model("gpt2")
        live.load_state_dict(starts[i // GA])  # the weights at the window's start
        top = topk_indices(exit_scores(adapter_for(live).exit_path(1), adapter_batch(g, "gpt2"), "loss"), B)
        for key in g:
            assert torch.equal(k[key], g[key][top]), (i, key)
    logs = selector.logs()
    assert logs["sift_scored_rows"] == 4 * 2 * B and logs["sift_kept_rows"] == 4 * B and "kept_score" in logs
    # the same loop without a selector, fed the kept rows: bitwise the same losses and weights
    plain = hf_model("gpt2")
    _, _, plain_losses = _loop(plain, kept)
    assert torch.equal(torch.stack(losses), torch.stack(plain_losses))
    for (name, a), b in zip(weights(plain).items(), weights(model).values()):
        assert torch.equal(a, b), name


def test_selector_warmup_keeps_the_first_rows_and_its_counter_resumes():
    data = rows("gpt2", n=32)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA)
    selector = SiftSelector(accelerator, hf_model("gpt2"), micro_batch_size=B,
                            settings=SiftArguments(keep=0.5, warmup_steps=1, policy="random"))
    first = [selector(data[i:i + 2 * B]) for i in range(0, 2 * 2 * B * GA, 2 * B)]
    for i, k in enumerate(first[:GA]):  # window 0 is the warm-up: the first B rows of each draw
        assert torch.equal(k["input_ids"], data[2 * B * i:2 * B * i + B]["input_ids"])
    resumed = SiftSelector(accelerator, hf_model("gpt2"), micro_batch_size=B,
                           settings=SiftArguments(keep=0.5, warmup_steps=1, policy="random"))
    resumed.load_state_dict(selector.state_dict())
    nxt = data[0:2 * B]
    assert torch.equal(resumed(nxt)["input_ids"], selector(nxt)["input_ids"])  # the same keyed draw
