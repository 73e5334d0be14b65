"""The PyTorch yardstick for `sae-jax bench --compare-torch`: the equivalent SAE train step
(same loss, Adam, gradient clipping, sizes, float32) as PyTorch SAE trainers run it —
dense, as SAELens does, including TopK (`torch.topk`, then a scatter into a dense (B, F)
matrix). Torch is optional and never a dependency: without it this reports None.
"""

from __future__ import annotations

import os
import time


def torch_tokens_per_s(arch: str, d_in: int, width: int, k: int, batch_size: int,
                       steps: int, sparsity_coeff: float, seed: int = 0) -> float | None:
    """Train-step tokens/s of the PyTorch step, or None if torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    W_dec = torch.randn(width, d_in)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    params = [W_dec.T.clone().requires_grad_(), torch.zeros(width, requires_grad=True),
              W_dec.requires_grad_(), torch.zeros(d_in, requires_grad=True)]
    W_enc, b_enc, W_dec, b_dec = params
    opt = torch.optim.Adam(params, lr=1e-4)
    x = torch.randn(batch_size, d_in)

    def step():
        pre = (x - b_dec) @ W_enc + b_enc
        if arch in ("topk", "batchtopk"):
            values, idx = pre.topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))
        else:
            f = torch.relu(pre)
        loss = (x - (f @ W_dec + b_dec)).pow(2).sum(-1).mean()
        if arch == "relu":
            loss = loss + sparsity_coeff * (f * W_dec.norm(dim=1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)
