"""Residual add fused into RMSNorm / LayerNorm: s = x + residual (the new residual stream, in x's dtype) and
y = norm(s) in one kernel that reads x and residual once and writes s, y and the per-row statistics; the
backward takes dy and ds together and writes dx = dresidual = ds + dnorm(dy) with the weight (and bias)
gradients from norms.py's partial sums. The kernels are norms.py's, with HAS_RESIDUAL / HAS_DS set.

x and residual must have the same shape and dtype here (one stream dtype for s and both gradients); anything
else raises Unsupported, which "auto" turns into the reference (which broadcasts and promotes).
"""
import torch

from ._common import rows_2d
from .dispatch import Unsupported
from .norms import check_norm, norm_backward, norm_forward


class AddNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms):
        y, s, mean, rstd = norm_forward(rows_2d(x), weight, bias, eps, is_rms, residual2=rows_2d(residual))
        ctx.save_for_backward(s, weight, bias, mean, rstd)
        ctx.is_rms = is_rms
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a buffer of zeros
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds):
        s2, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the residual stream was used: the sum passes its gradient to both addends
            return ds, ds, None, None, None, None
        dx, dw, db = norm_backward(s2, weight, bias, mean, rstd, rows_2d(dy), ctx.is_rms,
                                   ds2=rows_2d(ds) if ds is not None else None)
        dx = dx.view(dy.shape)
        # One tensor for both addends, as autograd's own add (AddBackward) returns: the engine copies before it
        # accumulates into a gradient that is referenced twice.
        return dx, dx, dw, db, None, None


def _check(op, x, residual, weight, bias):
    check_norm(op, x, weight, bias)
    same = torch.is_tensor(residual) and (residual.shape, residual.dtype, residual.device) == (
        x.shape, x.dtype, x.device)
    if not same:
        got = (f"{tuple(residual.shape)} {residual.dtype} on {residual.device}" if torch.is_tensor(residual)
               else type(residual).__name__)
        raise Unsupported(f"{op}: residual {got} differs from x {tuple(x.shape)} {x.dtype} on {x.device}; the "
                          "Triton kernel takes a residual of x's shape, dtype and device")


def _param(p):
    return p.contiguous() if p is not None else None


def add_rms_norm(x, residual, weight, eps=1e-5):
    _check("add_rms_norm", x, residual, weight, None)
    return AddNormFunction.apply(x, residual, _param(weight), None, float(eps), True)


def add_layer_norm(x, residual, weight, bias, eps=1e-5):
    _check("add_layer_norm", x, residual, weight, bias)
    return AddNormFunction.apply(x, residual, _param(weight), _param(bias), float(eps), False)
