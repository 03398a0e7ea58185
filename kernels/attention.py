"""Paged attention over a block KV cache: cache writes, ragged causal prefill, split-KV decode.

Cache layout: k_cache and v_cache are [num_blocks, block_size, Hkv, D]. Position p of sequence b lives in
block block_tables[b, p // block_size] at offset p % block_size; its flat slot is
block * block_size + offset. GQA: q head h reads kv head h // (Hq // Hkv). Softmax runs in fp32.
A quantized cache (quant_policy 8 or 4) is a QuantizedKV per layer for K and for V: uint8 codes plus
float16 scales and zeros per token and head (one pair per vector, or per group of channels: policy 4's K),
same slots (layout: kernels/kv_quant.py, docs/kv-cache.md);
writes quantize; prefill (and the opt-in mma decode) dequantizes each K/V tile in registers as it reads it
(to q's dtype, then the same dots), while the runtime's decode over a quantized cache
(QUANTIZED_DECODE_KERNEL, "fold") feeds the raw codes to the dots and applies each token's scale and zero
to the score tiles. With 4 bits the dequantizing kernels' tile columns interleave the head's two halves
(kv_quant.head_dims), so q is loaded and the output stored in that column order and the dots need no
reshuffle; the fold kernel dots the two nibble halves separately.

Prefill (flash-attention style): one program per (BLOCK_M queries, sequence, q head); query j of a
sequence with q_len queries and kv_len cached tokens sits at position kv_len - q_len + j.
Decode: one program per (sequence, kv head, kv split) computes all Hq // Hkv q heads of the group
at once, so each K/V tile is read once per group. With several splits each program stores float32 partials
and counts itself in an arrival counter per (sequence, kv head) (kernels/split_counters.py); the last split to
arrive merges the group's splits by log-sum-exp in the same launch (_split_done) and resets the counter.
"""
from __future__ import annotations

import math

import torch

from lmc.errors import LmcError
from lmc.kernels.kv_quant import cache_parts, dequantize_kv_ref, quantize_kv_ref
from lmc.kernels.pdl import pdl_launch, pdl_wait
from lmc.kernels.split_counters import split_counters

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch reference serves
    triton = None

if triton is not None:
    from lmc.kernels.kv_quant import (code_offset, code_operand, codes_to_float32, head_dims, load_codes, load_dequant,
                                      load_nibble_halves, load_scale_zero, nibble_operands)
    from lmc.kernels.rotary_tiles import cos_sin_at, pair_cols, rotate_whole

    @triton.jit
    def _attend_tile(q, acc, m_i, l_i, keep, k_ptr, v_ptr, ksz_ptr, vsz_ptr, bt_row, offs_n, n_mask, offs_d, d_mask,
                     kvh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                     stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh, qk_scale,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BITS: tl.constexpr,
                     K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     HALF_DEQUANT: tl.constexpr):
        """One BLOCK_N tile of cached positions offs_n, found through the block table row, folded into the
        online softmax (log2 units) of q [R, BLOCK_D]; keep [R, BLOCK_N] masks what q may attend to.
        BITS 16: a float cache; 8 or 4: codes at k_ptr / v_ptr, (scale, zero) pairs at ksz_ptr / vsz_ptr,
        K_GROUP / V_GROUP channels per pair, dequantized in float16 when HALF_DEQUANT (q is float16)."""
        blk = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        tok = offs_n % PAGE
        k_off = blk * stride_kb + tok * stride_kt + kvh * stride_kh  # [BLOCK_N]
        v_off = blk * stride_vb + tok * stride_vt + kvh * stride_vh  # [BLOCK_N]
        nd_mask = n_mask[:, None] & d_mask[None, :]
        if BITS == 16:
            k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        else:
            ks_off = blk * stride_ksb + tok * stride_kst + kvh * stride_ksh  # [BLOCK_N]
            k = load_dequant(k_ptr, ksz_ptr, k_off, ks_off, n_mask, D, BLOCK_D, BITS, K_GROUP,
                             HALF_DEQUANT).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [R, BLOCK_N]
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])  # [R, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if BITS == 16:
            v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        else:
            vs_off = blk * stride_vsb + tok * stride_vst + kvh * stride_vsh  # [BLOCK_N]
            v = load_dequant(v_ptr, vsz_ptr, v_off, vs_off, n_mask, D, BLOCK_D, BITS, V_GROUP,
                             HALF_DEQUANT).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, m_new, l_i


    @triton.jit
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, ksz_ptr, vsz_ptr, o_ptr, bt_ptr, cu_ptr, kv_lens_ptr,
        qk_scale, group,
        stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh,
        stride_ot, stride_oh, stride_bt,
        D: tl.constexpr, PAGE: tl.constexpr,  # PAGE: tokens per cache block (a shift when a power of 2)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr,
        K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
        HALF_DEQUANT: tl.constexpr,
    ):
        pdl_wait(PDL)
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        q_start = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_start
        if pid_m * BLOCK_M >= q_len:
            return
        kv_len = tl.load(kv_lens_ptr + b)
        kvh = h // group

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d, d_mask = head_dims(D, BLOCK_D, BITS)  # [BLOCK_D]: the head dim in each tile column
        m_mask = offs_m < q_len
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        q_pos = kv_len - q_len + offs_m  # [BLOCK_M]

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = tl.minimum(kv_len, kv_len - q_len + (pid_m + 1) * BLOCK_M)
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            keep = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]  # causal
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, keep, k_ptr, v_ptr, ksz_ptr, vsz_ptr, bt_row, offs_n,
                                         n_mask, offs_d, d_mask, kvh, stride_kb, stride_kt, stride_kh,
                                         stride_vb, stride_vt, stride_vh, stride_ksb, stride_kst, stride_ksh,
                                         stride_vsb, stride_vst, stride_vsh, qk_scale, D, BLOCK_D, PAGE, BITS,
                                         K_GROUP, V_GROUP, DOT_PRECISION, HALF_DEQUANT)
        out = acc / l_i[:, None]
        tl.store(o_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _split_range(kv_lens_ptr, b, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
        """The cached positions [start, end) of sequence b that KV split `split` of a decode kernel covers: the
        sequence cut into NUM_SPLITS runs of whole BLOCK_N tiles (the last runs may be short or empty)."""
        kv_len = tl.load(kv_lens_ptr + b)
        split_len = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * split_len
        return start, tl.minimum(start + split_len, kv_len)

    @triton.jit
    def _merge_splits(o_row, part_o_row, lse_rows, heads, g_mask, stride_oh, stride_poh, stride_pos,
                      D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
        """o[heads] = the splits' partial outputs weighted by exp2 of their log2-sum-exp (lse_rows [BLOCK_G] + split)
        less its maximum, over the weights' sum, both summed in split order in float32; empty splits (-inf) weigh
        0 and a head whose splits are all empty gets zeros. The partials are read past L1 (.cg): the other splits
        wrote them from other SMs."""
        offs_d = tl.arange(0, BLOCK_D)
        gd_mask = g_mask[:, None] & (offs_d < D)[None, :]
        m = tl.full(heads.shape, float("-inf"), tl.float32)
        for s in tl.static_range(NUM_SPLITS):
            m = tl.maximum(m, tl.load(lse_rows + s, mask=g_mask, other=float("-inf"), cache_modifier=".cg"))
        m = tl.where(m == float("-inf"), 0.0, m)  # [BLOCK_G]
        w_sum = tl.zeros(heads.shape, tl.float32)
        acc = tl.zeros([heads.shape[0], BLOCK_D], tl.float32)
        parts = part_o_row + heads[:, None] * stride_poh + offs_d[None, :]  # [BLOCK_G, BLOCK_D]
        for s in tl.static_range(NUM_SPLITS):
            w = tl.exp2(tl.load(lse_rows + s, mask=g_mask, other=float("-inf"), cache_modifier=".cg") - m)
            w_sum += w
            used = gd_mask & (w > 0)[:, None]  # a split of weight 0 (empty) is not read: at batch 1 most are
            acc += tl.load(parts + s * stride_pos, mask=used, other=0.0, cache_modifier=".cg") * w[:, None]
        out = acc / tl.where(w_sum > 0, w_sum, 1.0)[:, None]
        tl.store(o_row + heads[:, None] * stride_oh + offs_d[None, :], out.to(o_row.dtype.element_ty), mask=gd_mask)

    @triton.jit
    def _split_done(l_i, m_i, o_ptr, part_o_ptr, part_lse_ptr, count_ptr, b64, kvh, split, heads, g_mask,
                    stride_ob, stride_oh, stride_pob, stride_poh, stride_pos, stride_plb, stride_plh,
                    D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
        """The end of decode program (b, kvh, split) of a split launch, after it stored its partial outputs of the
        group's q heads `heads` [BLOCK_G]: stores their log2-sum-exp (from the online softmax's l_i, m_i
        [BLOCK_G]), then counts the split in (b, kvh)'s counter, an acq_rel atomic after a barrier (every
        thread's partials are stored before it); the last split of the group to arrive merges all NUM_SPLITS
        partials into o (_merge_splits) and sets the counter back to 0 for the next call."""
        lse_rows = part_lse_ptr + b64 * stride_plb + heads * stride_plh  # [BLOCK_G]
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))  # empty: -inf
        tl.store(lse_rows + split, lse, mask=g_mask)
        tl.debug_barrier()  # every thread's partials are stored before the counter says so
        counter = count_ptr + b64 * tl.num_programs(1) + kvh
        if tl.atomic_add(counter, 1, sem="acq_rel") == NUM_SPLITS - 1:
            _merge_splits(o_ptr + b64 * stride_ob, part_o_ptr + b64 * stride_pob, lse_rows, heads, g_mask,
                          stride_oh, stride_poh, stride_pos, D, NUM_SPLITS, BLOCK_D)
            tl.atomic_xchg(counter, 0)  # ready for the next call (and the next CUDA-graph replay)

    @triton.jit
    def _store_new_kv(k_new_ptr, v_new_ptr, k_ptr, v_ptr, slot_ptr, cos, sin, j, first, b64, kvh, offs_d, d_mask,
                      stride_knb, stride_knh, stride_vnb, stride_vnh, stride_kb, stride_kt, stride_kh,
                      stride_vb, stride_vt, stride_vh, PAGE: tl.constexpr, HALF: tl.constexpr):
        """Sequence b's new token, kv head kvh, into the cache at its flat slot slot_ptr[b]: its k rotated by its
        cos, sin [BLOCK_D] (at the pair indices j of the tile columns, first: the first-half columns) and its v."""
        slot = tl.load(slot_ptr + b64).to(tl.int64)
        blk = slot // PAGE
        tok = slot % PAGE
        k_row = k_new_ptr + b64 * stride_knb + kvh * stride_knh
        k = rotate_whole(k_row + j, d_mask, cos, sin, first, HALF)  # [BLOCK_D]
        tl.store(k_ptr + blk * stride_kb + tok * stride_kt + kvh * stride_kh + offs_d, k, mask=d_mask)
        v = tl.load(v_new_ptr + b64 * stride_vnb + kvh * stride_vnh + offs_d, mask=d_mask)  # [BLOCK_D]
        tl.store(v_ptr + blk * stride_vb + tok * stride_vt + kvh * stride_vh + offs_d, v, mask=d_mask)

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, ksz_ptr, vsz_ptr, o_ptr, part_o_ptr, part_lse_ptr, count_ptr, bt_ptr, kv_lens_ptr,
        qk_scale, group,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh,
        stride_ob, stride_oh, stride_bt,
        stride_pob, stride_poh, stride_pos, stride_plb, stride_plh,
        k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, slot_ptr, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cos,
        stride_sin,
        D: tl.constexpr, PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BITS: tl.constexpr, K_GROUP: tl.constexpr,
        V_GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
        HALF_DEQUANT: tl.constexpr, ROPE: tl.constexpr,
    ):
        """ROPE (a float cache): q is not rotated yet; each program rotates its group's q heads by sequence b's
        cos, sin rows, and the program whose split holds the new token (position kv_len - 1, in the last non-empty
        split; no other split reads it) first stores that token's rotated k (k_new) and its v (v_new) at its slot
        slot_ptr[b]: what rotary_write_kv does before a plain launch, with the same formula (rotary_tiles.py)."""
        pdl_wait(PDL)
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        start, end = _split_range(kv_lens_ptr, b, split, NUM_SPLITS, BLOCK_N)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d, d_mask = head_dims(D, BLOCK_D, BITS)  # [BLOCK_D]: the head dim in each tile column
        g_mask = offs_g < group
        heads = kvh * group + offs_g  # [BLOCK_G]
        b64 = b.to(tl.int64)
        gd_mask = g_mask[:, None] & d_mask[None, :]
        if ROPE:
            j, first = pair_cols(offs_d, D // 2)  # [BLOCK_D]
            cos, sin = cos_sin_at(cos_ptr, sin_ptr, b64, stride_cos, stride_sin, j, d_mask)  # [BLOCK_D] each
            q = rotate_whole(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + j[None, :], gd_mask, cos, sin,
                             first, D // 2)  # [BLOCK_G, BLOCK_D]
            if (start < end) & (end == tl.load(kv_lens_ptr + b)):  # this split holds the new token
                _store_new_kv(k_new_ptr, v_new_ptr, k_ptr, v_ptr, slot_ptr, cos, sin, j, first, b64, kvh, offs_d,
                              d_mask, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_kb, stride_kt, stride_kh,
                              stride_vb, stride_vt, stride_vh, PAGE, D // 2)
                tl.debug_barrier()  # every thread's stores are visible to the program's own tile loads
        else:
            q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gd_mask,
                        other=0.0)  # [BLOCK_G, BLOCK_D]

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        bt_row = bt_ptr + b64 * stride_bt
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            keep = tl.broadcast_to(n_mask[None, :], (BLOCK_G, BLOCK_N))
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, keep, k_ptr, v_ptr, ksz_ptr, vsz_ptr, bt_row, offs_n,
                                         n_mask, offs_d, d_mask, kvh, stride_kb, stride_kt, stride_kh,
                                         stride_vb, stride_vt, stride_vh, stride_ksb, stride_kst, stride_ksh,
                                         stride_vsb, stride_vst, stride_vsh, qk_scale, D, BLOCK_D, PAGE, BITS,
                                         K_GROUP, V_GROUP, DOT_PRECISION, HALF_DEQUANT)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty split (or kv_len 0) gives zeros
        if NUM_SPLITS == 1:
            tl.store(o_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=gd_mask)
        else:
            tl.store(part_o_ptr + b64 * stride_pob + heads[:, None] * stride_poh + split * stride_pos
                     + offs_d[None, :], out, mask=gd_mask)
            _split_done(l_i, m_i, o_ptr, part_o_ptr, part_lse_ptr, count_ptr, b64, kvh, split, heads, g_mask,
                        stride_ob, stride_oh, stride_pob, stride_poh, stride_pos, stride_plb, stride_plh,
                        D, NUM_SPLITS, BLOCK_D)

    @triton.jit
    def _half_dot(q, c):
        """q [1, BLOCK_G, BLOCK_H] . codes c [BLOCK_N, 1, BLOCK_H] over the last dim, on CUDA cores in float32:
        [BLOCK_N, BLOCK_G]."""
        return tl.sum(q * codes_to_float32(c), axis=2)

    @triton.jit
    def _grouped_half_score(q, c, sz_ptr, sz_off, n_mask, g0, HALF: tl.constexpr, GROUP: tl.constexpr):
        """sum over one half's groups of s * (q . c over the group) + z * sum(q over the group), for q
        [1, BLOCK_G, BLOCK_H] and codes c [BLOCK_N, 1, BLOCK_H] with the pairs g0, g0 + 1, ... at sz_off
        [BLOCK_N]; groups past the half read (0, 0): [BLOCK_N, BLOCK_G]."""
        BLOCK_G: tl.constexpr = q.shape[1]
        BLOCK_N: tl.constexpr = c.shape[0]
        NGB: tl.constexpr = q.shape[2] // GROUP
        NGH: tl.constexpr = (HALF + GROUP - 1) // GROUP
        grp = tl.arange(0, NGB)
        sz = sz_ptr + sz_off[:, None] + 2 * (g0 + grp)[None, :]  # [BLOCK_N, NGB]
        g_mask = n_mask[:, None] & (grp[None, :] < NGH)
        scale = tl.load(sz, mask=g_mask, other=0.0).to(tl.float32)
        zero = tl.load(sz + 1, mask=g_mask, other=0.0).to(tl.float32)
        qg = tl.reshape(q, (1, BLOCK_G, NGB, GROUP))
        dots = tl.sum(qg * codes_to_float32(tl.reshape(c, (BLOCK_N, 1, NGB, GROUP))), axis=3)  # [BLOCK_N, BLOCK_G, NGB]
        q_sums = tl.sum(qg, axis=3)  # [1, BLOCK_G, NGB]
        return tl.sum(dots * scale[:, None, :] + q_sums * zero[:, None, :], axis=2)

    @triton.jit
    def _decode_fma_kernel(
        q_ptr, k_ptr, v_ptr, ksz_ptr, vsz_ptr, o_ptr, part_o_ptr, part_lse_ptr, count_ptr, bt_ptr, kv_lens_ptr,
        qk_scale, group,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh,
        stride_ob, stride_oh, stride_bt,
        stride_pob, stride_poh, stride_pos, stride_plb, stride_plh,
        D: tl.constexpr, PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr, NUM_SPLITS: tl.constexpr, BITS: tl.constexpr, K_GROUP: tl.constexpr,
        BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):
        """_decode_kernel for quantized caches (BITS 8 or 4, V one (scale, zero) per vector) without the MMA:
        the group's q rows dot each K/V code tile on CUDA cores in float32, the tile [BLOCK_N, 1, BLOCK_H] kept in
        the layout it was loaded in and broadcast against q [1, BLOCK_G, BLOCK_H] (no shared-memory round trip).
        8 bits: a tile holds whole vectors (BLOCK_H >= D); 4 bits: the head as its two halves, the two nibbles
        of a byte (BLOCK_H >= D/2), each dotted with its half of q, no interleave. Per-vector scales
        stay out of the element loop: q . k_n = s_n (q . c_n) + z_n sum(q), and sum_n p_n v_n = sum_n (p_n s_n)
        c_n + sum_n p_n z_n; grouped keys (K_GROUP < D) take one partial dot per group, scaled per token.
        BLOCK_D (>= D): the width of the split merge's tiles (_merge_splits)."""
        pdl_wait(PDL)
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        start, end = _split_range(kv_lens_ptr, b, split, NUM_SPLITS, BLOCK_N)

        offs_g = tl.arange(0, BLOCK_G)
        HALVES: tl.constexpr = BITS == 4
        PART: tl.constexpr = D // 2 if HALVES else D  # channels per tile: channel j (and j + D/2 with 4 bits)
        j = tl.arange(0, BLOCK_H)
        g_mask = offs_g < group
        heads = kvh * group + offs_g  # [BLOCK_G]
        b64 = b.to(tl.int64)
        q_rows = q_ptr + b64 * stride_qb + heads[None, :, None] * stride_qh + j  # [1, BLOCK_G, BLOCK_H]
        q_mask = g_mask[None, :, None] & (j < PART)
        q1 = tl.load(q_rows, mask=q_mask, other=0.0).to(tl.float32) * qk_scale  # [1, BLOCK_G, BLOCK_H]
        q_sum = tl.sum(tl.sum(q1, axis=2), axis=0)  # [BLOCK_G]
        if HALVES:
            q2 = tl.load(q_rows + PART, mask=q_mask, other=0.0).to(tl.float32) * qk_scale
            q_sum += tl.sum(tl.sum(q2, axis=2), axis=0)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc1 = tl.zeros([BLOCK_G, BLOCK_H], tl.float32)  # sum_n p_n s_n c_n (4 bits: first half)
        if HALVES:
            acc2 = tl.zeros([BLOCK_G, BLOCK_H], tl.float32)  # second half
        acc_z = tl.zeros([BLOCK_G], tl.float32)  # sum_n p_n z_n, every channel's
        bt_row = bt_ptr + b64 * stride_bt
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            blk = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
            tok = offs_n % PAGE
            k_off = blk * stride_kb + tok * stride_kt + kvh * stride_kh  # [BLOCK_N]
            ks_off = blk * stride_ksb + tok * stride_kst + kvh * stride_ksh
            if HALVES:
                c1, c2 = load_nibble_halves(k_ptr, k_off[:, None, None], n_mask[:, None, None], D,
                                            BLOCK_H)  # [BLOCK_N, 1, BLOCK_H] each
                if K_GROUP < D:
                    qk = _grouped_half_score(q1, c1, ksz_ptr, ks_off, n_mask, 0, PART, K_GROUP) \
                        + _grouped_half_score(q2, c2, ksz_ptr, ks_off, n_mask, (PART + K_GROUP - 1) // K_GROUP,
                                              PART, K_GROUP)  # [BLOCK_N, BLOCK_G]
                else:
                    dot = _half_dot(q1, c1) + _half_dot(q2, c2)
            else:
                dot = _half_dot(q1, load_codes(k_ptr, k_off[:, None, None], n_mask[:, None, None], D, BLOCK_H))
            if K_GROUP >= D:
                k_scale = tl.load(ksz_ptr + ks_off, mask=n_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
                k_zero = tl.load(ksz_ptr + ks_off + 1, mask=n_mask, other=0.0).to(tl.float32)
                qk = dot * k_scale[:, None] + k_zero[:, None] * q_sum[None, :]  # [BLOCK_N, BLOCK_G]
            qk = tl.where(n_mask[:, None], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[None, :])  # [BLOCK_N, BLOCK_G]
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new

            v_off = blk * stride_vb + tok * stride_vt + kvh * stride_vh  # [BLOCK_N]
            vs_off = blk * stride_vsb + tok * stride_vst + kvh * stride_vsh
            v_scale = tl.load(vsz_ptr + vs_off, mask=n_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
            v_zero = tl.load(vsz_ptr + vs_off + 1, mask=n_mask, other=0.0).to(tl.float32)
            ps = (p * v_scale[:, None])[:, :, None]  # [BLOCK_N, BLOCK_G, 1]
            if HALVES:
                c1, c2 = load_nibble_halves(v_ptr, v_off[:, None, None], n_mask[:, None, None], D, BLOCK_H)
                acc2 = acc2 * alpha[:, None] + tl.sum(ps * codes_to_float32(c2), axis=0)
            else:
                c1 = load_codes(v_ptr, v_off[:, None, None], n_mask[:, None, None], D, BLOCK_H)
            acc1 = acc1 * alpha[:, None] + tl.sum(ps * codes_to_float32(c1), axis=0)  # [BLOCK_G, BLOCK_H]
            acc_z = acc_z * alpha + tl.sum(p * v_zero[:, None], axis=0)
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # an empty split (or kv_len 0) gives zeros
        gj_mask = g_mask[:, None] & (j[None, :] < PART)
        if NUM_SPLITS == 1:
            rows = o_ptr + b64 * stride_ob + heads[:, None] * stride_oh + j[None, :]
        else:
            rows = part_o_ptr + b64 * stride_pob + heads[:, None] * stride_poh + split * stride_pos + j[None, :]
        out1 = (acc1 + acc_z[:, None]) / l_safe[:, None]  # [BLOCK_G, BLOCK_H]
        tl.store(rows, out1.to(rows.dtype.element_ty), mask=gj_mask)
        if HALVES:
            out2 = (acc2 + acc_z[:, None]) / l_safe[:, None]
            tl.store(rows + PART, out2.to(rows.dtype.element_ty), mask=gj_mask)
        if NUM_SPLITS > 1:
            _split_done(l_i, m_i, o_ptr, part_o_ptr, part_lse_ptr, count_ptr, b64, kvh, split, heads, g_mask,
                        stride_ob, stride_oh, stride_pob, stride_poh, stride_pos, stride_plb, stride_plh,
                        D, NUM_SPLITS, BLOCK_D)

    @triton.jit
    def _q_operand(ptrs, mask, qk_scale):
        """q at ptrs as the fold kernel's dot operand: float16 and float32 q as stored; bfloat16 q times qk_scale,
        rounded to float16 (more significand bits than bfloat16; the codes' operand is then the exact 1024 + c,
        for which bfloat16 has too few; the scale, ~0.13 at D = 128, keeps |q| up to ~5e5 finite)."""
        q = tl.load(ptrs, mask=mask, other=0.0)
        if q.dtype == tl.bfloat16:
            q = (q.to(tl.float32) * qk_scale).to(tl.float16)
        return q

    @triton.jit
    def _fold_key_scores(qk, dot, q_sum, sz, n_mask, offset):
        """qk [BLOCK_N, BLOCK_G] plus the scores against one (scale, zero) group of the tokens' keys, from
        dot = x_n . q [BLOCK_N, BLOCK_G] (x_n = offset + c_n, the codes as dot operands: code_operand),
        q_sum = sum(q) [BLOCK_G] and the pairs at sz [BLOCK_N]: s_n dot + (z_n - offset s_n) q_sum, the scale and
        zero applied to the score tile (two FMAs per score)."""
        scale, zero = load_scale_zero(sz, n_mask)  # [BLOCK_N] each
        qk = qk + dot * scale[:, None]
        return qk + q_sum[None, :] * (zero - offset * scale)[:, None]

    @triton.jit
    def _dequant_group_operand(x, sz, n_mask, g0, offset, NGH: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_H: tl.constexpr, K_GROUP: tl.constexpr):
        """A half's key codes as dot operands x = offset + c [BLOCK_N, BLOCK_H] (code_operand) dequantized in
        x's dtype: (x - offset) s + z with each token's (scale, zero) of the channel's group (pairs g0 + j //
        K_GROUP at sz [BLOCK_N]; K_GROUP a power of two dividing BLOCK_H). x - offset is exact (the float16 1024 + c
        or the float32 c), so the only rounding is the final one, as an fp16 cache stores its keys."""
        NB: tl.constexpr = BLOCK_H // K_GROUP  # group slots per tile row (the ones past the half's NGH are zeros)
        gb = tl.arange(0, NB)
        scale, zero = load_scale_zero(sz[:, None] + 2 * (g0 + gb)[None, :],
                                      n_mask[:, None] & (gb < NGH)[None, :])  # [BLOCK_N, NB] each
        scale = tl.reshape(tl.broadcast_to(scale.to(x.dtype)[:, :, None], [BLOCK_N, NB, K_GROUP]), [BLOCK_N, BLOCK_H])
        zero = tl.reshape(tl.broadcast_to(zero.to(x.dtype)[:, :, None], [BLOCK_N, NB, K_GROUP]), [BLOCK_N, BLOCK_H])
        return (x - offset.to(x.dtype)) * scale + zero

    @triton.jit
    def _decode_fold_kernel(
        q_ptr, k_ptr, v_ptr, ksz_ptr, vsz_ptr, o_ptr, part_o_ptr, part_lse_ptr, count_ptr, bt_ptr, kv_lens_ptr,
        qk_scale, group,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh,
        stride_ob, stride_oh, stride_bt,
        stride_pob, stride_poh, stride_pos, stride_plb, stride_plh,
        D: tl.constexpr, PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr, NUM_SPLITS: tl.constexpr, BITS: tl.constexpr, K_GROUP: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
    ):
        """_decode_kernel for quantized caches (BITS 8 or 4, V one (scale, zero) per vector) with the scales and
        zeros folded out of the element loop, tensor-core dots kept: the K/V code tiles go to tl.dot as raw codes
        (code_operand: 1024 + c for float16 q), and each token's (scale, zero) is applied to the score tile:
        q . k_n = s_n (q . (1024 + c_n)) + (z_n - 1024 s_n) sum(q), per group for grouped keys (K_GROUP < D: see
        below); sum_n p_n v_n = (p s) @ (1024 + C) +
        sum_n (p_n z_n - 1024 (p s)_n), the last a per-row running sum added to every channel at the end. The
        tiles are transposed against _decode_kernel's, tokens as the MMA's M and the group's q rows as its N
        (BLOCK_G >= 8, the MMA's n, where _decode_kernel pads them to 16 as M): the score tile is
        [BLOCK_N, BLOCK_G] and the output is built as [BLOCK_H, BLOCK_G] = (1024 + C)^T @ (p s). 4 bits: the two
        nibble halves are separate dots (q's and the output's two halves, no interleave). A tile spans
        BLOCK_H >= D (8 bits) or >= D/2 (4 bits) channels. ASM: the codes become float16 operands by inline PTX
        (GPU only; kv_quant._codes_f16_asm). bfloat16 q runs as float16 (_q_operand). V's codes are addressed
        with K's strides (same shapes, asserted by the caller: one address computation for both tiles; stride_v*
        are unused).
        Grouped keys (4 bits, K_GROUP < D): each half's codes are dequantized in the tile as loaded
        ((1024 + c - 1024) s + z in float16, each token's group pair broadcast over its K_GROUP channels:
        _dequant_group_operand), then the plain chained pair of dots against q's halves. On an H200 at 16 x 16k
        254 µs (fp16 cache 269), against 284 for one block-diagonal q^T dot giving every group's partial scores
        and 310 for one K = 16 dot per group (bench/results/kv_kernel_folddq_h200.json, bench/NOTES.md): 865 SASS
        per tile and thread against 1008 for the block-diagonal form (sm_90, Triton 3.6, BLOCK_N 128).
        BLOCK_D (>= D): the width of the split merge's tiles (_merge_splits)."""
        pdl_wait(PDL)
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        start, end = _split_range(kv_lens_ptr, b, split, NUM_SPLITS, BLOCK_N)

        offs_g = tl.arange(0, BLOCK_G)
        HALVES: tl.constexpr = BITS == 4
        PART: tl.constexpr = D // 2 if HALVES else D  # channels per tile: channel j (and j + D/2 with 4 bits)
        GROUPED: tl.constexpr = K_GROUP < D
        NGH: tl.constexpr = (PART + K_GROUP - 1) // K_GROUP  # key groups per half (grouped keys)
        PRESCALED: tl.constexpr = q_ptr.dtype.element_ty == tl.bfloat16  # _q_operand scaled q by qk_scale
        j = tl.arange(0, BLOCK_H)
        g_mask = offs_g < group
        heads = kvh * group + offs_g  # [BLOCK_G]
        b64 = b.to(tl.int64)
        q_cols = q_ptr + b64 * stride_qb + heads[None, :] * stride_qh  # [1, BLOCK_G]: q^T's columns
        jg_mask = (j[:, None] < PART) & g_mask[None, :]
        q1 = _q_operand(q_cols + j[:, None], jg_mask, qk_scale)  # [BLOCK_H, BLOCK_G]
        offset = code_offset(q1.dtype)  # a value, not a constexpr: Triton 3.6 cannot pass a jit result as one
        if HALVES:
            q2 = _q_operand(q_cols + PART + j[:, None], jg_mask, qk_scale)
        if not GROUPED:  # the zero term of ungrouped keys (_fold_key_scores) needs sum(q) per head
            q_sum = tl.sum(q1.to(tl.float32), axis=0)  # [BLOCK_G]
            if HALVES:
                q_sum += tl.sum(q2.to(tl.float32), axis=0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc1 = tl.zeros([BLOCK_H, BLOCK_G], tl.float32)  # sum_n (1024 + c_n) (p_n s_n) (4 bits: first half)
        if HALVES:
            acc2 = tl.zeros([BLOCK_H, BLOCK_G], tl.float32)  # second half
        acc_z = tl.zeros([BLOCK_G], tl.float32)  # sum_n p_n z_n - 1024 (p_n s_n), every channel's
        bt_row = bt_ptr + b64 * stride_bt
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            blk = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
            tok = offs_n % PAGE
            k_off = blk * stride_kb + tok * stride_kt + kvh * stride_kh  # [BLOCK_N]
            ks_off = blk * stride_ksb + tok * stride_kst + kvh * stride_ksh
            qk = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
            if GROUPED:  # each half's codes dequantized in the tile as loaded, then plain dots
                x1, x2 = nibble_operands(load_codes(k_ptr, k_off[:, None], n_mask[:, None], PART, BLOCK_H), q1.dtype,
                                         ASM)  # [BLOCK_N, BLOCK_H] each: offset + c
                x1 = _dequant_group_operand(x1, ksz_ptr + ks_off, n_mask, 0, offset, NGH, BLOCK_N, BLOCK_H, K_GROUP)
                x2 = _dequant_group_operand(x2, ksz_ptr + ks_off, n_mask, NGH, offset, NGH, BLOCK_N, BLOCK_H, K_GROUP)
                qk = tl.dot(x2, q2, tl.dot(x1, q1, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)
            elif HALVES:  # one (scale, zero) for both halves: the two dots summed, then scaled
                x1, x2 = nibble_operands(load_codes(k_ptr, k_off[:, None], n_mask[:, None], PART, BLOCK_H), q1.dtype,
                                         ASM)  # [BLOCK_N, BLOCK_H] each
                dot = tl.dot(x2, q2, tl.dot(x1, q1, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)
                qk = _fold_key_scores(qk, dot, q_sum, ksz_ptr + ks_off, n_mask, offset)
            else:
                x1 = code_operand(load_codes(k_ptr, k_off[:, None], n_mask[:, None], D, BLOCK_H), q1.dtype, ASM)
                qk = _fold_key_scores(qk, tl.dot(x1, q1, input_precision=DOT_PRECISION), q_sum, ksz_ptr + ks_off,
                                      n_mask, offset)
            if not PRESCALED:
                qk = qk * qk_scale
            qk = tl.where(n_mask[:, None], qk, float("-inf"))  # [BLOCK_N, BLOCK_G], log2 units
            m_new = tl.maximum(m_i, tl.max(qk, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[None, :])  # [BLOCK_N, BLOCK_G]
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new

            vs_off = blk * stride_vsb + tok * stride_vst + kvh * stride_vsh  # [BLOCK_N] (4 bits: K has more pairs)
            v_scale, v_zero = load_scale_zero(vsz_ptr + vs_off, n_mask)  # [BLOCK_N] each
            ps = (p * v_scale[:, None]).to(q1.dtype)  # [BLOCK_N, BLOCK_G]: the dot's weights, rounded once
            acc_z = acc_z * alpha + tl.sum(p * v_zero[:, None] - offset * ps.to(tl.float32), axis=0)
            if HALVES:
                x1, x2 = nibble_operands(load_codes(v_ptr, k_off[:, None], n_mask[:, None], PART, BLOCK_H), q1.dtype,
                                         ASM)  # [BLOCK_N, BLOCK_H] each
                acc2 = acc2 * alpha[None, :] + tl.dot(tl.trans(x2), ps, input_precision=DOT_PRECISION)
            else:
                x1 = code_operand(load_codes(v_ptr, k_off[:, None], n_mask[:, None], D, BLOCK_H), q1.dtype, ASM)
            acc1 = acc1 * alpha[None, :] + tl.dot(tl.trans(x1), ps, input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_G]
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # an empty split (or kv_len 0) gives zeros
        if NUM_SPLITS == 1:
            cols = o_ptr + b64 * stride_ob + heads[None, :] * stride_oh + j[:, None]
        else:
            cols = part_o_ptr + b64 * stride_pob + heads[None, :] * stride_poh + split * stride_pos + j[:, None]
        out1 = (acc1 + acc_z[None, :]) / l_safe[None, :]  # [BLOCK_H, BLOCK_G]
        tl.store(cols, out1.to(cols.dtype.element_ty), mask=jg_mask)
        if HALVES:
            out2 = (acc2 + acc_z[None, :]) / l_safe[None, :]
            tl.store(cols + PART, out2.to(cols.dtype.element_ty), mask=jg_mask)
        if NUM_SPLITS > 1:
            _split_done(l_i, m_i, o_ptr, part_o_ptr, part_lse_ptr, count_ptr, b64, kvh, split, heads, g_mask,
                        stride_ob, stride_oh, stride_pob, stride_poh, stride_pos, stride_plb, stride_plh,
                        D, NUM_SPLITS, BLOCK_D)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache, v_cache, slot_mapping: torch.Tensor) -> None:
    """Stores k, v [T, Hkv, D] at flat slots slot_mapping [T] of the caches, in place. Caches are float
    tensors [num_blocks, block_size, Hkv, D] or QuantizedKV (then k and v are quantized in their stores'
    groups, quantize_kv_ref)."""
    _, _, Hkv, D = k_cache.shape
    T = slot_mapping.shape[0]
    assert k.shape == v.shape == (T, Hkv, D), f"k {tuple(k.shape)} / v {tuple(v.shape)} != [{T}, {Hkv}, {D}]"
    slots = slot_mapping.to(device=k_cache.device, dtype=torch.long)  # [T]
    for x, cache in ((k, k_cache), (v, v_cache)):
        data, scales_zeros, bits, group = cache_parts(cache)
        if scales_zeros is None:
            data.view(-1, Hkv, D).index_copy_(0, slots, x.to(data.dtype))
        else:
            codes, x_scales_zeros = quantize_kv_ref(x, bits, group)  # [T, Hkv, D * bits / 8], [T, Hkv, G, 2]
            data.view(-1, Hkv, data.shape[-1]).index_copy_(0, slots, codes)
            scales_zeros.view(-1, *scales_zeros.shape[2:]).index_copy_(0, slots, x_scales_zeros)


def _check_caches(q: torch.Tensor, k_cache, v_cache, block_tables: torch.Tensor) -> int:
    """Checks the caches against q; returns their bits (16: float)."""
    Hq, D = q.shape[1:]
    k_data, _, bits, _ = cache_parts(k_cache)
    v_data, _, v_bits, _ = cache_parts(v_cache)
    assert tuple(k_cache.shape) == tuple(v_cache.shape) and bits == v_bits, \
        f"k_cache {tuple(k_cache.shape)} ({bits} bits) != v_cache {tuple(v_cache.shape)} ({v_bits} bits)"
    assert k_cache.shape[3] == D, f"cache head_dim {k_cache.shape[3]} != q head_dim {D}"
    assert Hq % k_cache.shape[2] == 0, f"q heads {Hq} not a multiple of kv heads {k_cache.shape[2]}"
    if bits == 16:
        assert k_data.dtype == v_data.dtype == q.dtype, f"dtypes differ: q {q.dtype}, cache {k_data.dtype}"
    assert block_tables.dim() == 2
    return bits


def _quant_args(k_cache, v_cache) -> tuple[tuple, dict]:
    """The kernels' (k, v, k scales_zeros, v scales_zeros, 3 strides of each scales_zeros) and their K_GROUP,
    V_GROUP and BLOCK_D (grouped 4-bit loads need BLOCK_D >= 2 * group): for a float cache the scale pointers
    are the values (never read) and the strides 0."""
    k_data, k_sz, _, k_group = cache_parts(k_cache)
    v_data, v_sz, _, v_group = cache_parts(v_cache)
    D = k_cache.shape[3]
    block_d = max(triton.next_power_of_2(D), 16, *(2 * g for g in (k_group, v_group) if g < D))
    consts = dict(K_GROUP=k_group, V_GROUP=v_group, BLOCK_D=block_d)
    if k_sz is None:
        return (k_data, v_data, k_data, v_data, 0, 0, 0, 0, 0, 0), consts
    assert k_sz.stride()[3:] == v_sz.stride()[3:] == (2, 1), "a head's (scale, zero) pairs must be contiguous"
    return (k_data, v_data, k_sz, v_sz, *k_sz.stride()[:3], *v_sz.stride()[:3]), consts


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs stay exact, never rounded to tf32


def paged_prefill_attention_triton(
    q: torch.Tensor, k_cache, v_cache, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, scale: float, block_m: int = 64, block_n: int = 64,
    max_q: int | None = None,
) -> torch.Tensor:
    if triton is None:
        raise LmcError("Triton is not installed; install it (pip install triton) or run on CPU")
    bits = _check_caches(q, k_cache, v_cache, block_tables)
    (k_data, v_data, k_sz, v_sz, *sz_strides), consts = _quant_args(k_cache, v_cache)
    assert q.stride(-1) == k_data.stride(-1) == v_data.stride(-1) == 1
    T, Hq, D = q.shape
    B = kv_lens.shape[0]
    assert cu_seqlens_q.shape == (B + 1,) and block_tables.shape[0] == B
    out = torch.empty_like(q)  # [T, Hq, D]
    if max_q is None:
        max_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B else 0  # a host sync
    if max_q == 0:
        return out
    grid = (triton.cdiv(max_q, block_m), B, Hq)
    _prefill_kernel[grid](
        q, k_data, v_data, k_sz, v_sz, out, block_tables, cu_seqlens_q, kv_lens,
        scale * math.log2(math.e), Hq // k_cache.shape[2],
        q.stride(0), q.stride(1),
        k_data.stride(0), k_data.stride(1), k_data.stride(2),
        v_data.stride(0), v_data.stride(1), v_data.stride(2),
        *sz_strides,
        out.stride(0), out.stride(1), block_tables.stride(0),
        D=D, PAGE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, BITS=bits, **consts,
        DOT_PRECISION=_dot_precision(q.dtype), HALF_DEQUANT=q.dtype == torch.float16,
        num_warps=4, num_stages=2, **pdl_launch(q.device),
    )
    return out


INT4_FOLD_SPLITS = 4  # KV splits for int4 fold launches the default heuristic gives one (1: the heuristic's)


def _default_num_splits(q: torch.Tensor, programs: int, max_context: int, block_n: int) -> int:
    """Enough splits to fill the GPU about twice, none shorter than one BLOCK_N tile; needs no host sync.
    Short contexts at batch 1 gain most: each split is a chain of dependent loads (block table, K, V) per
    tile, so fewer tiles per split means less latency (8B decode at kv 192: 2 splits of 2 tiles -> 3 of 1)."""
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(max_context, block_n), 32))


def _rope_args(q: torch.Tensor, k_cache, rope: tuple | None) -> tuple:
    """The mma decode kernel's last positional arguments: the step's k, v [B, Hkv, D], cos, sin [B, D/2], flat slots
    [B] and the strides of k, v, cos and sin; without rope, q's pointer in their place (never read) and strides 0."""
    if rope is None:
        return (q,) * 5 + (0,) * 6
    k, v, cos, sin, slot_mapping = (t if t.stride(-1) == 1 else t.contiguous() for t in rope)
    B, _, D = q.shape
    assert k.shape == v.shape == (B, *k_cache.shape[2:]) and k.dtype == v.dtype == q.dtype, \
        f"k {tuple(k.shape)} {k.dtype} / v {tuple(v.shape)} {v.dtype} do not match the cache's [Hkv, D] and q's dtype"
    assert cos.shape == sin.shape == (B, D // 2) and D % 2 == 0, f"cos/sin {tuple(cos.shape)} must be [{B}, {D // 2}]"
    assert slot_mapping.shape == (B,), f"slot_mapping {tuple(slot_mapping.shape)} != [{B}]"
    slots = slot_mapping.to(device=q.device).contiguous()  # [B]
    return (k, v, cos, sin, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0))


def paged_decode_attention_triton(
    q: torch.Tensor, k_cache, v_cache, block_tables: torch.Tensor,
    kv_lens: torch.Tensor, scale: float, num_splits: int | None = None, block_n: int | None = None,
    num_warps: int = 4, num_stages: int = 2, kernel: str = "mma", rope: tuple | None = None,
) -> torch.Tensor:
    """kernel "mma": _decode_kernel (tl.dot on dequantized tiles; every cache); "fma": _decode_fma_kernel
    (CUDA-core dots on the codes); "fold": _decode_fold_kernel (tl.dot on the raw codes, scales and zeros applied
    to the score tiles; grouped int4 keys dequantized in the tile). fma and fold read quantized caches with V one
    (scale, zero) per vector, as the runtime's. rope (k, v, cos, sin, slot_mapping; mma over a float cache): q is
    not rotated yet, and the kernel also does what rotary_write_kv(q, k, v, cos, sin, caches, slot_mapping) would
    before it (kernels/rotary.py rotary_decode_attention), the new token being each sequence's position
    kv_lens[b] - 1 (slot_mapping[b]), kv_lens[b] >= 1."""
    if triton is None:
        raise LmcError("Triton is not installed; install it (pip install triton) or run on CPU")
    assert kernel in ("mma", "fma", "fold"), f"decode kernel {kernel!r}: 'mma', 'fma' or 'fold'"
    bits = _check_caches(q, k_cache, v_cache, block_tables)
    (k_data, v_data, k_sz, v_sz, *sz_strides), consts = _quant_args(k_cache, v_cache)
    assert q.stride(-1) == k_data.stride(-1) == v_data.stride(-1) == 1
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    assert kv_lens.shape == (B,) and block_tables.shape[0] == B
    group = Hq // Hkv
    max_context = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = _default_num_splits(q, B * Hkv, max_context, block_n or 64)
        if kernel == "fold" and bits == 4 and num_splits == 1:  # 8B step at 64 x 16k, H200: 1 split 46.1 ms
            num_splits = max(1, min(INT4_FOLD_SPLITS, max_context // 256))  # (kv_quant_h200_v7.json), 4: 38.9 (v8)
            block_n = block_n or 64
    if block_n is None:  # fold on an H200 (µs at BLOCK_N 128 vs 64): int8 (kv_kernel_fold_h200.json) 16 x 16k,
        # 3 splits, 230 vs 287; 64 x 4k, 1 split, 330 vs 256; int4 (kv_kernel_folddq_h200.json) 254 vs 304; 328 vs 273
        block_n = 128 if kernel == "fold" and num_splits > 1 else 64
    out = torch.empty_like(q)  # [B, Hq, D]
    if B == 0:
        return out
    part_o = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)  # [B, Hq, S, D]
    part_lse = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)  # [B, Hq, S], log2 units
    counters = split_counters(q.device, B * Hkv) if num_splits > 1 else part_lse  # one per (b, kv head)
    BLOCK_D = consts["BLOCK_D"]
    args = (q, k_data, v_data, k_sz, v_sz, out, part_o, part_lse, counters, block_tables, kv_lens,
            scale * math.log2(math.e), group,
            q.stride(0), q.stride(1),
            k_data.stride(0), k_data.stride(1), k_data.stride(2),
            v_data.stride(0), v_data.stride(1), v_data.stride(2),
            *sz_strides,
            out.stride(0), out.stride(1), block_tables.stride(0),
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1))
    launch = dict(num_warps=num_warps, num_stages=num_stages, **pdl_launch(q.device))
    if kernel != "mma":
        assert bits != 16 and consts["V_GROUP"] == D, f"the {kernel} decode kernel reads quantized caches, V per vector"
    assert rope is None or (kernel == "mma" and bits == 16), \
        "the decode kernel rotates q and writes k, v: mma, float cache"
    if kernel == "fold":  # it reads each (scale, zero) pair as one 32-bit word (kv_quant.load_scale_zero)
        assert k_sz.data_ptr() % 4 == v_sz.data_ptr() % 4 == 0 and all(x % 2 == 0 for x in sz_strides), \
            "the fold decode kernel needs 4-byte aligned (scale, zero) pairs"
        assert k_data.stride() == v_data.stride(), "the fold decode kernel addresses V's codes with K's strides"
        _decode_fold_kernel[(B, Hkv, num_splits)](
            *args, D=D, PAGE=block_size, BLOCK_G=max(triton.next_power_of_2(group), 8), BLOCK_N=block_n,
            BLOCK_H=max(triton.next_power_of_2(D // 2 if bits == 4 else D), 16), NUM_SPLITS=num_splits, BITS=bits,
            K_GROUP=consts["K_GROUP"], BLOCK_D=BLOCK_D, DOT_PRECISION=_dot_precision(q.dtype),
            ASM=q.is_cuda and q.dtype != torch.float32, **launch)
    elif kernel == "fma":
        _decode_fma_kernel[(B, Hkv, num_splits)](
            *args, D=D, PAGE=block_size, BLOCK_G=triton.next_power_of_2(group), BLOCK_N=block_n,
            BLOCK_H=BLOCK_D // 2 if bits == 4 else BLOCK_D, NUM_SPLITS=num_splits, BITS=bits,
            K_GROUP=consts["K_GROUP"], BLOCK_D=BLOCK_D, **launch)
    else:
        _decode_kernel[(B, Hkv, num_splits)](
            *args, *_rope_args(q, k_cache, rope), D=D, PAGE=block_size, BLOCK_G=max(triton.next_power_of_2(group), 16),
            BLOCK_N=block_n, NUM_SPLITS=num_splits, BITS=bits, **consts, DOT_PRECISION=_dot_precision(q.dtype),
            HALF_DEQUANT=q.dtype == torch.float16, ROPE=rope is not None, **launch)
    return out


def _gather_kv(cache, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """The first n cached positions of a sequence, [n, Hkv, D] (float32 when dequantized)."""
    data, scales_zeros, bits, group = cache_parts(cache)
    block_size = data.shape[1]
    blocks = block_table[: -(-n // block_size)].to(device=data.device, dtype=torch.long)  # [ceil(n / bs)]
    rows = data[blocks].flatten(0, 1)[:n]  # [n, Hkv, D] values or [n, Hkv, D * bits / 8] codes
    if scales_zeros is None:
        return rows
    return dequantize_kv_ref(rows, scales_zeros[blocks].flatten(0, 1)[:n], bits, group)  # [n, Hkv, D]


def _attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q [L, Hq, D] at positions q_pos [L] over k, v [n, Hkv, D] (positions 0..n-1), causal, in fp32."""
    L, Hq, D = q.shape
    n, Hkv, _ = k.shape
    qg = q.float().reshape(L, Hkv, Hq // Hkv, D)  # [L, Hkv, G, D]
    s = torch.einsum("lhgd,nhd->hgln", qg, k.float()) * scale  # [Hkv, G, L, n]
    visible = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]  # [L, n]
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)  # [Hkv, G, L, n]
    return torch.einsum("hgln,nhd->lhgd", p, v.float()).reshape(L, Hq, D)  # [L, Hq, D]


def paged_prefill_attention_ref(
    q: torch.Tensor, k_cache, v_cache, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    _check_caches(q, k_cache, v_cache, block_tables)
    cu = cu_seqlens_q.tolist()
    lens = kv_lens.tolist()
    assert len(cu) == len(lens) + 1 and cu[-1] == q.shape[0], f"cu_seqlens_q {cu} does not cover {q.shape[0]} tokens"
    out = torch.empty_like(q)  # [T, Hq, D]
    for b, n in enumerate(lens):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        assert n >= e - s, f"sequence {b}: kv_len {n} < q_len {e - s}"
        k = _gather_kv(k_cache, block_tables[b], n)  # [n, Hkv, D]
        v = _gather_kv(v_cache, block_tables[b], n)  # [n, Hkv, D]
        q_pos = torch.arange(n - (e - s), n, device=q.device)  # [L]
        out[s:e] = _attend_ref(q[s:e], k, v, q_pos, scale).to(q.dtype)
    return out


def paged_decode_attention_ref(
    q: torch.Tensor, k_cache, v_cache, block_tables: torch.Tensor,
    kv_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    cu_seqlens_q = torch.arange(q.shape[0] + 1, dtype=torch.int32)  # one query per sequence
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale)


def paged_prefill_attention(
    q: torch.Tensor, k_cache, v_cache, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, scale: float, max_q: int | None = None,
) -> torch.Tensor:
    """Causal attention of a ragged batch q [T, Hq, D] (cu_seqlens_q [B+1]) over its cached k/v (float
    caches or QuantizedKV); [T, Hq, D]. max_q: the longest sequence's query count if the caller knows it
    (else read from cu_seqlens_q on CUDA: a host sync each call)."""
    if q.is_cuda:
        return paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale,
                                              max_q=max_q)
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale)


QUANTIZED_DECODE_KERNEL = "fold"  # the runtime's decode kernel for quant_policy 8 / 4 (bench_kv.py --decode-kernel)


def paged_decode_attention(
    q: torch.Tensor, k_cache, v_cache, block_tables: torch.Tensor,
    kv_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Attention of one new token per sequence q [B, Hq, D] over kv positions 0..kv_lens[b]-1; [B, Hq, D].
    A quantized cache is read by QUANTIZED_DECODE_KERNEL, a float cache by the mma kernel."""
    if q.is_cuda:
        kernel = "mma" if isinstance(k_cache, torch.Tensor) else QUANTIZED_DECODE_KERNEL
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, kv_lens, scale, kernel=kernel)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, kv_lens, scale)
