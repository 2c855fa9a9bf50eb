"""The output layer and the masked cross-entropy fused, for training on a CPU.

``linear_masked_nll(x, weight, bias, targets, mask_id)`` equals
``masked_nll(F.linear(x, weight, bias), targets, mask_id)`` (bd3.diffusion.loss): -log p of
each row's target with the mask token's logit set to -1e6, in float32. It runs in chunks of
rows, so the float32 (N, V) logits never exist at once: each chunk's logits are made,
normalised and turned into the gradient factor ``softmax - onehot`` while they are in cache,
and only that factor is kept for the backward pass, in the matmul dtype (bf16 under
autocast: the precision the unfused path's bf16 matmul backward sees anyway). The backward
then needs no (N, V) element-wise work: the per-row upstream gradient scales the (N, D)
rows instead of the (N, V) factor.
"""

from __future__ import annotations

import torch

from bd3.diffusion.loss import NEG_INF

# Rows per chunk: 64 rows of a 50k vocabulary are 13 MB of float32 logits.
CHUNK_ROWS = 64
# Below this probability -log p is computed as logsumexp - logit instead (float32 keeps ~1e-7
# relative precision in p down to ~1e-38; this leaves a wide margin).
TINY = 1e-30


class _LinearMaskedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, mask_id: int, rows: int):
        N, V = x.shape[0], weight.shape[0]
        need_grad = any(ctx.needs_input_grad[:3])
        nll = torch.empty(N, dtype=torch.float32, device=x.device)
        factor = torch.empty(N, V, dtype=x.dtype, device=x.device) if need_grad else None
        wt = weight.t()
        for s in range(0, N, rows):
            e = min(N, s + rows)
            z = torch.addmm(bias, x[s:e], wt) if bias is not None else x[s:e] @ wt
            z = z.float()
            z[:, mask_id] = NEG_INF
            p = torch.softmax(z, dim=-1)
            t = targets[s:e, None]
            p_t = p.gather(1, t).squeeze(1)
            nll[s:e] = p_t.log().neg_()
            tiny = p_t < TINY
            if tiny.any():  # -log p loses precision (or overflows) far in the tail: lse - z there
                far = tiny.nonzero().squeeze(1)
                zf = z[far]
                nll[s + far] = torch.logsumexp(zf, dim=-1) - zf.gather(1, t[far]).squeeze(1)
            if need_grad:
                p.scatter_add_(1, t, torch.full_like(t, -1, dtype=p.dtype))
                factor[s:e] = p
        ctx.save_for_backward(x, weight, factor)
        ctx.has_bias = bias is not None
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        x, weight, factor = ctx.saved_tensors
        g = grad_nll.to(torch.float32)[:, None]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = ((factor @ weight).float() * g).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = factor.t() @ (x.float() * g).to(x.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = (g.t().to(factor.dtype) @ factor).squeeze(0)
        return dx, dw, db, None, None, None


def linear_masked_nll(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask_id: int,
    *,
    rows: int = CHUNK_ROWS,
) -> torch.Tensor:
    """-log p(targets) (N,) float32 of the logits ``x @ weight.T + bias`` with the mask token
    excluded. ``x`` (N, D); under autocast the matmuls run in the autocast dtype, as
    ``F.linear`` would."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(x.dtype, weight.dtype)
    with torch.autocast(device_type=device, enabled=False):
        return _LinearMaskedNLL.apply(
            x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), targets, mask_id, rows
        )
