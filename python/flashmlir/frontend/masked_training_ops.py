"""What a masked attention site trains through on the torch path: fused kernels, ours or SDPA's.

    attention_forward_masked(q, k, v, attn_mask, scale)                      -> (out, lse)
    attention_backward_masked(grad_out, q, k, v, attn_mask, out, lse, scale) -> (dq, dk, dv)
    sdpa_training_attention(q, k, v, attn_mask, scale)                       -> out   (CUDA)

Our microkernels take no explicit mask, and `flashmlir::attention`'s autograd formula is the
textbook one (every score in float32, S × S): a masked training step ran 1.9x slower than eager on
the CPU (benchmarks/results/cpu-2026-12-02-masked-inference.md), 9-11x slower than SDPA on an H200
(h200-2026-12-02-masked-sdpa.md). Where torch's SDPA computes the site as the op means it
(`attention_op.sdpa_means_the_same`, with the mask as `attention_op.sdpa_mask` puts it) and its
backward gets every row right, the site trains through fused kernels instead (on the CPU ours
where they take the mask).

With finfo.min of bf16 or float32 as the masked value (Hugging Face's), a row whose every key is
masked is plain arithmetic in the op (equal weights, and gradients through them, as in eager),
which every fused backward gets wrong (its logsumexp absorbs the row's scores: gradients off by
2-3x relative on such rows; a float64 check found it). float16's finfo.min (-65504) absorbs
nothing, and SDPA's gradients matched float64 on such rows (the table above). So:

- CPU, bool and float32 masks: the pair above (the forward saves q, k, v, mask, out, lse), whose
  CPU implementation (runtime/cpu_kernels.py) decides per call from the mask alone, so that a
  backward takes its forward's route: a key-padding or a decoder's causal-and-padding mask runs
  our kernels' key-bias entries both ways (lse is then the kernels'); any other mask ATen's CPU
  flash attention, which takes an additive mask and hands its backward the forward's logsumexp
  (ATen's: 0 for a row with no key); a float mask with a row at finfo.min everywhere the op's
  reference and its textbook gradients. GQA expands K and V for ATen's and sums dK, dV over each
  group. (Only the torch path runs these ops: IREE's torch frontend does not lower ATen's CPU
  flash ops.)
- CUDA bool masks, float16 masks: `sdpa_training_attention`, plain torch code that aot_autograd
  traces into SDPA's fused forward and backward (cuDNN's on an H200), as it does for a model that
  calls SDPA itself.
- Other float masks (bf16 and float32 on CUDA, bf16 on the CPU): `checked_training_attention`,
  a torch.cond on each call's mask: SDPA both ways without a row at finfo.min everywhere, the op
  and its exact textbook backward with one (left padding, an empty sequence). On a GPU the
  predicate costs a host sync a call.

A float mask that needs a gradient (a learned bias) keeps the op's formula, which has one.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from flashmlir.frontend.attention_op import (
    NEVER,
    _expand_kv,
    additive_mask,
    attention_overload,
    sdpa_mask,
    sdpa_means_the_same,
)

FORWARD_OP_NAME = "flashmlir::attention_forward_masked"
BACKWARD_OP_NAME = "flashmlir::attention_backward_masked"


@torch.library.custom_op(FORWARD_OP_NAME, mutates_args=())
def attention_forward_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return aten_forward(q, k, v, attn_mask, scale)


def aten_forward(q, k, v, attn_mask, scale=None):
    """The pair's forward through ATen's CPU flash attention (where the CPU kernels do not take the
    mask: runtime/cpu_kernels.py registers the op's CPU implementation, which tries them first)."""
    groups = q.shape[-3] // k.shape[-3]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, _expand_kv(k, groups), _expand_kv(v, groups), 0.0, False, attn_mask=additive_mask(attn_mask, q.dtype),
        scale=scale)
    return out.contiguous(), lse.float().contiguous()


@attention_forward_masked.register_fake
def _forward_fake(q, k, v, attn_mask, scale=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def attention_backward_masked(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              attn_mask: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return aten_backward(grad_out, q, k, v, attn_mask, out, lse, scale)


def aten_backward(grad_out, q, k, v, attn_mask, out, lse, scale=None):
    """The pair's backward through ATen's (given `aten_forward`'s out and lse)."""
    groups = q.shape[-3] // k.shape[-3]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.contiguous(), q, _expand_kv(k, groups), _expand_kv(v, groups), out, lse, 0.0, False,
        attn_mask=additive_mask(attn_mask, q.dtype), scale=scale)
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


def site_operands(node: fx.Node) -> tuple[dict, tuple[torch.Tensor, ...] | None]:
    """An attention node's arguments by name and its (q, k, v, mask) fake tensors, or None where
    any is unknown."""
    from flashmlir.frontend.training_ops import bound_args

    args = bound_args(node)
    values = tuple(a.meta.get("val") if isinstance(a, fx.Node) else None
                   for a in (args["q"], args["k"], args["v"], args["attn_mask"]))
    return args, values if all(isinstance(t, torch.Tensor) for t in values) else None


def masked_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, dict, tuple[torch.Tensor, ...] | None]]:
    """Each `flashmlir::attention` node with an explicit mask, with its `site_operands`."""
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == attention_overload():
            args, values = site_operands(node)
            if args["attn_mask"] is not None:
                sites.append((node, args, values))
    return sites


def sdpa_takes(args: dict, values: tuple[torch.Tensor, ...] | None) -> bool:
    """Whether torch's SDPA computes a masked site as the op means it (`sdpa_means_the_same`)."""
    return values is not None and sdpa_means_the_same(*values, float(args["dropout_p"]), bool(args["is_causal"]))


def sdpa_training_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                            scale: float | None = None) -> torch.Tensor:
    """A masked site of a training graph as torch's SDPA: aot_autograd traces this into SDPA's
    fused forward and backward, as for a model that calls SDPA itself."""
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_mask(attn_mask, q), scale=scale, enable_gqa=q.shape[-3] != k.shape[-3])


def sdpa_misses_rows(attn_mask: torch.Tensor) -> torch.Tensor:
    """Whether some query row of a float mask has every key at or below NEVER and one of them
    finite (a bool scalar tensor): the op gives such a row weights by plain arithmetic (equal ones
    where finfo.min absorbs the scores), which SDPA's fused backward gets wrong (its logsumexp
    absorbs them too). Rows masked entirely by -inf are zeros in both."""
    return ((attn_mask <= NEVER).all(-1) & ~torch.isneginf(attn_mask).all(-1)).any()


@torch.library.custom_op("flashmlir::contiguous_gradient", mutates_args=())
def contiguous_gradient(x: torch.Tensor) -> torch.Tensor:
    """x (a copy), whose gradient leaves in row-major order: torch.cond needs its branches'
    gradients laid out alike, and SDPA's fused backwards return dQ, dK, dV in their own order."""
    return x.clone(memory_format=torch.contiguous_format)


@contiguous_gradient.register_fake
def _contiguous_gradient_fake(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


contiguous_gradient.register_autograd(lambda ctx, grad: grad.contiguous())


def checked_training_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """A site with a bf16 or float32 float mask in a training graph: SDPA's fused kernels both ways
    unless this call's mask has rows they get wrong (`sdpa_misses_rows`), then the op with its
    exact textbook backward. torch.cond decides per call (the predicate costs the host one sync);
    aot_autograd traces both branches' backward."""
    def textbook(q, k, v, attn_mask):
        return attention_overload()(q, k, v, attn_mask, 0.0, False, scale).contiguous()

    def fused(q, k, v, attn_mask):
        q, k, v = (contiguous_gradient(x) for x in (q, k, v))
        return sdpa_training_attention(q, k, v, attn_mask, scale).contiguous()

    return torch.cond(sdpa_misses_rows(attn_mask), textbook, fused, (q, k, v, attn_mask))


def gradient_inputs(gm: fx.GraphModule, example_inputs) -> set[fx.Node]:
    """The graph's placeholders whose example input requires a gradient (the fake values of a
    pre-dispatch trace do not say so)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n for n, x in zip(placeholders, example_inputs, strict=False)
            if isinstance(x, torch.Tensor) and x.requires_grad}


def _depends_on(node: fx.Node, sources: set[fx.Node]) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in sources:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def rewrite_masked_for_training(gm: fx.GraphModule, needs_gradient: set[fx.Node] = frozenset()) -> int:
    """Replace each `flashmlir::attention` site whose mask SDPA takes as the op means it (no dropout,
    not causal together with the mask) and that needs no mask gradient (the mask depends on none of
    `needs_gradient`, the placeholders that require gradients): with a bool or float32 mask on the
    CPU by `attention_forward_masked(...)[0]`; with a bool mask on CUDA or a float16 one by
    `sdpa_training_attention(...)`; with any other float mask by `checked_training_attention(...)`.
    Returns how many."""
    from flashmlir.frontend.training_ops import replace_with_pair

    rewritten = 0
    for node, args, values in masked_sites(gm):
        if not sdpa_takes(args, values):
            continue
        device, mask = values[0].device.type, values[3]
        operands, options = (args["q"], args["k"], args["v"], args["attn_mask"]), {"scale": args["scale"]}
        if mask.dtype != torch.bool and _depends_on(args["attn_mask"], needs_gradient):
            continue  # a learned bias: the op's formula gives it its gradient
        if device == "cpu" and (mask.dtype == torch.bool or values[0].dtype == torch.float32):
            replace_with_pair(gm, node, forward_masked_overload(), operands, options)
            rewritten += 1
            continue
        if device not in ("cpu", "cuda"):
            continue
        fused = mask.dtype in (torch.bool, torch.float16)
        with gm.graph.inserting_before(node):
            out = gm.graph.call_function(sdpa_training_attention if fused else checked_training_attention,
                                         operands, options)
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
