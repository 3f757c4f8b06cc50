"""The Triton kernels of the CUDA path, by subject: attention (decode attention over the KV cache), norm_rope
(RMSNorm, silu * up, q/k norm + RoPE + cache store, RoPE tables), skinny (GEMMs of a few rows), gdn (the Gated
DeltaNet layers' decode, verify and rollback), flow (a batch-1 decode token's every layer in one launch, in Gluon);
launch (programmatic dependent launch, the device's shared memory a program may take) and settings (the switches,
the per-device launch tables, the decode-attention tile that fits).

Only settings is imported here: the kernel modules need Triton, and are imported when a CUDA tensor needs them.
"""

from blockspec.kernels.settings import KernelSettings, current_settings, device_tables, use_settings

__all__ = ["KernelSettings", "current_settings", "device_tables", "use_settings"]
