"""GPU catalog: memory, bandwidth and dense 16-bit tensor FLOP/s, from the vendors' data sheets.

``memory_bytes`` is the memory the driver reports (nvidia-smi's "Total" in MiB, which is what a process can
address before the CUDA context), not the marketing "GB" figure: an "80 GB" H100 reports 81559 MiB = 79.6 GiB.
Bandwidth is in bytes/s (decimal GB/s as the data sheets give it). FLOP/s are dense (no 2:4 sparsity) BF16/FP16
tensor-core throughput with FP32 accumulation; for Apple GPUs, the FP16/FP32 shader throughput.

Apple M-series memory is unified: Metal lets the GPU wire about 75% of it by default
(``recommendedMaxWorkingSetSize``), which is what ``usable_bytes`` reports for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmq.errors import BadInput

MiB = 1024**2
GiB = 1024**3
GB = 10**9


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    bandwidth: float  # bytes / s
    flops: float  # dense 16-bit FLOP / s
    unified: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def usable_bytes(self) -> int:
        """Memory a GPU process may use: all of it on discrete GPUs, the Metal working-set limit on Apple."""
        return int(self.memory_bytes * 0.75) if self.unified else self.memory_bytes


CATALOG: tuple[GPU, ...] = (
    GPU("A100-40GB", 40960 * MiB, 1555e9, 312e12, aliases=("a100-40", "a100-40g", "a100-sxm4-40gb")),
    GPU("A100-80GB", 81920 * MiB, 2039e9, 312e12, aliases=("a100", "a100-80", "a100-80g", "a100-sxm4-80gb")),
    GPU("H100-80GB", 81559 * MiB, 3.35e12, 989e12, aliases=("h100", "h100-sxm", "h100-80")),
    GPU("H100-PCIe", 81559 * MiB, 2.0e12, 756e12, aliases=("h100-pcie",)),
    GPU("H200", 143771 * MiB, 4.8e12, 989e12, aliases=("h200-141gb", "h200-sxm")),
    GPU("L4", 23034 * MiB, 300e9, 121e12, aliases=("l4-24gb",)),
    GPU("L40S", 46068 * MiB, 864e9, 362e12, aliases=("l40s-48gb",)),
    GPU("RTX-3090", 24576 * MiB, 936e9, 71e12, aliases=("3090", "rtx3090")),
    GPU("RTX-4090", 24564 * MiB, 1008e9, 165e12, aliases=("4090", "rtx4090")),
    GPU("RTX-5090", 32607 * MiB, 1792e9, 209.5e12, aliases=("5090", "rtx5090")),
    GPU("M1-Max-64GB", 64 * GiB, 400e9, 10.4e12, unified=True, aliases=("m1-max",)),
    GPU("M2-Ultra-192GB", 192 * GiB, 800e9, 27.2e12, unified=True, aliases=("m2-ultra",)),
    GPU("M3-Max-128GB", 128 * GiB, 400e9, 16.4e12, unified=True, aliases=("m3-max",)),
    GPU("M4-Max-128GB", 128 * GiB, 546e9, 18.4e12, unified=True, aliases=("m4-max",)),
    GPU("M3-Ultra-512GB", 512 * GiB, 819e9, 28.4e12, unified=True, aliases=("m3-ultra",)),
)


def _key(s: str) -> str:
    return s.lower().replace("_", "-").replace(" ", "-").removeprefix("nvidia-").removeprefix("apple-")


def get_gpu(name: str) -> GPU:
    want = _key(name)
    for gpu in CATALOG:
        if want == _key(gpu.name) or want in gpu.aliases:
            return gpu
    raise BadInput(f"unknown GPU {name!r}; known: {', '.join(g.name for g in CATALOG)} (or pass --vram GiB)")


def custom_gpu(vram_gib: float) -> GPU:
    """A GPU known only by its memory (--vram); bandwidth and FLOP/s unknown (0 disables those solvers)."""
    if vram_gib <= 0:
        raise BadInput("--vram must be positive (GiB)")
    return GPU(f"{vram_gib:g} GiB", int(vram_gib * GiB), 0.0, 0.0)
