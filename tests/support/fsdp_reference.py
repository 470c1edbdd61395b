"""The single-process reference of the FSDP and launcher tests, and how far a data-parallel run may be from it.

The model, adapter and batches are those of examples/fsdp/tiny.py (the README's ready-to-run example)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from support import tolerances

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "fsdp"))
import tiny  # noqa: E402

WIDEST = tiny.LLAMA["intermediate_size"]  # the longest reduction of a forward
DEPTH = tolerances.network_depth(tiny.LLAMA["num_hidden_layers"])
TOKENS = tiny.BATCH * (tiny.SEQ - 1)  # the loss is a mean over the predicted tokens of the full batch
EPS = torch.finfo(torch.float32).eps
ADAM_EPS = 1e-8  # torch's AdamW default, also Trainer's


def eval_ids() -> torch.Tensor:
    return torch.randint(0, tiny.LLAMA["vocab_size"], (2, tiny.SEQ), generator=torch.Generator().manual_seed(99))


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tiny.LR)


def reference() -> dict[str, Any]:
    """One process, full batches: losses, gradients and AdamW's second moments per step, the final adapter and
    the logits of :func:`eval_ids`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        return _train_reference()
    finally:
        torch.set_num_threads(threads)


def _train_reference() -> dict[str, Any]:
    model = tiny.peft_model()
    model.train()
    opt = optimizer(model)
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    beta2 = opt.param_groups[0]["betas"][1]
    losses, grads, roots = [], [], []
    for step in range(tiny.STEPS):
        ids = tiny.batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({names[p]: p.grad.detach().clone() for p in names})
        opt.step()
        # sqrt of the bias-corrected second moment AdamW divides by
        roots.append({names[p]: (opt.state[p]["exp_avg_sq"] / (1 - beta2 ** (step + 1))).sqrt() for p in names})
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=eval_ids()).logits
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": losses, "grads": grads, "roots": roots, "params": params, "logits": logits}


def param_bounds(ref: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Per element and step, how far a data-parallel run's parameters may be from the reference (first order).

    A gradient differs by reordered float32 sums: the batch mean over its tokens split over the ranks, and every
    reduction of the forward and backward computed on part of the rows (other blocking). AdamW moves a parameter by
    ``lr * m / (sqrt(v) + eps)`` with ``|m| <= sqrt(v)``: a gradient error ``d`` in any step moves ``m`` and
    ``sqrt(v)`` by at most ``d``, so the update by at most ``2 d / (sqrt(v) + eps)``, and never by more than ``2``
    (both updates lie in ``[-1, 1]``)."""
    backward = tolerances.reordered(torch.float32, WIDEST, 2 * DEPTH)["rtol"]
    total: dict[str, torch.Tensor] = {}
    out = []
    for grads, roots in zip(ref["grads"], ref["roots"]):
        for name, grad in grads.items():
            d = (TOKENS * EPS + backward) * grad.abs().max()
            move = tiny.LR * torch.clamp(2 * d / (roots[name] + ADAM_EPS), max=2.0)
            total[name] = total.get(name, torch.zeros_like(move)) + move
        out.append({k: v.clone() for k, v in total.items()})
    return out


def assert_losses_match(losses: list[float], ref: dict[str, Any], bounds: list[dict[str, torch.Tensor]]) -> None:
    """Each step's loss: the forward reordered, plus (first order) the parameters' distance after the steps before."""
    forward = tolerances.reordered(torch.float32, WIDEST, DEPTH)["rtol"] + TOKENS * EPS
    assert len(losses) == len(ref["losses"]) == tiny.STEPS
    for step, (loss, want) in enumerate(zip(losses, ref["losses"])):
        moved = 0.0
        if step:
            grads = ref["grads"][step]
            moved = sum((grads[n].abs() * bounds[step - 1][n]).sum().item() for n in grads)
        assert abs(loss - want) <= forward * abs(want) + moved, (step, loss, want)


def assert_adapter_matches(state: dict[str, torch.Tensor], ref: dict[str, Any], bound: dict[str, torch.Tensor]) -> None:
    """Logits and bank (model state-dict keys) within ``bound`` (plus one rounding) of the reference's."""
    for name, want in ref["params"].items():
        assert name in state, name
        diff = (state[name] - want).abs()
        atol = bound[name] + EPS * want.abs()
        assert bool((diff <= atol).all()), (name, diff.max().item())
