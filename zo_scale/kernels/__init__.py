"""Fused Triton kernels (CUDA); see zo_scale.rng for the specification they reproduce."""


def available() -> bool:
    return False
