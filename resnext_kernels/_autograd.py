"""Autograd of the fused ops, shared by the kernel backends. Each backend declares the same ops (for
the convolution: training forward, folded forward, plain convolution, backward; for the standalone
BatchNorm + ReLU: training forward, folded forward, backward) and differs only in the kernels behind
them. A gradient of a gradient is refused with NotImplementedError, never silently wrong."""

import torch


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("resnext_kernels: double backward (the gradient of a gradient) is not supported")


def register(train_op, folded_op, grouped_conv, backward_op):
    """Registers autograd for ``train_op`` (x, weight, bn_weight, bn_bias, eps, stride, dilation,
    groups) -> (z, y, stats) and ``folded_op`` (x, weight, scale, shift, stride, dilation, groups) -> z,
    both differentiated by ``backward_op``; ops given as OpOverloads or custom-op objects."""

    def train_setup(ctx, inputs, output):
        x, weight, bn_weight, bn_bias, eps, stride, dilation, groups = inputs
        _, y, stats = output
        ctx.mark_non_differentiable(y, stats)
        ctx.save_for_backward(x, weight, y, stats)
        ctx.args = (eps, stride, dilation, groups)
        ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (bn_weight, bn_bias))

    def train_backward(ctx, dz, _dy, _dstats):
        x, weight, y, stats = ctx.saved_tensors
        eps, stride, dilation, groups = ctx.args
        need = ctx.needs_input_grad
        dx, dw, dparams = backward_op(dz, x, weight, y, stats[2], stats[3], stats[0], stats[1], eps, stride, dilation,
                                      groups, need[0], need[1], need[2] or need[3])
        dgamma = dparams[0].to(ctx.param_dtypes[0]) if need[2] else None
        dbeta = dparams[1].to(ctx.param_dtypes[1]) if need[3] else None
        return dx if need[0] else None, dw if need[1] else None, dgamma, dbeta, None, None, None, None

    def folded_setup(ctx, inputs, output):
        x, weight, scale, shift, stride, dilation, groups = inputs
        ctx.save_for_backward(x, weight, scale, shift)
        ctx.args = (stride, dilation, groups)

    def folded_backward(ctx, dz):
        x, weight, scale, shift = ctx.saved_tensors
        stride, dilation, groups = ctx.args
        need = ctx.needs_input_grad
        # The fused inference forward keeps no y: recomputing it costs one read of x and one write of y.
        y = grouped_conv(x, weight, stride, dilation, groups)
        dx, dw, dparams = backward_op(dz, x, weight, y, scale, shift, None, None, 0.0, stride, dilation, groups,
                                      need[0], need[1], need[2] or need[3])
        return (dx if need[0] else None, dw if need[1] else None,
                dparams[0].to(scale.dtype) if need[2] else None, dparams[1].to(shift.dtype) if need[3] else None,
                None, None, None)

    torch.library.register_autograd(train_op, train_backward, setup_context=train_setup)
    torch.library.register_autograd(folded_op, folded_backward, setup_context=folded_setup)
    torch.library.register_autograd(backward_op, _no_double_backward, setup_context=lambda ctx, inputs, output: None)


def register_batch_norm_relu(train_op, folded_op, backward_op):
    """Registers autograd for the standalone ``train_op`` (x, residual, bn_weight, bn_bias, eps) ->
    (z, stats) and ``folded_op`` (x, residual, scale, shift) -> z, both differentiated by
    ``backward_op``. Without a residual the kernels recompute the ReLU mask from x. With one the mask
    needs z (it depends on the residual too), and g = dz * 1[not z <= 0] is also the residual's gradient:
    where the kernels' reductions run (training, or dparams wanted) they test z and write g while
    summing; otherwise (folded, no dparams: no reductions) torch's threshold_backward masks dz first
    (as torch.relu's backward, a NaN z passes its gradient) and the kernels take g unmasked."""

    def backward(ctx, dz, x, scale, shift, mean, var, eps):
        """(dx, g, dparams), each empty or None where not wanted."""
        need = ctx.needs_input_grad
        need_dx, need_dparams = need[0], need[2] or need[3]
        if not ctx.has_residual:
            dx, dparams, _ = backward_op(dz, x, None, scale, shift, mean, var, eps, True, need_dx, need_dparams)
            return dx, None, dparams
        z = ctx.saved_tensors[-1]
        if not (need_dx or need_dparams):  # the residual's gradient alone: no kernel to run
            return None, torch.ops.aten.threshold_backward(dz, z, 0), None
        if mean is not None or need_dparams:
            dx, dparams, g = backward_op(dz, x, z, scale, shift, mean, var, eps, True, need_dx, need_dparams)
            return dx, g, dparams
        g = torch.ops.aten.threshold_backward(dz, z, 0)
        dx, dparams, _ = backward_op(g, x, None, scale, shift, mean, var, eps, False, need_dx, need_dparams)
        return dx, g, dparams

    def train_setup(ctx, inputs, output):
        x, residual, bn_weight, bn_bias, eps = inputs
        z, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, stats, *((z,) if ctx.has_residual else ()))
        ctx.eps = eps
        ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (bn_weight, bn_bias))

    def train_backward(ctx, dz, _dstats):
        x, stats = ctx.saved_tensors[:2]
        need = ctx.needs_input_grad
        dx, g, dparams = backward(ctx, dz, x, stats[2], stats[3], stats[0], stats[1], ctx.eps)
        dgamma = dparams[0].to(ctx.param_dtypes[0]) if need[2] else None
        dbeta = dparams[1].to(ctx.param_dtypes[1]) if need[3] else None
        return dx if need[0] else None, g if need[1] else None, dgamma, dbeta, None

    def folded_setup(ctx, inputs, output):
        x, residual, scale, shift = inputs
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, scale, shift, *((output,) if ctx.has_residual else ()))

    def folded_backward(ctx, dz):
        x, scale, shift = ctx.saved_tensors[:3]
        need = ctx.needs_input_grad
        dx, g, dparams = backward(ctx, dz, x, scale, shift, None, None, 0.0)
        return (dx if need[0] else None, g if need[1] else None,
                dparams[0].to(scale.dtype) if need[2] else None, dparams[1].to(shift.dtype) if need[3] else None)

    torch.library.register_autograd(train_op, train_backward, setup_context=train_setup)
    torch.library.register_autograd(folded_op, folded_backward, setup_context=folded_setup)
    torch.library.register_autograd(backward_op, _no_double_backward, setup_context=lambda ctx, inputs, output: None)
