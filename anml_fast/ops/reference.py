"""Plain-PyTorch twins of the fused ops: the fallback without an extension and the tests' reference.

Each function here has the same signature as its compiled counterpart in `anml_fast.ops`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-5


def conv_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               norm_weight: torch.Tensor, norm_bias: torch.Tensor, pool: bool) -> torch.Tensor:
    """relu(norm(conv3x3(x) + bias)) then an optional 2x2 max-pool.

    `norm` normalises each sample's channel over its H x W positions (biased variance, eps 1e-5)
    with an affine weight and bias: what the reference's batch norm computes on a batch of one.
    """
    return plane_norm(F.conv2d(x, weight, bias), norm_weight, norm_bias, pool)


def plane_norm(y: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, pool: bool) -> torch.Tensor:
    """conv_block after its convolution: relu(norm(y)) then an optional 2x2 max-pool."""
    y = F.instance_norm(y, weight=norm_weight, bias=norm_bias, eps=NORM_EPS)
    y = F.relu(y)
    return F.max_pool2d(y, 2) if pool else y


def plane_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) of each [N, C] plane of y, as the compiled plane norms save them for their
    backward (in `stats_dtype`)."""
    var, mean = torch.var_mean(y.to(stats_dtype(y.dtype)), dim=(2, 3), unbiased=False)
    return mean, (var + NORM_EPS).rsqrt()


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the compiled plane norms keep mean and rstd in (their op-math type)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_valid(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The stride-1, unpadded convolution without bias (conv_block's, and the inner loop's)."""
    return F.conv2d(x, weight)


def conv_valid_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool,
                        weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight) of conv_valid; one not asked for comes back as an empty tensor."""
    gx = torch.nn.grad.conv2d_input(x.shape, weight, grad_y) if input_grad else x.new_empty((0,))
    gw = torch.nn.grad.conv2d_weight(x, weight.shape, grad_y) if weight_grad else weight.new_empty((0,))
    return gx, gw


def conv_valid_input_grad_norm_backward(grad_y: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
                                        mean: torch.Tensor, rstd: torch.Tensor, norm_weight: torch.Tensor,
                                        norm_bias: torch.Tensor, pool: bool
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_y_prev, grad_norm_weight, grad_norm_bias): conv_valid's input grad for the input
    x = plane_norm(y, norm_weight, norm_bias, pool), carried back through that plane norm to y
    (the previous conv's output). mean and rstd, the compiled op's saved statistics, are
    recomputed here from y."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (y, norm_weight, norm_bias)]
        x = plane_norm(*leaves, pool)
        grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_y)
        return torch.autograd.grad(x, leaves, grad_x)


def conv_valid_plane_norm(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor,
                          norm_bias: torch.Tensor, pool: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, y, mean, rstd): y = conv_valid(x, weight), out = plane_norm(y, ...), and the plane
    statistics [N, C] that anml_fast::plane_norm saves for its backward (float64 for float64,
    else float32)."""
    y = conv_valid(x, weight)
    return plane_norm(y, norm_weight, norm_bias, pool), y, *plane_stats(y)


def conv_valid_sgd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lr: float) -> torch.Tensor:
    """weight - lr * grad_weight of conv_valid, as a new tensor: the inner loop's conv SGD step."""
    return weight - lr * torch.nn.grad.conv2d_weight(x, weight.shape, grad_y)


def gated_head(h: torch.Tensor, gate_logits: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
    """logits = weight @ (h * sigmoid(gate_logits)) + bias, for rows of h."""
    return F.linear(h * torch.sigmoid(gate_logits), weight, bias)


def gated_head_cross_entropy(h: torch.Tensor, gate_logits: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of cross_entropy(gated_head(h, gate_logits, weight, bias), target)."""
    return F.cross_entropy(gated_head(h, gate_logits, weight, bias), target)


def gated_head_ce_sgd_(h: torch.Tensor, gate_logits: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, target: torch.Tensor, lr: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dh, dgate_logits) of the head's cross-entropy, then weight -= lr dW, bias -= lr db in place.

    One batch-1 SGD step of the head outside autograd; dh and dgate_logits (taken with the weight
    before the update) continue the backward into the trunks.
    """
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (h, gate_logits, weight, bias)]
        loss = gated_head_cross_entropy(*leaves, target)
        dh, dz, dw, db = torch.autograd.grad(loss, leaves)
    with torch.no_grad():
        weight.sub_(dw, alpha=lr)
        bias.sub_(db, alpha=lr)
    return loss.detach(), dh, dz


def sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> list[torch.Tensor]:
    """New tensors w - lr * g (out of place: the inner loop keeps its starting weights)."""
    return torch._foreach_sub(params, grads, alpha=lr) if params else []


def adam_update_(params: list[torch.Tensor], grads: list[torch.Tensor],
                 exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], step: int,
                 lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """One Adam step in place, as torch.optim.Adam computes it (step counts from 1)."""
    bc1 = 1 - beta1 ** step
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)


def adam_update_batched_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                         step: int | torch.Tensor, lr: torch.Tensor, beta1: float = 0.9,
                         beta2: float = 0.999, eps: float = 1e-8) -> None:
    """torch.optim.Adam's step for a stack of independent tensors, one learning rate each (lr [T]).

    `step` is an int, or a one-element int64 tensor on p's device (then nothing is read back, and
    a CUDA graph of this step stays right as the step advances). Both give the same bits on the
    CPU; on CUDA they may differ in the last bit, since there a division by a host scalar is a
    multiplication by its reciprocal.
    """
    if isinstance(step, torch.Tensor):
        s = step.reshape(()).double()
        # float64 on the device, as the host computes them; then in p's dtype, as a Python float
        # is when it meets a float32 tensor
        bc1 = (1 - torch.pow(beta1, s)).to(p.dtype)
        bc2_sqrt = (1 - torch.pow(beta2, s)).sqrt().to(p.dtype)
    else:
        bc1 = 1 - beta1 ** step
        bc2_sqrt = (1 - beta2 ** step) ** 0.5
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.sub_(m / denom * (lr / bc1).view(-1, *[1] * (p.dim() - 1)))


@torch.no_grad()
def step_inputs(X: torch.Tensor, Y: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X[:, step - 1], Y[:, step - 1]) of sequences X [T, S, F], Y [T, S], with the step read on the
    device (nothing waits on the host) and its index clamped into 0..S-1, as the Triton op does."""
    i = _image_index(step, X.shape[1])
    return X.index_select(1, i).squeeze(1), Y.index_select(1, i).squeeze(1)


def _image_index(step: torch.Tensor, n_steps: int) -> torch.Tensor:
    return (step.reshape(1) - 1).clamp(0, n_steps - 1)


@torch.no_grad()
def output_layer_logits(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """logits [T, O] = W[t] X[t, step - 1] + b[t] (index clamped as in step_inputs): what
    output_layer_adam_step_'s `logits` must hold before step `step`; call it once before step 1."""
    f = X.index_select(1, _image_index(step, X.shape[1])).squeeze(1)
    return torch.baddbmm(b.unsqueeze(2), W, f.unsqueeze(2)).squeeze(2)


@torch.no_grad()
def output_layer_adam_step_(W: torch.Tensor, b: torch.Tensor, mW: torch.Tensor, vW: torch.Tensor,
                            mb: torch.Tensor, vb: torch.Tensor, logits: torch.Tensor, X: torch.Tensor,
                            Y: torch.Tensor, lr: torch.Tensor, step: torch.Tensor) -> None:
    """Adam step `step` of T independent output layers (W [T, O, F], b [T, O]), in place.

    `step` is a one-element int64 tensor on the device; the step learns image step - 1 of each
    trajectory's sequence (X [T, S, F], Y [T, S]; the index is clamped into 0..S-1):
    f = X[t, step - 1], y = Y[t, step - 1];  logits = W[t] f + b[t];  d = softmax(logits) - onehot(y);
    gW = d f^T, gb = d;  then Adam (betas 0.9, 0.999, eps 1e-8) at learning rate lr[t].
    `logits` [T, O] holds those logits on entry (prime it with output_layer_logits before step 1)
    and the next step's, from the updated W and b, on exit: one GEMV per step, as the fused op.
    """
    f, y = step_inputs(X, Y, step)
    d = torch.softmax(logits, 1)
    d[torch.arange(W.shape[0], device=W.device), y] -= 1  # d(cross-entropy)/d(logits) at batch size 1
    gW = d.unsqueeze(2) * f.unsqueeze(1)
    adam_update_batched_(W, gW, mW, vW, step, lr)
    adam_update_batched_(b, d, mb, vb, step, lr)
    logits.copy_(output_layer_logits(W, b, X, step + 1))
