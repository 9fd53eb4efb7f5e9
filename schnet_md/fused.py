"""A fused continuous-filter convolution for MD on CUDA (issue #17), written in Triton.

On an H100, one forward+backward of schnet2018 on a 24k-atom water box spends most of its time in the CFConv's
passes over [pairs, F] arrays: the Gaussian expansion, the filter network's activations, the gather of h_j,
the product with the filter and the scatter into x_i (benchmarks/gpu.md). Here one kernel does all of it for
a tile of pairs, with the filter network's two matrix products in between, and nothing of size [pairs, F]
is written to memory:

    e_k  = exp(-gamma (d - mu_k)^2)                      Gaussian expansion (clamped at e^-80, as the model)
    W    = ssp(ssp(e W1^T + b1) W2^T + b2) * f_cut(d)   filter network (last ssp optional), times the envelope
    out_i += h_j * W  (and out_j += h_i * W for a half list)

The backward kernel recomputes the tile and returns dE/dh, dE/dd and dE/d(envelope); the distances' and
envelope's own autograd carries these on to the positions. It is for inference: the weights must be frozen
(as `export.inference_copy` leaves them), and there is no second derivative (training needs one for force
losses and keeps the reference CFConv).

`fused_atomic_energies` is `SchNet.atomic_energies` with this kernel in every interaction block; the
PythonForce backend uses it with `fused=True` (`export.create_python_force`). TorchScript cannot call Triton,
so the TorchForce keeps the reference path. The kernels' logic is tested on the CPU in Triton's interpreter
(TRITON_INTERPRET=1, tests/test_fused.py); their speed is measured on the GPU (benchmarks/gpu/profile_cuda.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import triton
import triton.language as tl

LOG2 = math.log(2.0)
BLOCK_PAIRS = 16      # pairs per program (H100, 24k-atom water box, TF32: 16 -> 67 ms, 32 -> 112, 64 -> 95, 128 -> 120)
BLOCK_GAUSSIANS = 32  # Gaussians per step through the filter network's first layer
# The filter network's products. "tf32": tensor cores, 10-bit mantissa; on an H100 (benchmarks/gpu.md, 24k-atom
# water box, schnet2018) energy within 1e-4 relative and forces within 0.2 % of the largest of the float32 model.
# "ieee": float32 throughout, as the reference model, but Triton then multiplies without tensor cores: 2.3 s per
# forward+backward of that box, 19x slower than TorchScript. Another value compiles other kernels.
DOT_PRECISION = "tf32"


@triton.jit
def _softplus(x):
    # log(1 + e^x), stable for large |x|
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _expansion(d, mu_ptr, k0, K: tl.constexpr, gamma, KB: tl.constexpr):
    """Gaussians k0..k0+KB of the tile's distances: (e, exponent, d - mu); zero beyond K."""
    ks = k0 + tl.arange(0, KB)
    mu = tl.load(mu_ptr + ks, mask=ks < K, other=0.0)
    diff = d[:, None] - mu[None, :]
    exponent = -gamma * diff * diff
    e = tl.where((ks < K)[None, :], tl.exp(tl.maximum(exponent, -80.0)), 0.0)
    return e, exponent, diff


@triton.jit
def _filters(d, mu_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gamma, log2, K: tl.constexpr, F: tl.constexpr,
             BP: tl.constexpr, KB: tl.constexpr, LAST_SSP: tl.constexpr, DOT: tl.constexpr):
    """The tile's filter network: (a1, a2, w0) with w0 the filters before the envelope. The Gaussians go
    through the first layer KB at a time (301 of them for schnet2017 would not fit in registers at once)."""
    fs = tl.arange(0, F)
    a1 = tl.zeros((BP, F), dtype=tl.float32) + tl.load(b1_ptr + fs)[None, :]
    for k0 in tl.static_range(0, K, KB):
        e, exponent, diff = _expansion(d, mu_ptr, k0, K, gamma, KB)
        ks = k0 + tl.arange(0, KB)
        w1t = tl.load(w1_ptr + fs[None, :] * K + ks[:, None], mask=(ks < K)[:, None], other=0.0)  # [KB, F] of W1^T
        a1 += tl.dot(e, w1t, input_precision=DOT)
    t = _softplus(a1) - log2
    w2t = tl.load(w2_ptr + fs[None, :] * F + fs[:, None])                                       # [F, F] = W2^T
    a2 = tl.dot(t, w2t, input_precision=DOT) + tl.load(b2_ptr + fs)[None, :]
    if LAST_SSP:
        w0 = _softplus(a2) - log2
    else:
        w0 = a2
    return a1, a2, w0


@triton.jit
def _tile(d_ptr, env_ptr, i_ptr, j_ptr, mu_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, P, gamma, log2, K: tl.constexpr,
          F: tl.constexpr, BP: tl.constexpr, KB: tl.constexpr, LAST_SSP: tl.constexpr, DOT: tl.constexpr):
    """This program's tile of pairs: (rows, row_ok, d, i, j, envelope, a1, a2, w0, w = w0 * envelope)."""
    rows = tl.program_id(0) * BP + tl.arange(0, BP)
    row_ok = rows < P
    d = tl.load(d_ptr + rows, mask=row_ok, other=0.0)
    env = tl.load(env_ptr + rows, mask=row_ok, other=0.0)
    a1, a2, w0 = _filters(d, mu_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gamma, log2, K, F, BP, KB, LAST_SSP, DOT)
    i = tl.load(i_ptr + rows, mask=row_ok, other=0)
    j = tl.load(j_ptr + rows, mask=row_ok, other=0)
    return rows, row_ok, d, i, j, env, a1, a2, w0, w0 * env[:, None]


@triton.jit
def _cfconv_forward(h_ptr, i_ptr, j_ptr, d_ptr, env_ptr, mu_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
                    P, gamma, log2, K: tl.constexpr, F: tl.constexpr, BP: tl.constexpr, KB: tl.constexpr,
                    LAST_SSP: tl.constexpr, HALF: tl.constexpr, DOT: tl.constexpr):
    fs = tl.arange(0, F)
    rows, row_ok, d, i, j, env, a1, a2, w0, w = _tile(d_ptr, env_ptr, i_ptr, j_ptr, mu_ptr, w1_ptr, b1_ptr, w2_ptr,
                                                      b2_ptr, P, gamma, log2, K, F, BP, KB, LAST_SSP, DOT)
    h_j = tl.load(h_ptr + j[:, None] * F + fs[None, :], mask=row_ok[:, None], other=0.0)
    tl.atomic_add(out_ptr + i[:, None] * F + fs[None, :], h_j * w, mask=row_ok[:, None])
    if HALF:
        h_i = tl.load(h_ptr + i[:, None] * F + fs[None, :], mask=row_ok[:, None], other=0.0)
        tl.atomic_add(out_ptr + j[:, None] * F + fs[None, :], h_i * w, mask=row_ok[:, None])


@triton.jit
def _cfconv_backward(g_ptr, h_ptr, i_ptr, j_ptr, d_ptr, env_ptr, mu_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                     grad_h_ptr, grad_d_ptr, grad_env_ptr, P, gamma, log2, K: tl.constexpr, F: tl.constexpr,
                     BP: tl.constexpr, KB: tl.constexpr, LAST_SSP: tl.constexpr, HALF: tl.constexpr,
                     DOT: tl.constexpr):
    fs = tl.arange(0, F)
    rows, row_ok, d, i, j, env, a1, a2, w0, w = _tile(d_ptr, env_ptr, i_ptr, j_ptr, mu_ptr, w1_ptr, b1_ptr, w2_ptr,
                                                      b2_ptr, P, gamma, log2, K, F, BP, KB, LAST_SSP, DOT)
    g_i = tl.load(g_ptr + i[:, None] * F + fs[None, :], mask=row_ok[:, None], other=0.0)
    h_j = tl.load(h_ptr + j[:, None] * F + fs[None, :], mask=row_ok[:, None], other=0.0)
    tl.atomic_add(grad_h_ptr + j[:, None] * F + fs[None, :], g_i * w, mask=row_ok[:, None])
    g_w = g_i * h_j                                          # dE/dW of the tile's filters
    if HALF:
        g_j = tl.load(g_ptr + j[:, None] * F + fs[None, :], mask=row_ok[:, None], other=0.0)
        h_i = tl.load(h_ptr + i[:, None] * F + fs[None, :], mask=row_ok[:, None], other=0.0)
        tl.atomic_add(grad_h_ptr + i[:, None] * F + fs[None, :], g_j * w, mask=row_ok[:, None])
        g_w += g_j * h_i
    tl.store(grad_env_ptr + rows, tl.sum(g_w * w0, axis=1), mask=row_ok)
    g_a2 = g_w * env[:, None]
    if LAST_SSP:
        g_a2 = g_a2 * tl.sigmoid(a2)
    w2 = tl.load(w2_ptr + fs[:, None] * F + fs[None, :])                                        # [F, F] = W2
    g_a1 = tl.dot(g_a2, w2, input_precision=DOT) * tl.sigmoid(a1)
    g_d = tl.zeros((BP,), dtype=tl.float32)
    for k0 in tl.static_range(0, K, KB):
        e, exponent, diff = _expansion(d, mu_ptr, k0, K, gamma, KB)
        ks = k0 + tl.arange(0, KB)
        w1 = tl.load(w1_ptr + fs[:, None] * K + ks[None, :], mask=(ks < K)[None, :], other=0.0)  # [F, KB] of W1
        g_e = tl.dot(g_a1, w1, input_precision=DOT)
        # de_k/dd = -2 gamma (d - mu_k) e_k, zero where the exponent sits at its clamp
        g_d += tl.sum(tl.where(exponent > -80.0, g_e * e * (-2.0 * gamma) * diff, 0.0), axis=1)
    tl.store(grad_d_ptr + rows, g_d, mask=row_ok)


class _FusedCFConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, distances, envelope, i, j, mu, gamma, w1, b1, w2, b2, last_ssp, half_list):
        n_pairs, n_filters, n_gaussians = distances.shape[0], h.shape[1], mu.shape[0]
        out = torch.zeros_like(h)
        grid = (triton.cdiv(n_pairs, BLOCK_PAIRS),)
        _cfconv_forward[grid](h, i, j, distances, envelope, mu, w1, b1, w2, b2, out, n_pairs, gamma, LOG2,
                              K=n_gaussians, F=n_filters, BP=BLOCK_PAIRS, KB=BLOCK_GAUSSIANS, LAST_SSP=last_ssp,
                              HALF=half_list, DOT=DOT_PRECISION)
        ctx.save_for_backward(h, distances, envelope, i, j, mu, w1, b1, w2, b2)
        ctx.settings = (gamma, last_ssp, half_list)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        h, distances, envelope, i, j, mu, w1, b1, w2, b2 = ctx.saved_tensors
        gamma, last_ssp, half_list = ctx.settings
        n_pairs, n_filters, n_gaussians = distances.shape[0], h.shape[1], mu.shape[0]
        grad_h = torch.zeros_like(h)
        grad_d = torch.empty_like(distances)
        grad_env = torch.empty_like(envelope)
        grid = (triton.cdiv(n_pairs, BLOCK_PAIRS),)
        _cfconv_backward[grid](grad_out.contiguous(), h, i, j, distances, envelope, mu, w1, b1, w2, b2, grad_h,
                               grad_d, grad_env, n_pairs, gamma, LOG2, K=n_gaussians, F=n_filters, BP=BLOCK_PAIRS,
                               KB=BLOCK_GAUSSIANS, LAST_SSP=last_ssp, HALF=half_list, DOT=DOT_PRECISION)
        return grad_h, grad_d, grad_env, None, None, None, None, None, None, None, None, None, None


def fused_cfconv(cfconv, h: Tensor, distances: Tensor, envelope: Tensor, i: Tensor, j: Tensor, mu: Tensor,
                 gamma: float, half_list: bool) -> Tensor:
    """`CFConv.forward` from h = in2f(x) and the pair distances (Å) instead of their Gaussian expansion."""
    network = cfconv.filter_network
    weights = [network.dense1.weight, network.dense1.bias, network.dense2.weight, network.dense2.bias]
    if any(w.requires_grad for w in weights):
        raise ValueError("the fused CFConv is for inference: freeze the weights (export.inference_copy does)")
    if h.dtype != torch.float32:
        raise ValueError("the fused CFConv runs in float32")
    n_filters = h.shape[1]
    if n_filters < 16 or n_filters & (n_filters - 1):
        raise ValueError(f"the fused CFConv needs a power-of-two filter count >= 16, not {n_filters}")
    return _FusedCFConv.apply(h.contiguous(), distances.contiguous(), envelope.contiguous(), i.contiguous(),
                              j.contiguous(), mu.contiguous(), float(gamma),
                              *[w.detach().contiguous() for w in weights], bool(network.last_activation),
                              bool(half_list))


def fused_atomic_energies(model, species: Tensor, vectors: Tensor, i: Tensor, j: Tensor,
                          include_reference: bool = True, half_list: bool = False) -> Tensor:
    """`SchNet.atomic_energies` with the fused CFConv in every interaction block (same arguments)."""
    distances = torch.linalg.norm(vectors, dim=-1)
    envelope = model.envelope(distances)
    x = model.embedding(species)
    for interaction in model.interactions:
        v = fused_cfconv(interaction.cfconv, interaction.cfconv.in2f(x), distances, envelope, i, j,
                         model.expansion.mu, model.expansion.gamma, half_list)
        x = x + interaction.update(v)
    return model.readout(x, species, include_reference)


class FusedSchNet(torch.nn.Module):
    """A SchNet whose `atomic_energies` runs the fused CFConv (eager, not TorchScript)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.cutoff = model.cutoff
        self.config = model.config
        self.readout = model.readout

    def species(self, atomic_numbers: Tensor) -> Tensor:
        return self.model.species(atomic_numbers)

    def atomic_energies(self, species, vectors, i, j, include_reference: bool = True, half_list: bool = False):
        return fused_atomic_energies(self.model, species, vectors, i, j, include_reference, half_list)
