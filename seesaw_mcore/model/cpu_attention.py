"""Paged attention for CPU ranks: one C++ call per layer over the whole step, reading K/V
blocks in place through the block tables (no gather of the context, no padding).

Each (sequence, KV head) is one work item of ``at::parallel_for`` (the rank's intra-op
threads): a first pass over its context computes the scores of every query of the GQA group
(float32), a causal softmax per query (a branch-free exp that vectorizes), and a second pass
accumulates the values. The memory traffic is the context's K and V read once, which is what
a CPU decode step is bound by; the blocks are scattered, so each pass prefetches the key 16
positions ahead (2.7x faster at batch 48, SmolLM-135M shapes: 3.5 -> 1.3 ms per layer). A
fresh prefill (long queries, compute-bound) stays on SDPA, whose kernels are blocked for
that. Built once per environment with ``torch.utils.cpp_extension`` (cached under
``TORCH_EXTENSIONS_DIR``: ``jit_ops.py``), like DeepSpeed's own CPU ops; ``make
install`` builds it up front.
"""

from __future__ import annotations

import functools

import torch

_NAME = "seesaw_paged_attention_cpu"
_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// exp(x) for x <= 0 (scores minus their max): 2^(x log2 e) split into 2^i * 2^f, 2^f by a
// degree-6 polynomial (rel. error ~2e-7); branch-free, so `omp simd` loops vectorize it.
#pragma omp declare simd
static inline float exp_nonpos(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.44269504088896341f;
  const float fi = std::floor(t);
  const float f = t - fi;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

constexpr int64_t PF = 16;  // keys fetched ahead

template <typename T, int DC>
static void run(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                const at::Tensor& tables, const at::Tensor& cu_q, const at::Tensor& lens,
                at::Tensor& out, double scale, float* LSE) {
  const int64_t B = lens.size(0), HQ = q.size(1), D = DC > 0 ? DC : q.size(2);
  const int64_t BS = kc.size(1), HKV = kc.size(2), G = HQ / HKV, W = tables.size(1);
  const int64_t sqt = q.stride(0), sqh = q.stride(1), sot = out.stride(0), soh = out.stride(1);
  const int64_t skb = kc.stride(0), sks = kc.stride(1), skh = kc.stride(2);
  const int64_t svb = vc.stride(0), svs = vc.stride(1), svh = vc.stride(2);
  const T* Q = q.data_ptr<T>();
  const T* K = kc.data_ptr<T>();
  const T* V = vc.data_ptr<T>();
  T* O = out.data_ptr<T>();
  const int32_t* TB = tables.data_ptr<int32_t>();
  const int32_t* CU = cu_q.data_ptr<int32_t>();
  const int32_t* L = lens.data_ptr<int32_t>();
  at::parallel_for(0, B * HKV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, sc, acc, kf;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / HKV, h = item % HKV;
      const int64_t q0 = CU[b], nq = CU[b + 1] - CU[b], ctx = L[b], rows = nq * G;
      const int64_t first = ctx - nq;  // query t (of nq) sees keys 0 .. first + t
      qf.resize(rows * D);
      sc.resize(rows * ctx);
      acc.assign(rows * D, 0.f);
      kf.resize(D);
      // row j of this (sequence, KV head) in a K or V cache, as float32; the blocks are
      // scattered, so the row PF positions ahead is fetched now
      auto row = [&](const T* base, int64_t sb, int64_t ss, int64_t sh, int64_t j) {
        const T* p = base + TB[b * W + j / BS] * sb + (j % BS) * ss + h * sh;
        if (j + PF < ctx) {
          const char* nx = reinterpret_cast<const char*>(
              base + TB[b * W + (j + PF) / BS] * sb + ((j + PF) % BS) * ss + h * sh);
          for (int64_t o = 0; o < D * (int64_t)sizeof(T); o += 64) __builtin_prefetch(nx + o);
        }
        if constexpr (std::is_same_v<T, float>) {
          return static_cast<const float*>(p);
        } else {
          for (int64_t d = 0; d < D; ++d) kf[d] = static_cast<float>(p[d]);
          return static_cast<const float*>(kf.data());
        }
      };
      for (int64_t r = 0; r < rows; ++r) {  // query rows of this KV head, as float
        const T* src = Q + (q0 + r / G) * sqt + (h * G + r % G) * sqh;
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(src[d]) * scale;
      }
      for (int64_t j = 0; j < ctx; ++j) {  // pass 1: scores, K read in place
        const float* k32 = row(K, skb, sks, skh, j);
        // rows whose query sees key j: those of queries t >= j - first
        const int64_t r0 = std::max<int64_t>(0, j - first) * G;
        for (int64_t r = r0; r < rows; ++r) {
          const float* qr = qf.data() + r * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qr[d] * k32[d];
          sc[r * ctx + j] = s;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {  // softmax per query row over its visible keys
        float* s = sc.data() + r * ctx;
        const int64_t n = first + r / G + 1;
        float m = s[0], sum = 0.f;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) { s[j] = exp_nonpos(s[j] - m); sum += s[j]; }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) s[j] *= inv;
        if (LSE) LSE[(q0 + r / G) * HQ + h * G + r % G] = m + std::log(sum);
      }
      for (int64_t j = 0; j < ctx; ++j) {  // pass 2: values, V read in place
        const float* v32 = row(V, svb, svs, svh, j);
        const int64_t r0 = std::max<int64_t>(0, j - first) * G;
        for (int64_t r = r0; r < rows; ++r) {
          const float p = sc[r * ctx + j];
          float* a = acc.data() + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * v32[d];
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* dst = O + (q0 + r / G) * sot + (h * G + r % G) * soh;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[r * D + d]);
      }
    }
  });
}

static at::Tensor dispatch(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                           const at::Tensor& tables, const at::Tensor& cu_q,
                           const at::Tensor& lens, double scale, float* lse) {
  TORCH_CHECK(q.stride(2) == 1 && kc.stride(3) == 1 && vc.stride(3) == 1,
              "paged_attention: the head dimension must be contiguous");
  TORCH_CHECK(tables.scalar_type() == at::kInt && cu_q.scalar_type() == at::kInt &&
              lens.scalar_type() == at::kInt, "paged_attention: int32 metadata expected");
  auto out = at::empty_like(q);
  auto t = tables.contiguous(), c = cu_q.contiguous(), l = lens.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attn", [&] {
    switch (q.size(2)) {
      case 64: run<scalar_t, 64>(q, kc, vc, t, c, l, out, scale, lse); break;
      case 128: run<scalar_t, 128>(q, kc, vc, t, c, l, out, scale, lse); break;
      default: run<scalar_t, 0>(q, kc, vc, t, c, l, out, scale, lse);
    }
  });
  return out;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                           const at::Tensor& tables, const at::Tensor& cu_q,
                           const at::Tensor& lens, double scale) {
  return dispatch(q, kc, vc, tables, cu_q, lens, scale, nullptr);
}

// The same, plus each query row's log-sum-exp of its scaled scores [T, Hq] (float32): what
// merging this part with attention over other keys (a shared prefix) needs.
std::vector<at::Tensor> paged_attention_lse(
    const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& tables,
    const at::Tensor& cu_q, const at::Tensor& lens, double scale) {
  auto lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  auto out = dispatch(q, kc, vc, tables, cu_q, lens, scale, lse.data_ptr<float>());
  return {out, lse};
}
"""


@functools.cache
def _ext():
    from torch.utils.cpp_extension import load_inline

    from seesaw_mcore.jit_ops import load_op

    return load_op(_NAME, lambda: load_inline(
        name=_NAME, cpp_sources=[_SOURCE], functions=["paged_attention", "paged_attention_lse"],
        extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
        verbose=False))


@functools.cache
def available() -> bool:
    """Builds (or loads the cached build of) the extension; False, with one warning, where
    it cannot be built (no C++ compiler): attention then gathers the context instead."""
    try:
        _ext()
        return True
    except (RuntimeError, OSError, ImportError) as e:
        import warnings

        warnings.warn(f"the CPU paged-attention extension could not be built ({e}); "
                      f"decode attention gathers each step's context instead (slower)",
                      stacklevel=2)
        return False


def paged_attention_lse_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_query_lens: torch.Tensor,
                            seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``paged_attention_cpu`` and each query row's log-sum-exp ``[T, Hq]`` (float32) of its
    scaled scores, for merging with attention over other keys."""
    out, lse = _ext().paged_attention_lse(q, k_cache, v_cache, block_tables, cu_query_lens,
                                          seq_lens, q.shape[-1] ** -0.5)
    return out, lse


def paged_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, cu_query_lens: torch.Tensor,
                        seq_lens: torch.Tensor) -> torch.Tensor:
    """Every query of the step against its sequence's cached context, one call.

    Args:
        q: ``[T, Hq, D]`` queries.
        k_cache / v_cache: ``[NB, BS, Hkv, D]`` blocks (this step's K/V already written).
        block_tables: ``[B, NBmax]`` int32; cu_query_lens: ``[B + 1]`` int32;
            seq_lens: ``[B]`` int32 context lengths.

    Returns:
        ``[T, Hq, D]`` in ``q``'s dtype (float32 accumulation).
    """
    return _ext().paged_attention(q, k_cache, v_cache, block_tables, cu_query_lens, seq_lens,
                                  q.shape[-1] ** -0.5)
