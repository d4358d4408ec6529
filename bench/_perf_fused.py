"""The kernels of the fused backends, for the performance model (bench/perf_model.py): every launch
of one EMSA or PA call with what it moves and computes.

Triton: the backend's own host functions (rest_kernels/triton/emsa_fwd.py, emsa_bwd.py, pa.py) run
on meta tensors inside rest_kernels.triton.launch.recording() (nothing compiled, nothing run) and
under an aten op log, so the launches, grids, tiles (the GPU tiles: TRITON_INTERPRET is switched
off while recording) and the torch ops the host code issues in between are exactly those of a
real call. Bytes and FLOPs per kernel are read off the kernel source (the per-element counts below).

CUDA: csrc/cuda/emsa_kernels.cuh and pa_kernels.cuh launch from C++, so their host code is
transcribed here (`cuda_kernels`), launch by launch, with the at::zeros fills and dtype
conversions it makes. Keep it in step with the .cuh files.

The Triton tiles depend on the arch (rest_kernels/triton/tiles.py): the launches are recorded for
the arch of the GPU being modelled (`arch`, under rest_kernels/triton/aot.py's compile-only driver,
which only names the target).

Counts: bytes are HBM bytes, each tensor a kernel touches once (bench/perf_model.py); FLOPs are
those the kernel executes, padding of its tiles included (masked lanes compute too): Triton pads
the head dim to BD and the rows to BN / BM (the mixed backward's head groups the heads to HP);
the CUDA kernels pad to 32 x 32 tiles
and the PV / dq / dk / dv accumulators to DPAD (64 or 128), while their logit dots stop at d.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from ._perf_aten import OpLog, eager_kernels, tensor_bytes
from .perf_model import Kernel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def _gpu_tiles(arch: int):
    """The Triton host code picks interpreter tiles when TRITON_INTERPRET is on: model the GPU's,
    those of `arch`.

    The kernel modules are imported first, under the process's own setting: `@triton.jit` reads
    TRITON_INTERPRET when a kernel is defined, and kernels defined while it is flipped off here would
    stay compiled-only (no driver without a GPU) for the rest of an interpreted process."""
    from rest_kernels.triton import emsa_bwd, emsa_fwd, pa  # noqa: F401
    from rest_kernels.triton.aot import compiling_for
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with compiling_for(arch):
            yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


# ----------------------------------------------------------------------------- Triton
def record_triton(shape, dtype: str, backward: bool, arch: int = 90) -> list:
    """The launches (PlannedLaunch) and torch ops (AtenOp) of one call on a GPU of `arch`, in
    program order: the forward, then (backward=True) the backward."""
    from rest_kernels.triton.launch import recording
    from rest_kernels.triton.resources import shape_tensors
    dt = DTYPES[dtype]
    events: list = []
    with _gpu_tiles(arch), torch.no_grad():
        tensors = shape_tensors(shape, dt)
        with recording(events), OpLog(events):
            if shape.op == "emsa":
                from rest_kernels.triton.emsa_bwd import emsa_backward
                from rest_kernels.triton.emsa_fwd import emsa_forward
                q, k, v, w = tensors
                scale, eps = shape.d ** -0.5, 1e-5
                out, lse, rsq, rstd = emsa_forward(q, k, v, w, scale, eps)
                if backward:
                    dout = torch.empty(out.transpose(1, 2).shape, dtype=dt, device="meta").transpose(1, 2)
                    emsa_backward(dout, q, k, v, w, out, lse, rsq, rstd, scale, eps)
            else:
                from rest_kernels.triton.pa import pa_backward, pa_forward
                x, w, b = tensors
                pa_forward(x, w, b)
                if backward:
                    pa_backward(torch.empty_like(x), x, w, b)
    return events


def triton_kernels(shape, dtype: str, backward: bool, arch: int = 90) -> list[Kernel]:
    from rest_kernels.triton.launch import PlannedLaunch
    kernels = []
    for ev in record_triton(shape, dtype, backward, arch):
        if isinstance(ev, PlannedLaunch):
            kernels.append(triton_kernel(ev, dtype))
        else:
            kernels.extend(eager_kernels([ev]))
    return kernels


def triton_config(constexprs: dict) -> str:
    from rest_kernels.triton.resources import _config
    return _config(constexprs)


def _tile_work(name: str, c: dict, H: int, N: int, M: int) -> tuple[int, float, float, float]:
    """(logit tiles one program walks, tensor-core dots per logit element, other FLOPs per logit
    element, exponentials per logit element), read off the kernels. A dot costs 2 BD FLOPs per logit
    element. The mixed forward forms each input head's q_j k_j^T once per tile pair and mixes it
    into the G output heads of its program (rest_kernels/triton/_common.py:group_logits, 2 FLOPs
    per input and output head); the mixed backward forms each S_g with one dot per input head
    (head_logits); the rest: scale, max / subtract / exp argument, sums, the norm terms of dS (~14)."""
    bn, bm = c["BN"], c["BM"]
    if name == "_stats_kernel":
        g = c["G"]
        return math.ceil(M / bm), H, g * (7 + 2 * H), g
    if name == "_flash_range_kernel":  # _stats_kernel's work and a P V product in one pass over its range
        g = c["G"]
        return c["blocks_per_split"], H + g, g * (9 + 2 * H + 3 * c["BD"] / bm), g
    if name == "_attn_range_kernel" or (name == "_attn_kernel" and c["NORM"]):
        g = c["G"]
        return c.get("blocks_per_split", math.ceil(M / bm)), H + g, g * (5 + 2 * H), g
    if name == "_attn_kernel":
        return math.ceil(M / bm), 2, 6 + c["BD"] / bm, 1
    if name == "_dkdv_kernel":  # each program walks its split's share of the query blocks
        return math.ceil(math.ceil(N / bn) / c["SPLIT"]), 4, 6, 1
    if name == "_dq_kernel":
        return math.ceil(M / bm), 3, 6, 1
    jg = c["JG"]
    if name == "_dkdv_mixed_kernel":  # every output head, its split's query blocks: S_g, dP, dv, dk_j x JG
        loop = H * math.ceil(math.ceil(N / bn) / c["SPLIT"])
        return loop, H + 2 + jg, 14 + 2 * H + 2 * jg * c["BD"] / bn, 1  # + the dW products (BD BM per j)
    if name == "_dq_mixed_kernel":  # every key block, every output head: S_g^T, dP^T, dL_j^T += W dS_g^T
        # (2 FLOPs per input head j of the group); per key block one dq_j product per input head
        return H * math.ceil(M / bm), H + 1 + jg / H, 14 + 2 * H + 2 * jg, 1
    raise KeyError(name)


#: argument positions read / written by each kernel (see the kernels' signatures)
_IO = {
    "_stats_kernel": ((0, 1), (3, 4)),
    "_flash_range_kernel": ((0, 1, 2), (4, 5, 6)),
    "_flash_merge_kernel": ((0, 1, 2), (3, 4, 5, 6)),
    "_attn_range_kernel": ((0, 1, 2, 5, 6), (4,)),
    "_key_split_row_terms_kernel": ((0, 1), (2,)),
    "_rowsum_kernel": ((0,), (1,)),
    "_split_sum_kernel": ((0, 1), (2, 3)),
    "_vbar_kernel": ((0,), (1,)),
    "_row_terms_kernel": ((0, 1), (2,)),
    "_dkdv_kernel": ((0, 1, 2, 3, 4, 5), (6, 7)),
    "_dq_kernel": ((0, 1, 2, 3, 4, 5), (6,)),
    "_dkdv_mixed_kernel": ((0, 1, 2, 3, 5, 6, 7, 8), (11, 12, 13)),
    "_dq_mixed_kernel": ((0, 1, 2, 3, 5, 6, 7, 8), (11,)),
    "_pa_fwd_kernel": ((0, 1), (3,)),
    "_pa_bwd_kernel": ((0, 1, 3), (4, 5)),
}
_TILED = ("_stats_kernel", "_attn_kernel", "_flash_range_kernel", "_attn_range_kernel",
          "_dkdv_kernel", "_dq_kernel", "_dkdv_mixed_kernel", "_dq_mixed_kernel")


def triton_kernel(ev, dtype: str) -> Kernel:
    name, c, a = ev.name, {**ev.constexprs, **ev.scalars}, ev.args  # scalars: e.g. the dk / dv split
    gx, gy, gz = ev.grid
    grid = gx * gy * gz
    if name == "_attn_kernel":
        reads, writes = ((0, 1, 2, 5, 6), (4,)) if c["NORM"] else ((0, 1, 2), (4, 5))
    else:
        reads, writes = _IO[name]
        if name in ("_pa_fwd_kernel", "_pa_bwd_kernel") and c["HAS_BIAS"]:
            reads += (2,)
    nb = [float(tensor_bytes(t)) if isinstance(t, torch.Tensor) else 0.0 for t in a]
    k = Kernel(name, sum(nb[i] for i in reads + writes), grid=grid,
               resource_key=f"{dtype} {name} {triton_config(ev.constexprs)}")
    if name in _TILED:
        B, H, N, _ = a[0].shape
        M = a[1].shape[2]
        loop, dots, fp_per, exps = _tile_work(name, c, H, N, M)
        elems = grid * loop * c["BN"] * c["BM"]
        k.dot_flops = dots * 2.0 * c["BD"] * elems
        k.dot_unit = "tc16" if c["DOT"] == 2 else "fp32"
        k.fp32 = fp_per * elems
        k.sfu = float(exps * elems)
        # operands every program walks again: k, v by the query-block programs; q, dO and the row
        # statistics by the key-block ones; with the mix (2-D), every head of q and k by the
        # programs of every output head (and head group)
        key_side = name in ("_dkdv_kernel", "_dkdv_mixed_kernel")
        if key_side:
            again = (0, 3, 4, 5) if name == "_dkdv_kernel" else (0, 3, 5, 6, 7)
            k.reread = (gx - 1) * sum(nb[i] for i in again)
        else:  # the query-block programs of one key range read 1 / SPLIT of k and v each
            again = (1,) if name == "_stats_kernel" else (1, 2)
            k.reread = (gx // c.get("SPLIT", 1) - 1) * sum(nb[i] for i in again)
        if name in ("_dkdv_mixed_kernel", "_dq_mixed_kernel"):  # each output head g of each head
            k.reread += (H * gz - 1) * (nb[0] + nb[1])                # group reads every head of q, k
        elif name in ("_stats_kernel", "_flash_range_kernel", "_attn_range_kernel") or \
                (name == "_attn_kernel" and c["NORM"]):
            k.reread += (gz - 1) * (nb[0] + nb[1])  # each group of G output heads reads every head of q, k
        k.reuse_set = sum(nb[i] for i in again) / B
        k.sharers = gx * gz
    elif name in ("_pa_fwd_kernel", "_pa_bwd_kernel"):
        elems = grid * c["BC"] * c["BH"] * c["BW"]
        k.fp32, k.sfu = (20.0 * elems, 2.0 * elems) if name == "_pa_fwd_kernel" else (237.0 * elems, 18.0 * elems)
        k.note = "3x3 halo re-reads from L1/L2 not counted"
    elif name == "_row_terms_kernel":
        k.fp32 = 2.0 * grid * c["BN"] * c["BD"]
    elif name == "_split_sum_kernel":  # one add per partial read (dk's and dv's)
        k.fp32 = (nb[0] + nb[1]) / a[0].element_size()
    elif name == "_flash_merge_kernel":  # per row and key range ~16 FLOPs and 2 exponentials, for rstd
        # over every row of its (b, g) in each program (the statistics re-read from L2, not charged
        # as HBM bytes), then again for its own rows with the output's rescale and sum (4 per element)
        ranges = nb[0] / a[0].element_size() / 3  # rows x ranges of the whole call
        own = nb[1] / a[1].element_size()
        k.fp32, k.sfu = 16.0 * ranges * (gx + 1) + 4.0 * own, 2.0 * ranges * (gx + 1)
    elif name == "_key_split_row_terms_kernel":  # one add per partial read, a multiply-add per dO element
        k.fp32 = nb[0] / a[0].element_size() + 2.0 * a[1].numel()
    else:  # _vbar_kernel, _rowsum_kernel: one add per element read
        k.fp32 = nb[0] / a[0].element_size()
    return k


# ----------------------------------------------------------------------------- CUDA
CUDA_T = {"bf16": "c10::BFloat16", "fp16": "c10::Half", "fp32": "float"}
TILE, THREADS, PA_THREADS = 32, 128, 256
MMA_ROWS = 64  # query rows per block of csrc/cuda/emsa_mma.cuh
def cuda_unsupported(shape) -> str | None:
    """The cuda backend's own declared limits (rest_kernels/backends/base.py), on meta tensors."""
    if shape.op != "emsa":
        return None
    from rest_kernels.backends.registry import BACKENDS
    cuda = BACKENDS["cuda"]
    q = torch.empty(shape.B, shape.heads, shape.N, shape.d, device="meta")
    k = torch.empty(shape.B, shape.heads, shape.M, shape.d, device="meta")
    w = torch.empty(shape.heads, shape.heads, device="meta") if shape.mix else None
    # device and dtype are the benchmark's choice, not the shape's: only the shape limits count here
    reasons = [r for r in cuda.emsa_not_supported_reasons(q, k, k, w)
               if not r.startswith((f"{cuda.name} serves", f"{cuda.name} supports dtypes"))]
    return "; ".join(reasons) or None


def _fill(name: str, nbytes: float) -> Kernel:
    return Kernel(f"aten.{name}", float(nbytes), note="torch op of the host code")


def cuda_kernels(shape, dtype: str, backward: bool) -> list[Kernel]:
    """The launches of the cuda backend for one call (forward, then the backward), transcribed from
    the host code of csrc/cuda/emsa_kernels.cuh (emsa_fwd, emsa_bwd) and pa_kernels.cuh."""
    if shape.op == "pa":
        return _cuda_pa(shape, dtype, backward)
    return _cuda_emsa(shape, dtype, backward)


def cuda_bwd_key_splits(key_blocks: int, tiles: int) -> int:
    """csrc/cuda/emsa_mma.cuh bwd_key_splits: shares of the dk / dv kernel's query walk per key block."""
    if key_blocks >= 256:
        return 1
    return max(1, min(-(-256 // key_blocks), -(-tiles // 4)))


def _cuda_emsa(s, dtype, backward):
    B, h, N, M, d, mix = s.B, s.heads, s.N, s.M, s.d, s.mix
    es, T, f32 = (4 if dtype == "fp32" else 2), CUDA_T[dtype], dtype == "fp32"
    DP = 64 if d <= 64 else 128
    BH, nT, nMt, E = B * h, math.ceil(N / TILE), math.ceil(M / TILE), TILE * TILE  # SIMT 32 x 32 tiles
    q, kv, rows, ws, heads4 = B * h * N * d * es, B * h * M * d * es, BH * N * 4, B * N * h * d * 4, BH * 4
    vbar = BH * d * 4
    lw = h if mix else 1  # logits of output head g: a dot of width lw * d (the mix folded in)

    def K(fam, key, nbytes, grid, threads=THREADS, unit="fp32", **kw):
        return Kernel(fam, float(nbytes), grid=grid, threads=threads, resource_key=key, dot_unit=unit, **kw)

    # The 16-bit forward runs emsa_mma.cuh on tensor cores: 64-row blocks, 32-key tiles, the head dim
    # computed in 16-wide chunks (logits) and 8-wide tiles (P V); the backward's float32 rebuild of O
    # (TO = float) takes P V in two 16-bit halves (twice the P V products). The mix costs lw FMAs per
    # logit on the CUDA cores (in registers). float32 runs the SIMT kernels on 32 x 32 tiles, the mix
    # folded into a dot of width lw * d.
    def fwd_kernel(out_bytes, TO):
        mma = not f32
        rows_b = MMA_ROWS if mma else TILE
        nR, e = math.ceil(N / rows_b), rows_b * TILE
        tiles = nR * BH * nMt
        loads = nMt * lw * q + nR * lw * kv + nR * kv
        pv_halves = 2 if mma and TO != T else 1
        dots = (2.0 * math.ceil(d / 16) * 16 * lw + pv_halves * 2.0 * math.ceil(d / 8) * 8) if mma else (2.0 * d * lw + 2.0 * DP)
        name = "emsa_fwd_mma_kernel" if mma else "emsa_fwd_kernel"
        # MIX reads lse and rstd (P final); plain writes lse
        return K(name, f"{name}<{T}, {TO}, {DP}, {'true' if mix else 'false'}>",
                 q + 2 * kv + out_bytes + rows + (heads4 if mix else 0),
                 nR * BH, unit="tc16" if mma else "fp32", dot_flops=tiles * e * dots,
                 fp32=tiles * e * (6.0 + (2.0 * lw if mma else 0.0) + (2.0 if pv_halves == 2 else 0.0)),
                 sfu=tiles * e * 1.0, reread=loads - q - 2 * kv, reuse_set=2 * kv / B, sharers=nR * h)

    def stats_kernel():
        # online lse and the centred row sums (Chan's merge): writes lse and rsq
        rows_b = TILE if f32 else MMA_ROWS
        nR, e = math.ceil(N / rows_b), rows_b * TILE
        tiles = nR * BH * nMt
        name, key = ("emsa_stats_kernel", f"emsa_stats_kernel<{T}>") if f32 else \
            ("emsa_stats_mma_kernel", f"emsa_stats_mma_kernel<{T}, {DP}>")
        dots = 2.0 * d * h if f32 else 2.0 * math.ceil(d / 16) * 16 * h
        return K(name, key, q + kv + 2 * rows, nR * BH, unit="fp32" if f32 else "tc16",
                 dot_flops=tiles * e * dots, fp32=tiles * e * 8.0, sfu=tiles * e * 1.0,
                 reread=nMt * h * q + nR * h * kv - q - kv, reuse_set=kv / B, sharers=nR * h)

    rstd_k = K("emsa_rstd_kernel", "emsa_rstd_kernel", rows + heads4, BH, fp32=float(B * h * N))
    vbar_k = K("emsa_vbar_kernel", f"emsa_vbar_kernel<{T}>", kv + vbar, BH, fp32=float(B * h * M * d))
    out = [stats_kernel(), rstd_k] if mix else []
    out.append(fwd_kernel(B * N * h * d * es, T))  # out written once, in the output dtype
    if not backward:
        return out
    # emsa_bwd: outputs (zero-filled for SIMT) and scratch, then the launches in order. dW partials: one row per
    # key block of the dk / dv kernel (64 keys on tensor cores, 32 on SIMT)
    nWb = math.ceil(M / (TILE if f32 else MMA_ROWS))
    kt = 16 if mix else 32  # tensor-core backward: rows of the other side per tile
    splits = 1 if f32 else cuda_bwd_key_splits(nWb * BH, math.ceil(N / kt))  # dk / dv walk shares
    if f32:  # the SIMT kernels' outputs are zero-filled; the tensor-core kernels store every element
        out += [_fill("zeros", q), _fill("zeros", kv), _fill("zeros", kv)]  # dq, dk, dv
    if mix:
        out += [_fill("zeros", h * h * 4)]  # dmix
    out += [_fill("zeros", heads4)]  # cg
    if mix:
        out += [_fill("zeros", B * h * nWb * splits * h * 4), vbar_k]  # dw_part: a row per block
    rowdot_grid = math.ceil(N / (THREADS // 32)) * BH
    if mix and not f32:  # O rebuilt in float32 from the saved lse and rstd, then u = dO . O
        out.append(fwd_kernel(ws, "float"))
        out.append(K("emsa_bwd_rowdot_kernel", f"emsa_bwd_rowdot_kernel<{T}, float>", q + ws + rows, rowdot_grid,
                     fp32=2.0 * B * h * N * d))
    else:
        out.append(K("emsa_bwd_rowdot_kernel", f"emsa_bwd_rowdot_kernel<{T}, {T}>", 2 * q + rows, rowdot_grid,
                     fp32=2.0 * B * h * N * d))
    out.append(K("emsa_bwd_rowstat_kernel", "emsa_bwd_rowstat_kernel", rows * (3 if mix else 2) + heads4 * 2, BH,
                 fp32=3.0 * B * h * N))
    g = h if mix else 1  # output heads a tile of input head j goes through
    mx = 1 if mix else 0
    ins = 2 * q + 2 * kv + 2 * rows + (vbar if mix else 0)  # q, dO, k, v, lse, E
    if not f32:
        # emsa_bwd_mma_kernel (tensor cores): 64 own rows x kt-row tiles of the other side (16 with
        # the mix, 32 without). Per tile pair each head of the group (lw heads) has its logits computed
        # once and kept in registers; each output head's mixed logits are formed from them on the CUDA
        # cores (lw FMAs per logit). KEYS walks the query tiles twice: dv (the group's logits, then
        # Y^T dO), then the group's logits, per output head dO V^T, and dS^T Q; !KEYS: the group's
        # logits, per output head dO V^T, then dS K. Head dims padded to 16 (X Y^T) and 8 (tile x Z).
        # Mixed calls with more than 8 heads run the SIMT kernels (not modelled: ResT mixes <= 8).
        d16, d8 = 16 * math.ceil(d / 16), 8 * math.ceil(d / 8)
        nKb, nQt, nQb, nKt, e = math.ceil(M / MMA_ROWS), math.ceil(N / kt), math.ceil(N / MMA_ROWS), math.ceil(M / kt), MMA_ROWS * kt
        tiles_k, tiles_r = nKb * BH * nQt, nQb * BH * nKt
        mixing = 2.0 * lw  # FLOPs per logit and output head: S_g = sum_x f_x L_x
        keys_kernel = f"emsa_bwd_mma_kernel<{T}, {DP}, true, {'true' if mix else 'false'}>"
        rows_kernel = f"emsa_bwd_mma_kernel<{T}, {DP}, false, {'true' if mix else 'false'}>"
        dots_k = e * (2.0 * d16 * lw + 2.0 * d8 + 2.0 * d16 * (lw + g) + 2.0 * d8)
        loads_k = nQt * (2 * lw + g) * kv + nKb * (2 * lw + g + 2) * q
        # few key blocks: the query walk split over `splits` blocks per key block, float32 partials of
        # dk and dv summed by emsa_bwd_split_sum_kernel (one launch each)
        kv32 = B * h * M * d * 4
        grads_out = 2 * kv if splits == 1 else 2 * splits * kv32
        out.append(K("emsa_bwd_mma_kernel", keys_kernel,
                     ins + grads_out + (2 * B * h * nKb * splits * h * 4 if mix else 0), nKb * BH * splits, unit="tc16",
                     dot_flops=tiles_k * dots_k, fp32=tiles_k * e * (12.0 * g + 4.0 + mixing * (g + 1)),
                     sfu=tiles_k * e * (g + 1.0), reread=loads_k - 2 * q - 2 * kv, reuse_set=2 * q / B,
                     sharers=nKb * h))
        if splits > 1:
            out += [K("emsa_bwd_split_sum_kernel", f"emsa_bwd_split_sum_kernel<{T}>", splits * kv32 + kv,
                      math.ceil(B * h * M * d / THREADS), fp32=float(splits * B * h * M * d))] * 2
        dots_r = e * (2.0 * d16 * (lw + g) + 2.0 * d8)
        loads_r = nKt * (lw + g) * q + nQb * (lw + g + 1) * kv
        out.append(K("emsa_bwd_mma_kernel", rows_kernel, ins + q, nQb * BH, unit="tc16",
                     dot_flops=tiles_r * dots_r, fp32=tiles_r * e * (12.0 + mixing) * g, sfu=tiles_r * e * 1.0 * g,
                     reread=loads_r - 2 * q - 2 * kv, reuse_set=2 * kv / B, sharers=nQb * h))
    else:
        tiles = nMt * BH * nT
        # KEYS: per (key tile, query tile): logits of each g (lw q and k tiles), dO_g v_g^T, L_j (mix),
        # Y^T dO (dv) and dL^T q (dk)
        dots_keys = E * (2.0 * d * (g * (lw + 1) + mx) + 2 * 2.0 * DP)
        loads_keys = nMt * (g * lw + mx + 1) * q + nMt * (g + 1) * q + nT * (g * lw + mx) * kv + nT * g * kv
        out.append(K("emsa_bwd_kernel", f"emsa_bwd_kernel<{T}, {DP}, true>",
                     ins + 2 * kv + (2 * B * h * nMt * h * 4 if mix else 0), nMt * BH,
                     dot_flops=tiles * dots_keys, fp32=tiles * E * 12.0 * g, sfu=tiles * E * 1.0 * g,
                     reread=loads_keys - 2 * q - 2 * kv, reuse_set=2 * q / B, sharers=nMt * h))
        # !KEYS: per (query tile, key tile): logits and dO_g v_g^T of each g, then dL k (dq)
        dots_rows = E * (2.0 * d * g * (lw + 1) + 2.0 * DP)
        loads_rows = nMt * g * lw * q + nMt * g * q + nT * (g * lw + 1) * kv + nT * g * kv
        out.append(K("emsa_bwd_kernel", f"emsa_bwd_kernel<{T}, {DP}, false>", ins + q, nT * BH,
                     dot_flops=tiles * dots_rows, fp32=tiles * E * 12.0 * g, sfu=tiles * E * 1.0 * g,
                     reread=loads_rows - 2 * q - 2 * kv, reuse_set=2 * kv / B, sharers=nT * h))
    if mix:
        out.append(K("emsa_dmix_kernel", "emsa_dmix_kernel", B * h * nWb * splits * h * 4 + h * h * 4,
                     math.ceil(h * h / THREADS),
                     fp32=float(B * h * nWb * splits * h)))
    return out


def _cuda_pa(s, dtype, backward):
    B, C, H, W = s.B, s.C, s.H, s.W
    es, T, total = (4 if dtype == "fp32" else 2), CUDA_T[dtype], s.B * s.C * s.H * s.W
    grid = max(1, min(math.ceil(total / PA_THREADS), 65535 * 8))
    # weight.to(float).contiguous(), bias.to(float): copies unless already float32
    params = [] if dtype == "fp32" else [_fill("_to_copy", C * 9 * (es + 4)), _fill("_to_copy", C * (es + 4))]

    def K(fam, nbytes, g, **kw):
        return Kernel(fam, float(nbytes), grid=g, threads=PA_THREADS, resource_key=f"{fam}<{T}>", dot_unit="fp32", **kw)

    out = params + [K("pa_fwd_kernel", 2 * total * es + C * 40, grid, fp32=20.0 * total, sfu=2.0 * total,
                      note="3x3 halo re-reads from L1/L2 not counted")]
    if not backward:
        return out
    out += [_fill("zeros", C * 40)] + params + [
        K("pa_bwd_dz_kernel", total * (2 * es + 8) + C * 40, grid, fp32=24.0 * total, sfu=2.0 * total),
        K("pa_bwd_dx_kernel", total * (8 + es) + C * 36, grid, fp32=19.0 * total,
          note="the 9 taps of dz re-read from L1/L2, not counted"),
        K("pa_bwd_dw_kernel", total * (es + 4) + C * 40, C, fp32=19.0 * total)]
    # dweight = dwb[:, :9].reshape(...).to(dtype) (a view, then a copy unless float32); dbias =
    # dwb[:, 9].to(dtype).contiguous() (one copy either way)
    out += ([] if dtype == "fp32" else [_fill("_to_copy", C * 9 * (4 + es))]) + [_fill("_to_copy", C * (4 + es))]
    return out
