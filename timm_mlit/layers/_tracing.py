"""Whether a graph is being compiled, exported or traced: the layers then take their fixed-shape paths (the sparse
ones read counts back to the host and have data-dependent shapes, which none of these can follow)."""
import torch

__all__ = ['is_fx_symbolic_tracing', 'is_tracing']


def is_fx_symbolic_tracing() -> bool:
    fx = torch.fx._symbolic_trace
    check = getattr(fx, 'is_fx_symbolic_tracing', None) or fx.is_fx_tracing  # the first is torch >= 2.6
    return check()


def is_tracing() -> bool:
    """torch.compile, torch.jit.trace, ONNX export or torch.fx symbolic tracing is running."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
        or is_fx_symbolic_tracing()
