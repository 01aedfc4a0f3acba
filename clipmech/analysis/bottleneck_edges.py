"""Exact edge IG through one ResNet bottleneck with its Jacobian split at the 3x3 convolution.

open_clip's Bottleneck in eval mode is y = relu(bn3(conv3(pool(relu(bn2(conv2(relu(bn1(conv1(x)))))))))
+ skip(x)), conv1 / conv3 1x1. An edge score u/i -> d/j at one IG path point is <r_j, J v_i>: the
metric's cotangent r_j is nonzero on output channel j only and the direction v_i = -a_u on input
channel i only. Both stay one channel "wide" at the block's ends, so they cost almost nothing to
carry inwards: pulled back through relu3, bn3, conv3 (one row of its weight), the pool, relu2 and
bn2, r_j becomes u_j = m2 ⊙ (k2·W3[j]) ⊗ poolᵀ(q_j); pushed through conv1 (one column), bn1 and
relu1, v_i becomes w_i = m1 ⊙ (k1·W1[:, i]) ⊗ v_i (m the ReLU masks, k the batch-norm scales).
edge[j, i] = <u_j, conv2(w_i)> + <q_j, skip(v_i)_j>. The only full-width work is conv2 over
min(|N_u|, |N_d|) such vectors, batched into one convolution, where autograd's per-node VJP runs
conv3ᵀ, conv2ᵀ, conv1ᵀ (and the downsample's convᵀ) at full width plus batch-norm and ReLU
backward over every channel. The skip term is a 1x1 map from channel i to j (identity or the
downsample's pooled 1x1 conv), and v_i is the same at every path point, so it is one contraction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import Bottleneck
from torch import Tensor, nn


def unsplittable_reason(block: nn.Module) -> str | None:
    """None if `block` is an eval-mode open_clip Bottleneck of the layout above, else why not."""
    if type(block) is not Bottleneck:
        return f"the segment is a {type(block).__name__}, not an open_clip Bottleneck"
    convs = [block.conv1, block.conv2, block.conv3]
    norms = [block.bn1, block.bn2, block.bn3]
    pools = [block.avgpool]
    if block.downsample is not None:
        pools.append(block.downsample[0])
        convs.append(block.downsample[1])
        norms.append(block.downsample[2])
    if any(n.training or n.running_var is None for n in norms):
        return "its batch norms are in training mode or keep no running statistics (call model.eval())"
    if any(c.groups != 1 or c.stride != (1, 1) or c.padding_mode != "zeros" or isinstance(c.padding, str)
           for c in convs):
        return "a convolution is grouped, strided, not zero-padded or padded by name"
    if any(c.kernel_size != (1, 1) for c in convs[:1] + convs[2:]):
        return "conv1, conv3 or the downsample convolution is not 1x1"
    if not all(type(a) is nn.ReLU for a in (block.act1, block.act2, block.act3)):
        return "an activation is not a ReLU"
    if not all(type(p) in (nn.Identity, nn.AvgPool2d) for p in pools):
        return "a pool is neither an AvgPool2d nor an Identity"
    return None


def _bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    """d bn(x) / dx per channel in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    return scale if bn.weight is None else bn.weight * scale


def _pool_adjoint(pool: nn.Module, cot: Tensor, size: torch.Size) -> Tensor:
    """poolᵀ cot: `pool` is linear and acts per channel, so its VJP at any input of spatial `size`."""
    if isinstance(pool, nn.Identity):
        return cot
    x = cot.new_zeros(*cot.shape[:2], *size, requires_grad=True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(pool(x), x, cot)
    return g


@torch.no_grad()
def bottleneck_edges(block: nn.Module, a_u: Tensor, clean_d: Tensor, alphas: Tensor, down_nodes: Tensor,
                     up_nodes: Tensor, scale: float, chunk: int) -> Tensor:
    """[J, I]: sum over path points alpha·a_u (`alphas` [S]), batch and positions of <dm_j/dx, v_i>,
    m_j = scale/2 · sum (y_j - clean_d_j)^2 and v_i = -a_u on channel i, for an open_clip
    Bottleneck `block` (check `unsplittable_reason` first). a_u [B, C_in, H, W], clean_d [B, C_out,
    H', W']. `chunk` vectors per batched conv2. Cost: one block forward over S·B examples plus
    conv2 (or its transpose) over S·B·min(I, J) examples; memory ~ S·B·(max(I, J) + 2 chunk)·(conv2's
    activation per example)."""
    n_paths, batch = len(alphas), len(a_u)
    x = (alphas.view(-1, 1, 1, 1, 1) * a_u).flatten(0, 1)
    h1 = block.act1(block.bn1(block.conv1(x)))
    h2 = block.act2(block.bn2(block.conv2(h1)))
    skip = x if block.downsample is None else block.downsample(x)
    y = block.act3(block.bn3(block.conv3(block.avgpool(h2))) + skip)[:, down_nodes]
    clean = clean_d[:, down_nodes].repeat(n_paths, 1, 1, 1)
    q = scale * (y - clean) * (y > 0)  # q_j: the cotangent on channel j of the sum (branch + skip) [S·B, J, H', W']
    v = -a_u[:, up_nodes]  # [B, I, H, W], the same at every path point

    q_total = q.unflatten(0, (n_paths, batch)).sum(0)
    if block.downsample is None:
        edges = torch.einsum("bjhw,bihw->ji", q_total, v) * (down_nodes[:, None] == up_nodes[None]).to(v.dtype)
    else:
        pool, conv, bn = block.downsample
        weight = conv.weight[down_nodes][:, up_nodes, 0, 0] * _bn_scale(bn)[down_nodes, None]
        edges = torch.einsum("bjhw,bihw->ji", q_total, pool(v)) * weight

    # Node-side tensors are built channels-last ([k, S·B, H, W, C_mid]): the batched conv2 runs ~2x
    # faster on that layout than on NCHW at these batch sizes (oneDNN reorders NCHW input).
    p = _pool_adjoint(block.avgpool, q, h2.shape[-2:]).movedim(1, 0).contiguous()[..., None]  # [J, S·B, H, W, 1]
    v = v.repeat(n_paths, 1, 1, 1).movedim(1, 0).contiguous()[..., None]  # [I, S·B, H, W, 1]
    w3 = block.conv3.weight[down_nodes, :, 0, 0] * _bn_scale(block.bn3)[down_nodes, None] * _bn_scale(block.bn2)
    w1 = (block.conv1.weight[:, up_nodes, 0, 0] * _bn_scale(block.bn1)[:, None]).T  # [I, C_mid]
    m1, m2 = ((h > 0).movedim(1, -1).to(h.dtype, memory_format=torch.contiguous_format) for h in (h1, h2))  # [S·B, H, W, C_mid]

    def pulled(rows: slice) -> Tensor:  # u_j
        return (p[rows] * w3[rows, None, None, None]).mul_(m2)

    def pushed(rows: slice) -> Tensor:  # w_i
        return (v[rows] * w1[rows, None, None, None]).mul_(m1)

    conv2 = block.conv2
    n_up, n_down = len(up_nodes), len(down_nodes)
    if n_up <= n_down:
        other = pulled(slice(None)).flatten(1)
        cols = []
        for start in range(0, n_up, chunk):
            w = pushed(slice(start, start + chunk))
            z = F.conv2d(w.flatten(0, 1).movedim(-1, 1), conv2.weight, None, 1, conv2.padding, conv2.dilation)
            cols.append(other @ z.movedim(1, -1).reshape(len(w), -1).T)
        return edges + torch.cat(cols, 1)
    other = pushed(slice(None)).flatten(1)
    rows = []
    for start in range(0, n_down, chunk):
        u = pulled(slice(start, start + chunk))
        g = torch.nn.grad.conv2d_input((len(u) * len(h1), *h1.shape[1:]), conv2.weight, u.flatten(0, 1).movedim(-1, 1),
                                       1, conv2.padding, conv2.dilation)
        rows.append(g.movedim(1, -1).reshape(len(u), -1) @ other.T)
    return edges + torch.cat(rows, 0)
