"""The training pair a masked attention site gets on the CPU's torch path: torch's flash kernels.

    attention_forward_masked(q, k, v, attn_mask, scale)                      -> (out, lse)
    attention_backward_masked(grad_out, q, k, v, attn_mask, out, lse, scale) -> (dq, dk, dv)

Our CPU microkernels take no explicit mask, and `flashmlir::attention`'s autograd formula is the
textbook one (every score in float32, S × S): a masked training step ran 1.9x slower than eager
(benchmarks/results/cpu-2026-12-02-masked-inference.md). ATen's CPU flash attention takes an
additive mask and hands its backward the forward's logsumexp, so a site with a bool mask that it
computes as the op means (`attention_op.sdpa_means_the_same`) gets this pair: the forward saves
(q, k, v, mask, out, lse) and the backward calls ATen's. `lse` is ATen's (float32 [*, Hq, Sq]; 0 for
a row with no key, whose output and gradients are 0), not the kernels' pair's. The bool mask
becomes 0 / -inf of q's dtype, the form the ATen op takes; GQA expands K and V for it and sums dK,
dV over each group. Float masks keep the textbook backward: with finfo.min as the masked value
(Hugging Face's) a row whose every key is masked is plain arithmetic (uniform weights, and
gradients through them in eager), which ATen's backward gets wrong (its logsumexp absorbs the
scores: gradients off by 2-3x relative on such rows; a float64 check found it). Only the torch path runs these ops (IREE's torch frontend does not lower
ATen's CPU flash ops): `rewrite_masked_for_training` is called for CPU graphs Inductor compiles.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from flashmlir.frontend.attention_op import _expand_kv, attention_overload, sdpa_means_the_same

FORWARD_OP_NAME = "flashmlir::attention_forward_masked"
BACKWARD_OP_NAME = "flashmlir::attention_backward_masked"


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask


@torch.library.custom_op(FORWARD_OP_NAME, mutates_args=())
def attention_forward_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    groups = q.shape[-3] // k.shape[-3]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, _expand_kv(k, groups), _expand_kv(v, groups), 0.0, False, attn_mask=_additive(attn_mask, q.dtype),
        scale=scale)
    return out.contiguous(), lse.float().contiguous()


@attention_forward_masked.register_fake
def _forward_fake(q, k, v, attn_mask, scale=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def attention_backward_masked(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              attn_mask: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = q.shape[-3] // k.shape[-3]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.contiguous(), q, _expand_kv(k, groups), _expand_kv(v, groups), out, lse, 0.0, False,
        attn_mask=_additive(attn_mask, q.dtype), scale=scale)
    if groups > 1:
        dk = dk.unflatten(-3, (k.shape[-3], groups)).sum(dim=-3)
        dv = dv.unflatten(-3, (v.shape[-3], groups)).sum(dim=-3)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward_masked.register_fake
def _backward_fake(grad_out, q, k, v, attn_mask, out, lse, scale=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, attn_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_masked(grad_out, q, k, v, attn_mask, out, lse, ctx.scale)
    return dq, dk, dv, None, None


attention_forward_masked.register_autograd(_backward, setup_context=_setup_context)


def forward_masked_overload():
    return torch.ops.flashmlir.attention_forward_masked.default


def masked_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, dict, tuple[torch.Tensor, ...] | None]]:
    """Each `flashmlir::attention` node with an explicit mask: the node, its arguments by name, and
    its (q, k, v, mask) fake tensors, or None where any is unknown."""
    from flashmlir.frontend.training_ops import bound_args

    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != attention_overload():
            continue
        args = bound_args(node)
        if args["attn_mask"] is None:
            continue
        values = tuple(a.meta.get("val") if isinstance(a, fx.Node) else None
                       for a in (args["q"], args["k"], args["v"], args["attn_mask"]))
        sites.append((node, args, values if all(isinstance(t, torch.Tensor) for t in values) else None))
    return sites


def sdpa_takes(args: dict, values: tuple[torch.Tensor, ...] | None) -> bool:
    """Whether torch's SDPA computes a masked site as the op means it (`sdpa_means_the_same`)."""
    return values is not None and sdpa_means_the_same(*values, float(args["dropout_p"]), bool(args["is_causal"]))


def rewrite_masked_for_training(gm: fx.GraphModule) -> int:
    """Replace each `flashmlir::attention` site with a bool mask that ATen's CPU flash attention
    computes as the op means (no dropout, not causal together with the mask, CPU tensors) by
    `attention_forward_masked(...)[0]`. Returns how many."""
    from flashmlir.frontend.training_ops import replace_with_pair

    rewritten = 0
    for node, args, values in masked_sites(gm):
        if not sdpa_takes(args, values) or values[3].dtype != torch.bool or values[0].device.type != "cpu":
            continue
        replace_with_pair(gm, node, forward_masked_overload(), (args["q"], args["k"], args["v"], args["attn_mask"]),
                          {"scale": args["scale"]})
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
