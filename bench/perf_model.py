"""A static performance model: what each kernel moves and computes, turned into a modelled time on
an A100, an H100 and an H200. A MODEL, not a measurement (bench/emsa_bench.py measures).

Why here (bench/, not rest_kernels/): it is benchmarking tooling, read side by side with what the
benchmark measures (scripts/perf_model.py joins the two), and the installed package has no use for
it. This module holds the model proper, one job: GPU specs and efficiency assumptions as data, the
occupancy of a kernel from its compiled registers and shared memory, and a kernel's time. What the
kernels of each implementation move and compute comes from bench/_perf_fused.py (the Triton and
CUDA backends) and bench/_perf_aten.py (eager PyTorch and torch.compile of the reference); the
resource rows and measurements are read by bench/_perf_inputs.py.

The formulas (docs/performance_model.md has them with the assumptions and the printed table):

  time(kernel, gpu) = wave_factor * max(bytes / (BW * eta_mem),
                                        tc16 / (TC16 * eta_tc) + tf32 / (TF32 * eta_tc),
                                        fp32 / (FP32 * eta_fp32),
                                        sfu / (SFU * eta_sfu))
                      + launches * t_launch
  time(implementation) = sum over its kernels

bytes are HBM bytes: each tensor a kernel reads or writes counts once; re-reads of a tensor by other
blocks of the same kernel (k and v by every query block, ...) are assumed to hit L2 while the data
re-read per batch element fits in half the L2, or while all the blocks that re-read it run in one
wave (they start together and walk it in the same order); otherwise they count as HBM bytes. The
same efficiencies apply to all three implementations (fused, eager, compiled).
"""
from __future__ import annotations

import dataclasses
import math

# ----------------------------------------------------------------------------- GPUs
#: boost clocks (MHz) used for the SFU rate: 16 MUFU results per SM per clock on sm_80 and sm_90
#: (CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table: exp2, rsqrt, rcp ...)
SFU_PER_SM_PER_CLOCK = 16


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    arch: int                 # compute capability * 10: the resource rows and limits of this arch
    sms: int
    hbm: float                # bytes/s
    tc16: float               # dense bf16 / fp16 tensor-core FLOP/s
    tf32: float               # dense TF32 tensor-core FLOP/s
    fp32: float               # non-tensor fp32 FLOP/s (an FMA is 2)
    boost_mhz: float
    l2: int                   # bytes
    source: str

    @property
    def sfu(self) -> float:
        """MUFU operations per second (exp2, rcp, rsqrt ...)."""
        return SFU_PER_SM_PER_CLOCK * self.sms * self.boost_mhz * 1e6


GPUS = (
    GPU("A100", 80, 108, 2.039e12, 312e12, 156e12, 19.5e12, 1410, 40 * 2 ** 20,
        "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM: 2,039 GB/s HBM2e, BF16 312 TFLOPS and "
        "TF32 156 TFLOPS dense, FP32 19.5 TFLOPS; 108 SMs, 1410 MHz boost, 40 MB L2 (A100 architecture "
        "whitepaper)"),
    GPU("H100", 90, 132, 3.35e12, 989.4e12, 494.7e12, 66.9e12, 1980, 50 * 2 ** 20,
        "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: 3.35 TB/s HBM3, BF16 1,979 and TF32 989 TFLOPS "
        "with sparsity (half dense), FP32 67 TFLOPS; 132 SMs, 1980 MHz boost, 50 MB L2 (H100 "
        "architecture whitepaper)"),
    GPU("H200", 90, 132, 4.8e12, 989.4e12, 494.7e12, 66.9e12, 1980, 50 * 2 ** 20,
        "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: 4.8 TB/s HBM3e, compute as H100 SXM "
        "(BF16 1,979 / TF32 989 TFLOPS with sparsity, FP32 67 TFLOPS), 132 SMs"),
)
GPU_BY_NAME = {g.name: g for g in GPUS}


# ----------------------------------------------------------------------------- assumptions
@dataclasses.dataclass(frozen=True)
class Assumptions:
    """Efficiencies applied to every kernel of every implementation (fused, eager, compiled)."""
    #: achieved fraction of HBM bandwidth: this workplace's H200 copied device to device at ~4.3 TB/s
    #: of its 4.8 TB/s (0.90); taken for every GPU
    eta_mem: float = 0.9
    #: achieved fraction of dense tensor-core peak: the same H200 ran a bf16 8192^3 matmul at
    #: ~788 of 989 TFLOP/s (0.80); taken for every GPU, every tile shape and for TF32
    eta_tc: float = 0.8
    #: achieved fraction of the fp32 (CUDA core) peak: ASSUMED, not measured (docs/cuda_design.md
    #: expects 50-70% for a shared-memory-fed FMA loop; 0.7 leans to the optimistic end)
    eta_fp32: float = 0.7
    #: achieved fraction of the SFU (exp, rcp, rsqrt) rate: ASSUMED, as eta_fp32
    eta_sfu: float = 0.7
    #: fixed cost per kernel launch, seconds: ASSUMED (GPU-side launch gap, ramp-up and tail of a
    #: short kernel); host-side Python / dispatcher time is not modelled
    launch_s: float = 4e-6
    #: re-reads by other blocks hit L2 while the re-read data per batch element is at most this
    #: fraction of the L2
    l2_fraction: float = 0.5

    def lines(self) -> list[str]:
        return [
            f"eta_mem {self.eta_mem:.2f} of HBM bandwidth (this workplace's H200: ~4.3 of 4.8 TB/s "
            "device-to-device copy)",
            f"eta_tc {self.eta_tc:.2f} of dense tensor-core peak, bf16/fp16 and TF32 (this workplace's H200: "
            "~788 of 989 TFLOP/s, bf16 8192^3 matmul)",
            f"eta_fp32 {self.eta_fp32:.2f} of the fp32 CUDA-core peak, eta_sfu {self.eta_sfu:.2f} of the SFU rate "
            f"({SFU_PER_SM_PER_CLOCK}/SM/clock): assumed, not measured",
            f"{self.launch_s * 1e6:.0f} us per kernel launch: assumed (host-side Python/dispatcher time not modelled)",
            f"re-reads by other blocks hit L2 while the per-batch-element re-read set is <= "
            f"{self.l2_fraction:.0%} of L2, or while the blocks re-reading it run in one wave",
            "the same for every implementation: fused (triton, cuda), eager PyTorch and torch.compile",
        ]


DEFAULT = Assumptions()


# ----------------------------------------------------------------------------- kernels
@dataclasses.dataclass
class Kernel:
    """What one kernel (or a few identical launches) moves and computes."""
    name: str
    bytes: float                  # HBM bytes, each tensor once
    dot_flops: float = 0.0        # matrix-product FLOPs, on the unit `dot_unit`
    dot_unit: str = "fp32"        # "tc16" (bf16/fp16 tensor cores), "tf32", or "fp32" (CUDA cores)
    fp32: float = 0.0             # other FLOPs, CUDA cores
    sfu: float = 0.0              # exp / rcp / rsqrt on the SFU
    launches: int = 1
    grid: int | None = None       # blocks (None: unknown, a library kernel)
    threads: int | None = None    # threads per block
    resource_key: str | None = None  # how the resource rows name it (without the arch)
    reread: float = 0.0           # bytes re-read by other blocks (L2 hits while they fit)
    reuse_set: float = 0.0        # bytes re-read per batch element
    sharers: int = 0              # blocks that re-read the same data (those of one batch element)
    note: str = ""

    def flops(self, unit: str) -> float:
        own = {"fp32": self.fp32}.get(unit, 0.0)
        return own + (self.dot_flops if self.dot_unit == unit else 0.0)


@dataclasses.dataclass(frozen=True)
class Resources:
    """Compiled resources of one kernel on one arch (Triton rows or cuobjdump of the extension)."""
    registers: int
    shared: int                   # bytes per block (static + dynamic as launched)
    threads: int | None = None    # per block (Triton: num_warps * 32)
    spill_bytes: int = 0          # ptxas spill stores + loads (bytes of spill code), or local memory
    hmma: int | None = None       # tensor-core instructions in the SASS (None: not counted)
    hgmma: int | None = None


@dataclasses.dataclass(frozen=True)
class ArchLimitsLite:
    regs_per_sm: int
    shared_per_sm: int
    max_threads_per_sm: int
    max_blocks_per_sm: int


def arch_limits(arch: int) -> ArchLimitsLite:
    from rest_kernels.triton.targets import arch_limits as limits
    lim = limits(arch)
    return ArchLimitsLite(lim.regs_per_sm, lim.shared_per_sm, lim.max_threads_per_sm, lim.max_blocks_per_sm)


# ----------------------------------------------------------------------------- occupancy
#: registers are allocated per warp in units of 256 (CUDA occupancy calculator, sm_80 and sm_90:
#: "register allocation unit size 256, granularity warp"): regs/thread * 32 rounded up to 256
REG_ALLOC_UNIT = 256
#: shared memory is allocated in units of 128 bytes, plus 1 KiB per block reserved by the system
#: (sm_80 and later; CUDA occupancy calculator, "shared memory per block reserved by system")
SHARED_ALLOC_UNIT = 128
SHARED_RESERVED = 1024


@dataclasses.dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    limiter: str                  # "registers", "shared", "threads", "blocks"
    warps_per_sm: int
    by: dict                      # blocks per SM allowed by each limit


def occupancy(res: Resources, threads: int, limits: ArchLimitsLite) -> Occupancy:
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(res.registers * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    smem = math.ceil((res.shared + SHARED_RESERVED) / SHARED_ALLOC_UNIT) * SHARED_ALLOC_UNIT
    by = {"registers": limits.regs_per_sm // (regs_per_warp * warps) if regs_per_warp else limits.max_blocks_per_sm,
          "shared": limits.shared_per_sm // smem,
          "threads": limits.max_threads_per_sm // (warps * 32),
          "blocks": limits.max_blocks_per_sm}
    limiter = min(by, key=lambda k: by[k])
    return Occupancy(by[limiter], limiter, by[limiter] * warps, by)


def waves(grid: int, blocks_per_sm: int, sms: int) -> int:
    return math.ceil(grid / (sms * blocks_per_sm))


def wave_factor(grid: int, blocks_per_sm: int, sms: int) -> float:
    """Time of a grid relative to the same work spread perfectly over the GPU (>= 1).

    Blocks run in waves of S = SMs x blocks/SM (NVIDIA's "wave quantization"). Each SM delivers
    1/SMs of the GPU's throughput whenever it holds a block, shared equally by its resident blocks.
    Full waves run at full throughput; the blocks of the last, partial wave are spread over the SMs
    (at most ceil(rest / SMs) per SM), so it lasts ceil(rest / SMs) / (blocks/SM) of a full wave.
    Occupancy enters through S: fewer blocks per SM, finer waves. Latency hiding at low occupancy
    is NOT modelled (the table shows warps per SM so a reader can judge it)."""
    slots = sms * blocks_per_sm
    full, rest = divmod(grid, slots)
    eff_waves = full + (math.ceil(rest / sms) / blocks_per_sm if rest else 0.0)
    return eff_waves * slots / grid


# ----------------------------------------------------------------------------- time
TERMS = ("mem", "tc", "fp32", "sfu")


@dataclasses.dataclass
class KernelTime:
    seconds: float                # including launch overhead
    busy: float                   # max of the terms times the wave factor
    terms: dict                   # seconds per term, before the wave factor
    bound: str                    # the largest term
    factor: float                 # wave factor (1.0 when the occupancy is unknown)
    occupancy: Occupancy | None
    waves: int | None
    dot_unit: str                 # the unit the dots were charged to
    hbm_bytes: float              # bytes charged to HBM on this GPU (re-reads included when over L2)
    why_no_occupancy: str | None = None


def dot_unit_for(kernel: Kernel, res: Resources | None) -> tuple[str, str | None]:
    """The unit the dots run on: the kernel's own claim, unless the SASS counted no tensor-core
    instruction (then CUDA cores, with the reason)."""
    if kernel.dot_unit in ("tc16", "tf32") and kernel.dot_flops and res is not None \
            and res.hmma is not None and (res.hmma or 0) + (res.hgmma or 0) == 0:
        return "fp32", "no HMMA/HGMMA in its SASS: the dots run on CUDA cores"
    return kernel.dot_unit, None


def kernel_time(kernel: Kernel, gpu: GPU, res: Resources | None, why_missing: str | None = None,
                a: Assumptions = DEFAULT) -> KernelTime:
    unit, _ = dot_unit_for(kernel, res)
    occ, nwaves, factor, why = None, None, 1.0, why_missing
    if kernel.grid is not None and res is not None:
        threads = res.threads or kernel.threads
        if threads:
            occ = occupancy(res, threads, arch_limits(gpu.arch))
            if occ.blocks_per_sm == 0:
                why, occ = "does not fit on an SM", None
            else:
                nwaves = waves(kernel.grid, occ.blocks_per_sm, gpu.sms)
                factor = wave_factor(kernel.grid, occ.blocks_per_sm, gpu.sms)
    elif kernel.grid is None and why is None:
        why = "library kernel: grid and resources unknown (wave factor 1)"
    over_l2 = kernel.reread > 0 and kernel.reuse_set > a.l2_fraction * gpu.l2
    if over_l2 and occ is not None and kernel.sharers <= gpu.sms * occ.blocks_per_sm:
        over_l2 = False  # the blocks re-reading it are co-resident and walk it together
    hbm = kernel.bytes + (kernel.reread if over_l2 else 0.0)
    dots = {"tc16": 0.0, "tf32": 0.0, "fp32": 0.0}
    dots[unit] = kernel.dot_flops
    terms = {"mem": hbm / (gpu.hbm * a.eta_mem),
             "tc": dots["tc16"] / (gpu.tc16 * a.eta_tc) + dots["tf32"] / (gpu.tf32 * a.eta_tc),
             "fp32": (kernel.fp32 + dots["fp32"]) / (gpu.fp32 * a.eta_fp32),
             "sfu": kernel.sfu / (gpu.sfu * a.eta_sfu)}
    bound = max(TERMS, key=lambda t: terms[t])
    busy = terms[bound] * factor
    return KernelTime(busy + kernel.launches * a.launch_s, busy, terms, bound, factor, occ, nwaves, unit, hbm, why)


@dataclasses.dataclass
class Totals:
    launches: int
    bytes: float                  # HBM bytes (L2 re-reads not included)
    tc_flops: float               # tensor-core FLOPs (bf16/fp16 and TF32) as the kernels claim them
    fp32_flops: float             # CUDA-core FLOPs
    sfu: float
    seconds: dict                 # GPU name -> modelled seconds
    bound: dict                   # GPU name -> the term with the largest share of the time ("launch" included)


def totals(kernels: list[Kernel], times: dict) -> Totals:
    """times: GPU name -> [KernelTime per kernel]."""
    seconds, bound = {}, {}
    for g, kts in times.items():
        seconds[g] = sum(kt.seconds for kt in kts)
        share = dict.fromkeys(TERMS + ("launch",), 0.0)
        for k, kt in zip(kernels, kts):
            share[kt.bound] += kt.busy
            share["launch"] += kt.seconds - kt.busy
        bound[g] = max(share, key=lambda t: share[t])
    tc = sum(k.dot_flops for k in kernels if k.dot_unit in ("tc16", "tf32"))
    fp = sum(k.fp32 + (k.dot_flops if k.dot_unit == "fp32" else 0.0) for k in kernels)
    return Totals(sum(k.launches for k in kernels), sum(k.bytes for k in kernels), tc, fp,
                  sum(k.sfu for k in kernels), seconds, bound)
