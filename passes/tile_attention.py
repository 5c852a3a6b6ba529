"""flashmlir-tile-attention: iree_linalg_ext.attention ⇒ flash-attention form in one dispatch.

    O = attention(Q, K, V, s, M)
      ⇒ flow.dispatch.workgroups[Sq/Bq, batch](Q, K, V, s, M') {     // Q-block parallel
           q = Q[b, q0:q0+Bq]; acc, mx, sum = 0, lowest, 0
           for kb in [0, causal ? ⌈(q0+Bq)/Bk⌉ : Sk/Bk):              // KV loop, causal skips
             acc, mx, sum = online_attention(q, K[b, kb], V[b, kb], s, mask_tile(kb))
                                         // running max, rescale of acc and sum, exp
           O[b, q0:q0+Bq] = acc / sum
        }

IREE's own lowering materializes a causal mask as an S×S tensor and tiles attention with a fixed
strategy; here the loop nest is ours: the KV loop bound skips blocks above the diagonal, masks are
computed per tile from indices (causal, ragged tail) or loaded per tile (the explicit mask, never
broadcast in memory), and GQA reads K/V through the group dim without copies. Each
`online_attention` tile carries the target's vector tile sizes; IREE vectorizes it.

For targets without CPU tiles (GPUs, until their microkernels) the pass writes the online form
instead: one `online_attention` over the whole op and our normalization, whose guard gives 0 for
a row with every key masked (IREE's own attention would divide 0 by 0 there).

The input must be in the canonical layout flashmlir-lower-attention produces (maps
(batch…, m, k1), (kbatch…, k2, k1), (kbatch…, k2, n) with kbatch ⊆ batch, output (batch…, m, n));
other layouts are declined and left to IREE's stock lowering.
"""

from __future__ import annotations

from dataclasses import dataclass

from iree.compiler import ir

from flashmlir.compiler.targets import AttentionTiles, get_target
from flashmlir.passes.attention_ir import (
    Attention,
    NotCanonical,
    Operand,
    analyze,
    analyze_layout,
    map_dims,
    replaced_inputs,
)
from flashmlir.passes.framework import PassResult, PassSpec
from flashmlir.passes.ir_utils import (
    NEG_INF_LITERAL,
    erase_unused,
    parallel_iterators,
    splice_function,
    tensor_type,
    walk_ops,
)

_LOWEST_F32 = "-3.40282347E+38"  # running-max start: finite, so exp(-inf - lowest) = 0, never NaN


@dataclass(frozen=True)
class Options:
    target: str = ""  # empty: the module's `flashmlir.target` attribute, else "cpu"
    q_block: int = 0  # 0: from the target's capability table
    kv_block: int = 0
    vector_q: int = 0
    vector_kv: int = 0
    max_vector_bytes: int = 0  # 0: the target's (the host CPU's vector width sets it)


def _tiles(target_tiles: AttentionTiles, options: Options, head_dim: int) -> AttentionTiles:
    """The target's tile sizes, with any the pass options override.

    Unless set explicitly, the vector step over keys shrinks with the head dim so that one
    Q·Kᵀ vector contraction (vector_q × vector_kv × head_dim f32) stays under the target's cap.
    """
    vector_q = options.vector_q or target_tiles.vector_q
    vector_kv = options.vector_kv or target_tiles.vector_kv
    max_vector_bytes = options.max_vector_bytes or target_tiles.max_vector_bytes
    if not options.vector_kv:
        while vector_kv > 1 and vector_q * vector_kv * head_dim * 4 >= max_vector_bytes:
            vector_kv //= 2
    return AttentionTiles(
        q_block=options.q_block or target_tiles.q_block,
        kv_block=options.kv_block or target_tiles.kv_block,
        vector_q=vector_q,
        vector_kv=vector_kv,
        max_vector_bytes=max_vector_bytes,
    )


def _choose_tiles(attn: Attention, tiles: AttentionTiles) -> tuple[int, int]:
    """Block sizes: the configured ones, shrunk (to a vector multiple) for short sequences.

    The final acc / sum of a Q block is vectorized whole by IREE (it is outside the tiled loop),
    so a block's rows × head dim must stay under the vector cap too.
    """
    bq = tiles.q_block
    while bq > tiles.vector_q and bq * attn.dv * 4 >= tiles.max_vector_bytes:
        bq //= 2
    bq = min(bq, _round_up(attn.sq, tiles.vector_q))
    bk = min(tiles.kv_block, _round_up(attn.sk, tiles.vector_kv))
    return bq, bk


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _function(attn: Attention, tiles: AttentionTiles, bq: int, bk: int) -> str:
    """The MLIR function replacing the attention op (see the module docstring for its shape)."""
    nqb, nkb = -(-attn.sq // bq), -(-attn.sk // bk)
    sq_p, sk_p = nqb * bq, nkb * bk
    lines: list[str] = []
    args = [f"%q: {attn.q.type()}", f"%k: {attn.k.type()}", f"%v: {attn.v.type()}", "%scale: f32"]
    if attn.mask is not None:
        args.append(f"%mask: {attn.mask.type()}")

    def padded(name: str, x: Operand) -> tuple[str, list[int]]:
        new = [sq_p if r == "m" else sk_p if r == "k2" else s for s, r in zip(x.shape, x.roles, strict=True)]
        if new == x.shape:
            return f"%{name}", new
        high = [n - s for n, s in zip(new, x.shape, strict=True)]
        idx = ", ".join(f"%i{i}: index" for i in range(len(new)))
        lines.extend([
            f"%{name}_p = tensor.pad %{name} low[{', '.join('0' * len(new))}] high[{', '.join(map(str, high))}] {{",
            f"^bb0({idx}):",
            f"  %{name}_zero = arith.constant 0.0 : {x.elem}",
            f"  tensor.yield %{name}_zero : {x.elem}",
            f"}} : {x.type()} to {tensor_type(new, x.elem)}",
        ])
        return f"%{name}_p", new

    ops = [padded("q", attn.q), padded("k", attn.k), padded("v", attn.v)]
    types = [tensor_type(s, x.elem) for (_, s), x in zip(ops, (attn.q, attn.k, attn.v), strict=True)]
    if attn.mask is not None:
        mv, ms = padded("mask", attn.mask)
    out_p = [sq_p if r == "m" else s for s, r in zip(attn.out.shape, attn.out.roles, strict=True)]
    out_p_type = tensor_type(out_p, attn.out.elem)

    operands = [v for v, _ in ops] + ["%scale"]
    operand_types = types + ["f32"]
    region_args = [
        f"%{n}: !iree_tensor_ext.dispatch.tensor<readonly:{t}>"
        for n, t in zip(("qbind", "kbind", "vbind"), types, strict=True)
    ]
    region_args.append("%sc: f32")
    if attn.mask is not None:
        mask_type = tensor_type(ms, attn.mask.elem)
        operands.append(mv)
        operand_types.append(mask_type)
        region_args.append(f"%mbind: !iree_tensor_ext.dispatch.tensor<readonly:{mask_type}>")
    region_args.append(f"%obind: !iree_tensor_ext.dispatch.tensor<writeonly:{out_p_type}>")
    batch_total = 1
    for s in attn.batch_sizes:
        batch_total *= s
    lines += [
        f"%nqb = arith.constant {nqb} : index",
        f"%nbatch = arith.constant {batch_total} : index",
        f"%r = flow.dispatch.workgroups[%nqb, %nbatch]({', '.join(operands)}) : "
        f"({', '.join(operand_types)}) -> {out_p_type} =",
        f"    ({', '.join(region_args)}) {{",
    ]
    lines += ["  " + ln for ln in _dispatch_body(attn, tiles, bq, bk, nkb, types,
                                                    mask_type if attn.mask is not None else None, out_p_type)]
    lines += [
        "} count(%x: index, %y: index) -> (index, index, index) {",
        "  %one = arith.constant 1 : index",
        "  flow.return %x, %y, %one : index, index, index",
        "}",
    ]
    result = "%r"
    if out_p != attn.out.shape:
        offsets = ", ".join("0" * len(out_p))
        sizes = ", ".join(map(str, attn.out.shape))
        strides = ", ".join("1" * len(out_p))
        lines.append(f"%o = tensor.extract_slice %r[{offsets}] [{sizes}] [{strides}] : {out_p_type} to {attn.out.type()}")
        result = "%o"
    lines.append(f"return {result} : {attn.out.type()}")
    body = "\n  ".join(lines)
    return f"func.func @tiled({', '.join(args)}) -> {attn.out.type()} {{\n  {body}\n}}"


def _dims_text(n: int) -> str:
    return ", ".join(f"d{i}" for i in range(n))


def _amap(n: int, dims: list[int]) -> str:
    return f"affine_map<({_dims_text(n)}) -> ({', '.join(f'd{d}' for d in dims)})>"


def _dispatch_body(attn, tiles, bq, bk, nkb, types, mask_type, out_type) -> list[str]:
    nb = len(attn.batch_sizes)
    elem, out_elem = attn.q.elem, attn.out.elem
    pos, n = attn.pos, attn.num_dims
    dv = attn.dv
    ones = [1] * nb
    b = [f"%b{i}" for i in range(nb)]
    lines = [
        "%c0 = arith.constant 0 : index",
        "%c1 = arith.constant 1 : index",
        f"%cbq = arith.constant {bq} : index",
        f"%cbk = arith.constant {bk} : index",
        f"%cnkb = arith.constant {nkb} : index",
        f"%csk = arith.constant {attn.sk} : index",
        "%fzero = arith.constant 0.0 : f32",
        f"%lowest = arith.constant {_LOWEST_F32} : f32",
        f"%mzero = arith.constant 0.0 : {elem}",
        f"%ninf = arith.constant {NEG_INF_LITERAL[elem]} : {elem}",
        "%wx = flow.dispatch.workgroup.id[0] : index",
        "%wy = flow.dispatch.workgroup.id[1] : index",
        "%q0 = arith.muli %wx, %cbq : index",
    ]
    # Delinearize the flat batch index %wy into one index per batch dim (last dim fastest).
    rest = "%wy"
    for i in reversed(range(nb)):
        size = attn.batch_sizes[i]
        if i == 0:
            lines.append(f"%b0 = arith.addi {rest}, %c0 : index")
            continue
        lines += [
            f"%bs{i} = arith.constant {size} : index",
            f"%b{i} = arith.remui {rest}, %bs{i} : index",
            f"%rest{i} = arith.divui {rest}, %bs{i} : index",
        ]
        rest = f"%rest{i}"

    def tile(x: Operand, full_shape: list[int], k0: str | None) -> tuple[list[str], list[str], list[int]]:
        offsets, sizes = [], []
        for r, size in zip(x.roles, full_shape, strict=True):
            if r.startswith("b"):
                offsets.append(b[int(r[1:])])
                sizes.append(1)
            elif r == "m":
                offsets.append("%q0")
                sizes.append(bq)
            elif r == "k2":
                offsets.append(k0)
                sizes.append(bk)
            else:
                offsets.append("0")
                sizes.append(size)
        return offsets, ["1"] * len(sizes), sizes

    def load(name: str, src: str, x: Operand, full_type: str, k0: str | None = None) -> tuple[str, str]:
        offsets, strides, sizes = tile(x, _parse_shape(full_type), k0)
        t = tensor_type(sizes, x.elem)
        lines.append(
            f"%{name} = iree_tensor_ext.dispatch.tensor.load {src}, offsets = [{', '.join(offsets)}], "
            f"sizes = [{', '.join(map(str, sizes))}], strides = [{', '.join(strides)}] : "
            f"!iree_tensor_ext.dispatch.tensor<readonly:{full_type}> -> {t}"
        )
        return f"%{name}", t

    qt, qt_type = load("qt", "%qbind", attn.q, types[0])
    acc_type = tensor_type([*ones, bq, dv], "f32")
    row_type = tensor_type([*ones, bq], "f32")
    lines += [
        f"%eacc = tensor.empty() : {acc_type}",
        f"%erow = tensor.empty() : {row_type}",
        f"%acc0 = linalg.fill ins(%fzero : f32) outs(%eacc : {acc_type}) -> {acc_type}",
        f"%max0 = linalg.fill ins(%lowest : f32) outs(%erow : {row_type}) -> {row_type}",
        f"%sum0 = linalg.fill ins(%fzero : f32) outs(%erow : {row_type}) -> {row_type}",
    ]
    if attn.causal:
        # Query rows q0..q0+Bq-1 attend keys up to q0+Bq-1: blocks past that are skipped.
        lines += [
            "%qlast = arith.addi %q0, %cbq : index",
            "%qlastm1 = arith.subi %qlast, %c1 : index",
            "%kblast = arith.divui %qlastm1, %cbk : index",
            "%kbend = arith.addi %kblast, %c1 : index",
            "%nend = arith.minui %kbend, %cnkb : index",
        ]
        bound = "%nend"
    else:
        bound = "%cnkb"
    state_types = f"{acc_type}, {row_type}, {row_type}"
    lines.append(
        f"%res:3 = scf.for %kb = %c0 to {bound} step %c1 iter_args(%acc = %acc0, %mx = %max0, %sm = %sum0) "
        f"-> ({state_types}) {{"
    )
    inner_start = len(lines)
    lines.append("%k0 = arith.muli %kb, %cbk : index")
    kt, kt_type = load("kt", "%kbind", attn.k, types[1], "%k0")
    vt, vt_type = load("vt", "%vbind", attn.v, types[2], "%k0")

    batch_dims = [pos[f"b{i}"] for i in range(nb)]
    maps = [
        _amap(n, [pos[r] for r in attn.q.roles]),
        _amap(n, [pos[r] for r in attn.k.roles]),
        _amap(n, [pos[r] for r in attn.v.roles]),
        _amap(n, []),
    ]
    ins = [(qt, qt_type), (kt, kt_type), (vt, vt_type), ("%sc", "f32")]
    need_index_mask = attn.causal or attn.sk % bk != 0
    if attn.mask is not None or need_index_mask:
        mask_tile_type = tensor_type([*ones, bq, bk], elem)
        mask_dims = [*batch_dims, pos["m"], pos["k2"]]
        gdims = [f"g{i}" for i in range(nb + 2)]
        ident = f"affine_map<({', '.join(gdims)}) -> ({', '.join(gdims)})>"
        generic_maps = [ident]
        generic_ins = ""
        block_args = [f"%o: {elem}"]
        keep = "%mzero"
        if attn.mask is not None:
            mt, mt_type = load("mt", "%mbind", attn.mask, mask_type, "%k0")
            # The explicit tile is indexed by a subset of (batch…, m, k2): map tile dims to them.
            role_to_g = {f"b{i}": gdims[i] for i in range(nb)} | {"m": gdims[nb], "k2": gdims[nb + 1]}
            in_map = f"affine_map<({', '.join(gdims)}) -> ({', '.join(role_to_g[r] for r in attn.mask.roles)})>"
            generic_maps.insert(0, in_map)
            generic_ins = f"ins({mt} : {mt_type}) "
            block_args.insert(0, f"%in: {elem}")
            keep = "%in"
        body = []
        if need_index_mask:
            body += [
                f"  %ii = linalg.index {nb} : index",
                f"  %jj = linalg.index {nb + 1} : index",
                "  %i = arith.addi %q0, %ii : index",
                "  %j = arith.addi %k0, %jj : index",
            ]
            conds = []
            if attn.sk % bk:
                body.append("  %inb = arith.cmpi ult, %j, %csk : index")
                conds.append("%inb")
            if attn.causal:
                body.append("  %below = arith.cmpi ule, %j, %i : index")
                conds.append("%below")
            if len(conds) == 2:
                body.append("  %attend = arith.andi %inb, %below : i1")
                cond = "%attend"
            else:
                cond = conds[0]
            body.append(f"  %val = arith.select {cond}, {keep}, %ninf : {elem}")
            result = "%val"
        else:
            result = keep
        lines += [
            f"%emt = tensor.empty() : {mask_tile_type}",
            f"%mtile = linalg.generic {{indexing_maps = [{', '.join(generic_maps)}], iterator_types = "
            f"{parallel_iterators(nb + 2)}}} {generic_ins}outs(%emt : {mask_tile_type}) {{",
            f"^bb0({', '.join(block_args)}):",
            *body,
            f"  linalg.yield {result} : {elem}",
            f"}} -> {mask_tile_type}",
        ]
        maps.append(_amap(n, mask_dims))
        ins.append(("%mtile", mask_tile_type))
    maps += [_amap(n, [*batch_dims, pos["m"], pos["n"]]), _amap(n, [*batch_dims, pos["m"]]),
             _amap(n, [*batch_dims, pos["m"]])]
    lines += [
        f"%o:3 = iree_linalg_ext.online_attention <indexing_maps = [{', '.join(maps)}]> "
        f"{{compilation_info = {_compilation_info(attn, tiles)}}} "
        f"ins({', '.join(v for v, _ in ins)} : {', '.join(t for _, t in ins)}) "
        f"outs(%acc, %mx, %sm : {state_types}) {{",
        "^bb0(%s: f32):",
        "  iree_linalg_ext.yield %s : f32",
        f"}} -> {state_types}",
        f"scf.yield %o#0, %o#1, %o#2 : {state_types}",
    ]
    lines[inner_start:] = ["  " + ln for ln in lines[inner_start:]]
    lines.append("}")
    # Normalize: O = acc / sum, in the output's element type.
    out_tile = tensor_type([*ones, bq, dv], out_elem)
    ids = [f"e{i}" for i in range(nb + 2)]
    full = f"affine_map<({', '.join(ids)}) -> ({', '.join(ids)})>"
    rows = f"affine_map<({', '.join(ids)}) -> ({', '.join(ids[:-1])})>"
    lines += [
        f"%eout = tensor.empty() : {out_tile}",
        f"%norm = linalg.generic {{indexing_maps = [{full}, {rows}, {full}], iterator_types = "
        f"{parallel_iterators(nb + 2)}}} ins(%res#0, %res#2 : {acc_type}, {row_type}) "
        f"outs(%eout : {out_tile}) {{",
        *_normalize_body(out_elem),
        f"}} -> {out_tile}",
    ]
    out_offsets = [b[int(r[1:])] if r.startswith("b") else "%q0" if r == "m" else "0" for r in attn.out.roles]
    out_sizes = [1 if r.startswith("b") else bq if r == "m" else dv for r in attn.out.roles]
    lines += [
        f"iree_tensor_ext.dispatch.tensor.store %norm, %obind, offsets = [{', '.join(out_offsets)}], "
        f"sizes = [{', '.join(map(str, out_sizes))}], strides = [{', '.join('1' * len(out_sizes))}] : "
        f"{out_tile} -> !iree_tensor_ext.dispatch.tensor<writeonly:{out_type}>",
        "flow.return",
    ]
    return lines


def _normalize_body(out_elem: str) -> list[str]:
    """acc / sum, with 0 where sum is 0 (a row whose every key was masked with -inf, as in SDPA)."""
    convert = [] if out_elem == "f32" else [f"  %cv = arith.truncf %safe : f32 to {out_elem}"]
    return [
        f"^bb0(%a: f32, %l: f32, %unused: {out_elem}):",
        "  %nz = arith.constant 0.0 : f32",
        "  %dv = arith.divf %a, %l : f32",
        "  %empty_row = arith.cmpf oeq, %l, %nz : f32",
        "  %safe = arith.select %empty_row, %nz, %dv : f32",
        *convert,
        f"  linalg.yield {'%cv' if convert else '%safe'} : {out_elem}",
    ]


def _online_form(attn: Attention, mask: ir.Value | None, mask_dims: list[int] | None) -> str:
    """attention ⇒ online_attention over the whole op plus our guarded normalization.

    For targets whose attention tiling IREE's codegen does (GPUs until their microkernels): the
    flash loop is IREE's, the normalization (0 for rows with every key masked) is ours.
    """
    n, pos, nb = attn.num_dims, attn.pos, len(attn.batch_sizes)
    batch = [pos[f"b{i}"] for i in range(nb)]
    acc_shape = [*attn.batch_sizes, attn.sq, attn.dv]
    acc_type, row_type = tensor_type(acc_shape, "f32"), tensor_type(acc_shape[:-1], "f32")
    operands = [("%q", attn.q.type()), ("%k", attn.k.type()), ("%v", attn.v.type()), ("%scale", "f32")]
    maps = [_amap(n, [pos[r] for r in x.roles]) for x in (attn.q, attn.k, attn.v)] + [_amap(n, [])]
    if mask is not None:
        operands.append(("%mask", str(mask.type)))
        maps.append(_amap(n, mask_dims))
    maps += [_amap(n, [*batch, pos["m"], pos["n"]]), _amap(n, [*batch, pos["m"]]), _amap(n, [*batch, pos["m"]])]
    ids = [f"e{i}" for i in range(nb + 2)]
    full = f"affine_map<({', '.join(ids)}) -> ({', '.join(ids)})>"
    rows = f"affine_map<({', '.join(ids)}) -> ({', '.join(ids[:-1])})>"
    out_type = attn.out.type()
    body = [
        "%fzero = arith.constant 0.0 : f32",
        f"%lowest = arith.constant {_LOWEST_F32} : f32",
        f"%eacc = tensor.empty() : {acc_type}",
        f"%erow = tensor.empty() : {row_type}",
        f"%acc0 = linalg.fill ins(%fzero : f32) outs(%eacc : {acc_type}) -> {acc_type}",
        f"%max0 = linalg.fill ins(%lowest : f32) outs(%erow : {row_type}) -> {row_type}",
        f"%sum0 = linalg.fill ins(%fzero : f32) outs(%erow : {row_type}) -> {row_type}",
        f"%res:3 = iree_linalg_ext.online_attention <indexing_maps = [{', '.join(maps)}]> "
        f"ins({', '.join(v for v, _ in operands)} : {', '.join(t for _, t in operands)}) "
        f"outs(%acc0, %max0, %sum0 : {acc_type}, {row_type}, {row_type}) {{",
        "^bb0(%s: f32):",
        "  iree_linalg_ext.yield %s : f32",
        f"}} -> {acc_type}, {row_type}, {row_type}",
        f"%eout = tensor.empty() : {out_type}",
        f"%norm = linalg.generic {{indexing_maps = [{full}, {rows}, {full}], iterator_types = "
        f"{parallel_iterators(nb + 2)}}} ins(%res#0, %res#2 : {acc_type}, {row_type}) outs(%eout : {out_type}) {{",
        *_normalize_body(attn.out.elem),
        f"}} -> {out_type}",
        f"return %norm : {out_type}",
    ]
    args = ", ".join(f"{v}: {t}" for v, t in operands)
    return f"func.func @online({args}) -> {out_type} {{\n  " + "\n  ".join(body) + "\n}"


def _parse_shape(tensor_type: str) -> list[int]:
    inner = tensor_type[len("tensor<"):-1]
    return [int(x) for x in inner.split("x")[:-1]]


def _compilation_info(attn: Attention, tiles: AttentionTiles) -> str:
    """Vector tile sizes for IREE's CPU attention vectorization; no further distribution."""
    n = attn.num_dims
    parallel, reduction = [0] * n, [0] * n
    for i in range(len(attn.batch_sizes)):
        parallel[attn.pos[f"b{i}"]] = 1
    parallel[attn.pos["m"]] = tiles.vector_q
    parallel[attn.pos["n"]] = attn.dv
    reduction[attn.pos["k2"]] = tiles.vector_kv
    return (
        "#iree_codegen.compilation_info<lowering_config = #iree_cpu.lowering_config<"
        f"distribution = {[0] * n}, vector_common_parallel = {parallel}, vector_reduction = {reduction}>, "
        "translation_info = #iree_codegen.translation_info<pipeline = #iree_cpu.pipeline<LinalgExtTileAndVectorize>>>"
    )


def _rewrite_online_form(op: ir.Operation, result: PassResult) -> None:
    try:
        attn = analyze_layout(op)
    except NotCanonical as why:
        result.decline(op, str(why))
        return
    operands = list(op.operands)
    maps = list(ir.ArrayAttr(op.attributes["indexing_maps"]))
    mask = operands[4] if len(maps) == 6 else None
    leftovers = replaced_inputs(attn)
    splice_function(op, _online_form(attn, mask, map_dims(maps[4]) if mask is not None else None),
                    [attn.q.value, attn.k.value, attn.v.value, attn.scale] + ([mask] if mask is not None else []))
    erase_unused(leftovers)
    result.rewritten += 1


def _target_name(module: ir.Operation, options: Options) -> str:
    if options.target:
        return options.target
    if "flashmlir.target" in module.attributes:
        return ir.StringAttr(module.attributes["flashmlir.target"]).value
    return "cpu"


def run(module: ir.Operation, options: Options) -> PassResult:
    result = PassResult(PASS.name)
    target = get_target(_target_name(module, options))
    candidates = walk_ops(module, "iree_linalg_ext.attention")
    if target.attention_tiles is None:
        for op in candidates:
            _rewrite_online_form(op, result)
        return result
    for op in candidates:
        try:
            attn = analyze(op)
            tiles = _tiles(target.attention_tiles, options, max(attn.dv, attn.q.shape[-1]))
            bq, bk = _choose_tiles(attn, tiles)
            text = _function(attn, tiles, bq, bk)
        except NotCanonical as why:
            result.decline(op, str(why))
            continue
        operands = [attn.q.value, attn.k.value, attn.v.value, attn.scale]
        if attn.mask is not None:
            operands.append(attn.mask.value)
        leftovers = replaced_inputs(attn)
        splice_function(op, text, operands)
        erase_unused(leftovers)
        result.rewritten += 1
    return result


PASS = PassSpec(
    name="flashmlir-tile-attention",
    summary="Tile iree_linalg_ext.attention into a Q-block-parallel dispatch with an online-softmax KV loop",
    options_type=Options,
    run=run,
)
