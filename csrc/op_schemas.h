// Every op schema of the extension, declared once. The nvcc build defines them in the namespace
// resnext_kernels, the host test build in resnext_kernels_emulated, so both can be loaded at once.
#pragma once

#include <torch/library.h>

namespace resnext_kernels {

inline void define_ops(torch::Library& m) {
  // relu(conv2d(x, weight, stride, padding = dilation, dilation, groups) * scale + shift); the output
  // keeps x's memory format.
  m.def("conv_bn_relu_folded(Tensor x, Tensor weight, Tensor scale, Tensor shift, int stride, int dilation, "
        "int groups) -> Tensor");
  // conv2d(x, weight, stride, padding = dilation, dilation, groups) alone, in x's dtype and memory
  // format (the folded backward recomputes y with it). No autograd.
  m.def("grouped_conv(Tensor x, Tensor weight, int stride, int dilation, int groups) -> Tensor");
  // Training forward with batch statistics: (z, y, stats), z = relu(y * scale + shift), y the
  // convolution (kept for backward), stats (4, C_out) rows mean, biased var, scale, shift in the
  // accumulation dtype (fp32; fp64 for fp64 x). Functional: the caller updates running stats.
  m.def("conv_bn_relu_train(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, float eps, int stride, "
        "int dilation, int groups) -> (Tensor, Tensor, Tensor)");
  // Backward of z = relu(y * scale + shift), y = conv2d(x, weight): (dx, dw, dparams). With mean and
  // var (training; scale, shift from conv_bn_relu_train's stats) dparams = (d bn_weight, d bn_bias);
  // without (folded) dparams = (d scale, d shift). dparams (2, C_out) in the accumulation dtype; dx
  // (x's memory format), dw and dparams are empty (0,) when not needed (folded, the reductions are
  // then skipped: dgrad and wgrad do not need them). grad_output may have any strides.
  m.def("conv_bn_relu_backward(Tensor grad_output, Tensor x, Tensor weight, Tensor y, Tensor scale, Tensor shift, "
        "Tensor? mean, Tensor? var, float eps, int stride, int dilation, int groups, bool need_dx, bool need_dw, "
        "bool need_dparams) -> (Tensor, Tensor, Tensor)");
  // The standalone BatchNorm + ReLU, z = relu(batch_norm(x) [+ residual]), z in x's memory format.
  // Training: (z, stats) with stats as conv_bn_relu_train's.
  m.def("batch_norm_relu_train(Tensor x, Tensor? residual, Tensor? bn_weight, Tensor? bn_bias, float eps) "
        "-> (Tensor, Tensor)");
  // Inference: relu(x * scale + shift [+ residual]).
  m.def("batch_norm_relu_folded(Tensor x, Tensor? residual, Tensor scale, Tensor shift) -> Tensor");
  // Backward: (dx, dparams, g), dx and dparams as conv_bn_relu_backward's. relu_mask: grad_output is
  // z's gradient, masked where z <= 0 as torch.relu's backward does: z recomputed from x and rounded to
  // x's dtype (no residual) or, given the op's output z (a residual), z itself; g is then that masked
  // gradient (the residual's, x's memory format), written by the reductions, which then always run;
  // else g is empty (0,). Without relu_mask grad_output is already masked (g = dz * 1[not z <= 0];
  // output must be None).
  m.def("batch_norm_relu_backward(Tensor grad_output, Tensor x, Tensor? output, Tensor scale, Tensor shift, "
        "Tensor? mean, Tensor? var, float eps, bool relu_mask, bool need_dx, bool need_dparams) "
        "-> (Tensor, Tensor, Tensor)");
}

}  // namespace resnext_kernels
