"""The ops a training graph gets where flash backward kernels serve an attention site.

    attention_forward(q, k, v, is_causal, scale)                      -> (out, lse)
    attention_backward(grad_out, q, k, v, out, lse, is_causal, scale) -> (dq, dk, dv)
    attention_forward_dropout(q, k, v, dropout_p, dropout_seed, is_causal, scale) -> (out, lse)
    attention_backward_dropout(grad_out, q, k, v, out, lse, dropout_p, dropout_seed, is_causal, scale)
                                                                      -> (dq, dk, dv)

`lse` = ln Σ_j exp(scale · q·k_j) per query row, float32 [*, Hq, Sq] (float64 for float64 inputs;
-inf for a row with no key):
the forward writes it so that the backward recomputes P = exp(scale · S − lse) tile by tile, with
no S×S matrix kept between them (FlashAttention's recomputation). Shapes and GQA as
`flashmlir::attention`; no mask (sites with one keep `flashmlir::attention` and its textbook
backward). The dropout pair drops P with `attention_op.dropout_keep(dropout_seed, ...)`, which the
backward regenerates from the seed; lse is the undropped softmax's. It is a pair of its own
because only some kernels (sm_90, sm_80, CPU) have dropout twins: the others keep the plain pair as it is.

Why separate ops: `flashmlir::attention`'s autograd formula only sees its inputs and output, and
the lse exists only inside the forward. Where the target's library has backward kernels for a
site (`rewrite_for_training`, run before aot_autograd on graphs that need gradients),
`attention(...)` becomes `attention_forward(...)[0]`, whose autograd formula saves (q, k, v, out,
lse) and calls `attention_backward`; our passes turn both into kernel calls. The eager
implementations below are the same math in float32, used when a graph falls back.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx

from flashmlir.frontend.attention_op import (
    _combined_bias,
    _expand_kv,
    attention_overload,
    default_scale,
    dropout_keep,
)

FORWARD_OP_NAME = "flashmlir::attention_forward"
BACKWARD_OP_NAME = "flashmlir::attention_backward"
FORWARD_DROPOUT_OP_NAME = "flashmlir::attention_forward_dropout"
BACKWARD_DROPOUT_OP_NAME = "flashmlir::attention_backward_dropout"


def _scores(q: torch.Tensor, k: torch.Tensor, is_causal: bool, scale: float | None) -> torch.Tensor:
    """scale · q·kᵀ in float32 (float64 for float64 inputs), causal (top-left) entries -inf, k expanded."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = default_scale(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * s
    bias = _combined_bias(q, k.shape[-2], None, is_causal, compute)
    return scores if bias is None else scores + bias


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(scores − lse); 0 for a row that attended to nothing (lse = -inf), as SDPA gives."""
    finite = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).to(scores.dtype)
    return torch.exp(scores - finite.unsqueeze(-1))


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op(FORWARD_OP_NAME, mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return reference_forward(q, k, v, is_causal, scale)


def _dropout_scaling(p: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor | None:
    """Z = kept / (1 − p) over the probabilities' shape, or None without dropout."""
    if not dropout_p:
        return None
    return dropout_keep(seed, p.shape, dropout_p).to(p.dtype) * (1.0 / (1.0 - dropout_p))


def reference_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                      scale: float | None, dropout_p: float = 0.0,
                      dropout_seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_forward's (or, with dropout, attention_forward_dropout's) meaning, written plainly;
    its implementation where no kernel serves it."""
    groups = q.shape[-3] // k.shape[-3]
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    scores = _scores(q, k, is_causal, scale)
    lse = torch.logsumexp(scores, dim=-1)
    p = _probabilities(scores, lse)
    z = _dropout_scaling(p, dropout_p, dropout_seed)
    out = torch.matmul(p if z is None else p * z, v.to(p.dtype)).to(q.dtype)
    return out, lse.to(_lse_dtype(q))


@attention_forward.register_fake
def _forward_fake(q, k, v, is_causal=False, scale=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, is_causal: bool = False,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference_backward(grad_out, q, k, v, out, lse, is_causal, scale)


def reference_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, is_causal: bool, scale: float | None,
                       dropout_p: float = 0.0,
                       dropout_seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV from the saved lse: P = exp(s·S − lse), Δ = rowsum(dO ∘ O), dS = P ∘ (dO·Vᵀ − Δ),
    dV = Pᵀ·dO, dQ = s·dS·K, dK = s·dSᵀ·Q; GQA sums dK, dV over each group of query heads. With
    dropout (Z = kept / (1 − p)): dV = (P ∘ Z)ᵀ·dO and dS = P ∘ ((dO·Vᵀ) ∘ Z − Δ), Δ from the dropped O."""
    groups = q.shape[-3] // k.shape[-3]
    ke, ve = _expand_kv(k, groups), _expand_kv(v, groups)
    scores = _scores(q, ke, is_causal, scale)
    compute = scores.dtype
    p = _probabilities(scores, lse)
    z = _dropout_scaling(p, dropout_p, dropout_seed)
    do = grad_out.to(compute)
    delta = (do * out.to(compute)).sum(dim=-1, keepdim=True)
    dv = torch.matmul((p if z is None else p * z).transpose(-2, -1), do)
    dp = torch.matmul(do, ve.to(compute).transpose(-2, -1))
    ds = p * ((dp if z is None else dp * z) - delta)
    s = default_scale(q.shape[-1]) if scale is None else scale
    dq = torch.matmul(ds, ke.to(compute)) * s
    dk = torch.matmul(ds.transpose(-2, -1), q.to(compute)) * s
    if groups > 1:
        dk = dk.unflatten(-3, (k.shape[-3], groups)).sum(dim=-3)
        dv = dv.unflatten(-3, (v.shape[-3], groups)).sum(dim=-3)
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous())


@attention_backward.register_fake
def _backward_fake(grad_out, q, k, v, out, lse, is_causal=False, scale=None):
    # Row-major whatever the inputs' strides (q is often a transposed view): the kernels write
    # dense gradients, and Inductor checks a custom op's outputs against these strides.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.is_causal, ctx.scale = is_causal, scale


def _backward(ctx, grad_out, _grad_lse):
    # lse is internal to the pair: nothing downstream differentiates it.
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.flashmlir.attention_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.is_causal,
                                                         ctx.scale)
    return dq, dk, dv, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op(FORWARD_DROPOUT_OP_NAME, mutates_args=())
def attention_forward_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                              dropout_seed: torch.Tensor, is_causal: bool = False,
                              scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return reference_forward(q, k, v, is_causal, scale, dropout_p, dropout_seed)


@attention_forward_dropout.register_fake
def _forward_dropout_fake(q, k, v, dropout_p, dropout_seed, is_causal=False, scale=None):
    return _forward_fake(q, k, v)


@torch.library.custom_op(BACKWARD_DROPOUT_OP_NAME, mutates_args=())
def attention_backward_dropout(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, dropout_p: float, dropout_seed: torch.Tensor,
                               is_causal: bool = False,
                               scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference_backward(grad_out, q, k, v, out, lse, is_causal, scale, dropout_p, dropout_seed)


@attention_backward_dropout.register_fake
def _backward_dropout_fake(grad_out, q, k, v, out, lse, dropout_p, dropout_seed, is_causal=False, scale=None):
    return _backward_fake(grad_out, q, k, v, out, lse)


def _setup_dropout_context(ctx, inputs, output):
    q, k, v, dropout_p, dropout_seed, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, dropout_seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale


def _backward_dropout(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.flashmlir.attention_backward_dropout(grad_out.contiguous(), q, k, v, out, lse,
                                                                 ctx.dropout_p, seed, ctx.is_causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


attention_forward_dropout.register_autograd(_backward_dropout, setup_context=_setup_dropout_context)


def forward_overload():
    return torch.ops.flashmlir.attention_forward.default


def backward_overload():
    return torch.ops.flashmlir.attention_backward.default


def forward_dropout_overload():
    return torch.ops.flashmlir.attention_forward_dropout.default


def needs_gradients(example_inputs) -> bool:
    """Whether aot_autograd will trace a backward for a graph called with these inputs."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


# What decides, per site: (q, k, v fake tensors, is_causal, with dropout) -> None if the target's
# kernels serve it, else the reason they do not.
SiteCheck = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, bool], str | None]


def rewrite_for_training(gm: fx.GraphModule, check: SiteCheck) -> tuple[int, list[str]]:
    """Replace each `flashmlir::attention` site that `check` accepts by `attention_forward(...)[0]`
    (with dropout, `attention_forward_dropout(...)[0]`, the site's seed passed on).

    Returns how many sites were rewritten and why the others were not. Sites with a mask are never
    rewritten (the training ops take none).
    """
    rewritten, reasons = 0, []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != attention_overload():
            continue
        site = kernel_site(node)
        if isinstance(site, str):
            reasons.append(f"{node.name}: {site}")
            continue
        (q, k, v), is_causal = site
        args = bound_args(node)
        dropout_p = dropout_of(node)
        why = check(q, k, v, is_causal, dropout_p > 0.0)
        if why is not None:
            reasons.append(f"{node.name}: {why}")
            continue
        options = {"is_causal": bool(args["is_causal"]), "scale": args["scale"]}
        if dropout_p > 0.0:
            replace_with_pair(gm, node, forward_dropout_overload(),
                              (args["q"], args["k"], args["v"], dropout_p, args["dropout_seed"]), options)
        else:
            replace_with_pair(gm, node, forward_overload(), (args["q"], args["k"], args["v"]), options)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten, reasons


def replace_with_pair(gm: fx.GraphModule, node: fx.Node, forward, args: tuple, kwargs: dict) -> None:
    """Replace an attention node by `forward(*args, **kwargs)[0]` (a training pair's forward, which
    also returns what its backward needs)."""
    with gm.graph.inserting_before(node):
        pair = gm.graph.call_function(forward, args, kwargs)
        out = gm.graph.call_function(operator.getitem, (pair, 0))
    out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def kernel_site(node: fx.Node) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], bool] | str:
    """An attention node's (q, k, v fake tensors, is_causal) where the flash kernels could take it
    (no mask, operand shapes known; dropout is the caller's to check), else why not."""
    args = bound_args(node)
    if args["attn_mask"] is not None:
        return "a mask (the backward kernels take none)"
    if args["dropout_p"] not in (0, 0.0) and not isinstance(args["dropout_seed"], fx.Node):
        return "dropout without a seed in the graph"
    q, k, v = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in (args["q"], args["k"], args["v"]))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "operand shapes unknown"
    return (q, k, v), bool(args["is_causal"])


def dropout_of(node: fx.Node) -> float:
    """An attention node's dropout probability."""
    return float(bound_args(node)["dropout_p"])


_PARAMETERS = ("q", "k", "v", "attn_mask", "dropout_p", "is_causal", "scale", "dropout_seed")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "dropout_seed": None}


def bound_args(node: fx.Node) -> dict:
    """An attention node's arguments by name, defaults filled in."""
    bound = dict(_DEFAULTS)
    bound.update(zip(_PARAMETERS, node.args, strict=False))
    bound.update(node.kwargs)
    return bound
