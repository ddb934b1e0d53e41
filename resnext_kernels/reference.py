"""impl="torch": the reference. F.conv2d + F.batch_norm + ReLU, i.e. cuDNN on a GPU."""

import torch
import torch.nn.functional as F

SUPPORTS_BATCH_STATS = True
SUPPORTS_BACKWARD = True


def unavailable_reason(device):
    return None


def grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, dilation,
                         groups, training, momentum, eps):
    from .functional import output_memory_format

    y = F.conv2d(x, weight, None, stride, dilation, dilation, groups)
    z = torch.relu(F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    return z.contiguous(memory_format=output_memory_format(x))
