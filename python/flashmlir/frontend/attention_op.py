"""The `flashmlir::attention` operator: what the frontend leaves in the graph for each attention site.

    attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, dropout_seed=None)
        = dropout(softmax(q·kᵀ·scale + mask)) · v    (per head; k, v shared by groups of q heads)

Shapes: q [*, Hq, Sq, D], k [*, Hkv, Sk, D], v [*, Hkv, Sk, Dv] with the same leading dims `*`
(rank ≥ 3) and Hq a multiple of Hkv: q head h reads k/v head h // (Hq // Hkv), which is what
`repeat_kv` / `repeat_interleave` compute, so GQA needs no copies. `attn_mask` broadcasts to
[*, Hq, Sq, Sk]: bool (True = attend) or additive float. `is_causal` is top-left aligned (query i
attends keys j ≤ i), as in `F.scaled_dot_product_attention`, and may be combined with a mask.
`scale` defaults to 1/sqrt(D). A query whose every key is masked out (-inf) gets zeros, as in
SDPA; a finite mask value (finfo.min) is plain arithmetic, as in eager attention.

Dropout keeps probability (b, h, i, j) iff a counter-based hash of (dropout_seed, its index) is at
least p, and scales kept ones by 1/(1-p): the backward regenerates exactly the forward's mask from
the seed instead of storing it, and compiled graphs compute the same bits. The frontend draws a
fresh seed per call with `randint` in the graph.

Why a custom op rather than SDPA: it stays opaque through aot_autograd (SDPA is rewritten into
device-specific variants or decomposed into math), and it says at once what SDPA cannot (causal
together with a mask, GQA without `enable_gqa` bookkeeping). Its eager implementation is the
reference used when a graph falls back; its backward recomputes the probabilities from the inputs
with the textbook formulas (exact, but O(S²) memory) until the flash backward kernels exist.
"""

from __future__ import annotations

import math

import torch

OP_NAME = "flashmlir::attention"


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=-3)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask as the scores' additive bias of `dtype`: a bool one (True = attend) as 0 / -inf, a
    float one as it is, converted."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _combined_bias(
    q: torch.Tensor, sk: int, attn_mask: torch.Tensor | None, is_causal: bool, dtype: torch.dtype
) -> torch.Tensor | None:
    """The additive bias (0 or -inf, plus a float mask) that the scores get, or None."""
    sq = q.shape[-2]
    bias = None
    if attn_mask is not None:
        bias = additive_mask(attn_mask, dtype)
    if is_causal:
        causal = additive_mask(torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(), dtype)
        bias = causal if bias is None else bias + causal
    return bias


def attention_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias) in float32 (or float64 for float64 inputs), k already expanded.

    A row whose every score is -inf (every key masked by a boolean mask) gets probabilities 0,
    as in `F.scaled_dot_product_attention`; finite masks (finfo.min) keep plain arithmetic.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = default_scale(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * s
    bias = _combined_bias(q, k.shape[-2], attn_mask, is_causal, compute)
    if bias is not None:
        scores = scores + bias
    return torch.ops.aten._safe_softmax(scores, -1)


_HASH_MULTIPLIER = 0x45D9F3B  # an integer-hash mixing constant (32-bit, odd)
_GOLDEN = 0x9E3779B1
_MASK32 = 0xFFFFFFFF


def dropout_keep(seed: torch.Tensor, shape: torch.Size, p: float) -> torch.Tensor:
    """The dropout mask (True = keep) for probabilities of `shape` [..., Sq, Sk], a pure function of
    `seed`.

    One 32-bit integer hash serves two probabilities: rows r and r + 8 of an aligned group of 16
    (r & 8 == 0), same key, take its low and its high 16 bits, each kept when it is ≥ p · 2¹⁶ (so
    the kept fraction is p rounded up to a multiple of 2⁻¹⁶). The pairing is the one both CUDA
    kernels hold in one thread (runtime/microkernels/attention/dropout.cuh), which halves their
    hashing. The hash: x = (index · 0x9E3779B1 + seed) mod 2³² with index = (b·Sq + r)·Sk + key of
    the pair's first row (b: the flattened leading dims), then two rounds of x = ((x >> 16) ^ x) ·
    0x45D9F3B and a last x = (x >> 16) ^ x, in int64 so nothing overflows. Plain tensor ops: it
    traces into compiled graphs unchanged.
    """
    *lead, sq, sk = shape
    device = seed.device
    heads = torch.arange(math.prod(lead), dtype=torch.int64, device=device).view(-1, 1, 1)
    rows = torch.arange(sq, dtype=torch.int64, device=device).view(1, -1, 1)
    keys = torch.arange(sk, dtype=torch.int64, device=device).view(1, 1, -1)
    index = (heads * sq + (rows & ~8)) * sk + keys
    x = (index * _GOLDEN + seed.to(torch.int64)) & _MASK32
    for _ in range(2):
        x = (((x >> 16) ^ x) * _HASH_MULTIPLIER) & _MASK32
    x = (x >> 16) ^ x
    half = (x >> (16 * ((rows >> 3) & 1))) & 0xFFFF
    return ((half.to(torch.float64) * (1.0 / 2**16)) >= p).view(shape)


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The operator's meaning, written plainly; also its eager implementation."""
    groups = q.shape[-3] // k.shape[-3]
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    p = attention_probabilities(q, k, attn_mask, is_causal, scale)
    if dropout_p > 0.0:
        seed = draw_dropout_seed(q.device) if dropout_seed is None else dropout_seed
        p = p * dropout_keep(seed, p.shape, dropout_p) * (1.0 / (1.0 - dropout_p))
    return torch.matmul(p, v.to(p.dtype)).to(q.dtype)


def sdpa_means_the_same(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                        dropout_p: float, is_causal: bool) -> bool:
    """Whether torch's SDPA computes what the operator means for these operands (see
    `sdpa_attention`); fake tensors do."""
    same_dtype = attn_mask is None or attn_mask.dtype in (torch.bool, q.dtype)
    floating = q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return dropout_p == 0.0 and same_dtype and floating and not (is_causal and attn_mask is not None)


# An additive mask value at or below this never lets a key be attended (masks.NEVER): finfo.min of
# bf16 and float32 (-3.4e38) is, and so is this, whose scaling by log2(e) in SDPA's kernels stays finite.
NEVER = -1e30


def sdpa_mask(attn_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """`attn_mask` in the form under which torch's SDPA kernels compute what the op means (measured
    on an H200 with torch 2.11, benchmarks/results/h200-2026-12-02-masked-sdpa.md):

    - a bool mask on CUDA becomes 0 / -inf of q's dtype: cuDNN (SDPA's default there) gives a row
      whose every key a *bool* mask removes a nonzero output (relative error 6e-2), where the
      memory-efficient and math kernels give zeros; with -inf every kernel gives zeros and exact
      gradients.
    - a bf16 or float32 mask has its finite values clamped to NEVER: finfo.min times log2(e)
      overflows to -inf inside the fused kernels, so a row whose every key is at finfo.min (Hugging
      Face's masks) came out 0 where the op's arithmetic gives equal weights (4e-2 relative
      error); at NEVER both give equal weights, and a key beside attended ones still gets none.
      (Their backward stays wrong on such rows: the logsumexp absorbs the row's scores.)
    """
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return attn_mask if q.device.type != "cuda" else additive_mask(attn_mask, q.dtype)
    if torch.finfo(attn_mask.dtype).min < NEVER:
        return torch.where(torch.isneginf(attn_mask), attn_mask, attn_mask.clamp_min(NEVER))
    return attn_mask


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The operator through torch's own fused `F.scaled_dot_product_attention` where that computes
    the same thing, else `reference_attention`: what a site the microkernels do not take (an explicit
    mask) runs on the torch path. The reference materializes every score in float32; SDPA's CPU
    kernel is flash attention (3.4x faster at 1k tokens with a padding mask,
    benchmarks/results/cpu-2026-12-02-masked-inference.md), on CUDA cuDNN's (17x faster at 1k,
    h200-2026-12-02-masked-sdpa.md). Same result only where SDPA means the same: no dropout (our
    mask is the seeded hash, not torch's generator); a mask that is bool or of q's dtype (SDPA's
    rule: a float32 mask on bf16 inputs would have to be rounded, which moves finfo.min to -inf);
    not causal together with a mask (SDPA takes one or the other); the mask as `sdpa_mask` puts
    it. A row with every key masked by a bool or -inf mask gets zeros in both."""
    if not sdpa_means_the_same(q, k, v, attn_mask, dropout_p, is_causal):
        return reference_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_seed)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_mask(attn_mask, q), is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[-3] != k.shape[-3]
    )
    return out.contiguous()  # the op's layout (its fake kernel's); SDPA's CPU kernel returns [*, S, H, D] strides


def check_arguments(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> None:
    """Raise a ValueError naming the offending shape if the operands do not fit together."""
    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(
            f"flashmlir::attention expects q, k, v of the same rank >= 3, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:-3] != k.shape[:-3] or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"flashmlir::attention: leading dims and key sequence must agree, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1] or q.shape[-3] % k.shape[-3] != 0:
        raise ValueError(
            f"flashmlir::attention: head dims must agree and q heads must be a multiple of kv heads, "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if attn_mask is not None:
        scores = (*q.shape[:-1], k.shape[-2])
        try:
            torch.broadcast_shapes(tuple(attn_mask.shape), scores)
        except RuntimeError as e:
            raise ValueError(
                f"flashmlir::attention: mask {tuple(attn_mask.shape)} does not broadcast to the "
                f"scores {scores}"
            ) from e


@torch.library.custom_op(OP_NAME, mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    check_arguments(q, k, v, attn_mask)
    if dropout_p > 0.0 and dropout_seed is None:
        raise ValueError("flashmlir::attention with dropout_p > 0 needs a dropout_seed")
    return reference_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_seed)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, dropout_seed=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def decompose_with_dropout(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, dropout_seed=None):
    """aot_autograd decomposition: sites with dropout become plain math (with the seeded mask).

    Only the sm_90, sm_80 and CPU kernels apply dropout (training_ops' dropout pair, put in before
    aot_autograd); the sites left with dropout (other targets, inference graphs) stay compiled and
    exact this way. Sites without dropout stay whole (NotImplemented leaves the
    op to our passes).
    """
    if dropout_p == 0.0:
        return NotImplemented
    return reference_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_seed)


def _sum_to_shape(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast result back to `shape` (the gradient of a broadcast)."""
    lead = x.dim() - len(shape)
    if lead:
        x = x.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(dim=dims, keepdim=True) if dims else x


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_seed = inputs
    ctx.save_for_backward(q, k, v, attn_mask, dropout_seed)
    ctx.is_causal, ctx.scale, ctx.dropout_p = is_causal, scale, dropout_p
    ctx.mask_needs_grad = attn_mask is not None and attn_mask.requires_grad


def textbook_gradients(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None,
                       dropout_p: float = 0.0, seed: torch.Tensor | None = None):
    """dQ, dK, dV (in the inputs' dtypes) and dS (float32, the mask's gradient before any sum
    over its broadcast dims) by recomputing P = softmax(S) from the inputs: the op's backward.

    With Z the dropout scaling (keep/(1-p), or 1), dP = (dO·Vᵀ) ⊙ Z and
    dS = P ⊙ (dP − rowsum(dP ⊙ P)):  dV = (P ⊙ Z)ᵀ·dO, dQ = s·dS·K, dK = s·dSᵀ·Q.
    GQA: the gradients of a shared k/v head are summed over its group of q heads.
    """
    groups = q.shape[-3] // k.shape[-3]
    ke, ve = _expand_kv(k, groups), _expand_kv(v, groups)
    p = attention_probabilities(q, ke, attn_mask, is_causal, scale)
    s = default_scale(q.shape[-1]) if scale is None else scale
    do = grad_out.to(p.dtype)
    vf = ve.to(p.dtype)
    zp = p
    if dropout_p > 0.0:
        z = dropout_keep(seed, p.shape, dropout_p).to(p.dtype) * (1.0 / (1.0 - dropout_p))
        zp = p * z
    dv = torch.matmul(zp.transpose(-2, -1), do)
    dp = torch.matmul(do, vf.transpose(-2, -1))
    if dropout_p > 0.0:
        dp = dp * z
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, ke.to(p.dtype)) * s
    dk = torch.matmul(ds.transpose(-2, -1), q.to(p.dtype)) * s
    if groups > 1:
        dk = dk.unflatten(-3, (k.shape[-3], groups)).sum(dim=-3)
        dv = dv.unflatten(-3, (v.shape[-3], groups)).sum(dim=-3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds


def _backward(ctx, grad_out):
    """dQ, dK, dV (and dMask): `textbook_gradients` from the saved inputs."""
    q, k, v, attn_mask, seed = ctx.saved_tensors
    dq, dk, dv, ds = textbook_gradients(grad_out, q, k, v, attn_mask, ctx.is_causal, ctx.scale, ctx.dropout_p, seed)
    dmask = _sum_to_shape(ds, attn_mask.shape).to(attn_mask.dtype) if ctx.mask_needs_grad else None
    return dq, dk, dv, dmask, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


def attention_overload():
    """The OpOverload that graphs hold (`torch.ops.flashmlir.attention.default`)."""
    return torch.ops.flashmlir.attention.default
