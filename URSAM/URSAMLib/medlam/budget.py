"""How many scans a MedLAM training step takes when ``--batch-size`` is not given: the one home of that rule.

The rule: the largest batch up to :data:`MAX_BATCH` (MedLSAM's 16 scans)
whose estimated training memory fits in :data:`MEMORY_SHARE` of the device's
free memory (CUDA: free GPU memory; CPU: available RAM), and at least 1.
An example's estimate is ``TRAIN_FACTOR`` times the activations of a forward
pass of each of its 2 x ``patches_per_scan`` patches (kept for the backward
pass, their gradients, the allocator's slack), plus the sampler's tensors.
No torch here, so the command line can show the rule without loading it.
"""
from __future__ import annotations

from pathlib import Path

#: MedLSAM's batch: 16 scans of 2 patches each
MAX_BATCH = 16
#: share of the free memory a step may plan on (the rest: other tensors, fragmentation)
MEMORY_SHARE = 0.7
#: training memory per byte of forward activations
TRAIN_FACTOR = 3.0
#: float32 tensors of S^3 voxels the sampler keeps per patch: ori, aug, 3 coordinates, 3 grid, noise
SAMPLER_VOLUMES = 9

RULE = (f"the largest up to {MAX_BATCH} whose estimated memory (forward activations x {TRAIN_FACTOR:g}, plus "
        f"the sampler's patches) fits in {int(MEMORY_SHARE * 100)}% of the free memory: GPU memory on CUDA, "
        "available RAM on the CPU")


def example_bytes(activation_bytes, patches_per_scan, patch_size):
    """Estimated training bytes of one example (scan): its ori and aug patches through the network and sampler."""
    patches = 2 * patches_per_scan
    sampler = patches_per_scan * SAMPLER_VOLUMES * patch_size ** 3 * 4
    return int(patches * activation_bytes * TRAIN_FACTOR + sampler)


def fit_batch_size(per_example_bytes, free_bytes):
    """The batch size of the rule (module doc) for these byte counts."""
    if per_example_bytes <= 0:
        return MAX_BATCH
    return int(max(1, min(MAX_BATCH, (MEMORY_SHARE * free_bytes) // per_example_bytes)))


def available_ram_bytes():
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
