// CPU kernels (float32) for the operations whose stock Paddle CPU kernels dominate dygraph time:
// Mobile-Former's depthwise convolution and dynamic ReLU max(x*a1, x*a2) (NCHW), and the dense
// layers (`linear`) of every model, whose GEMMs go to oneDNN instead of MKL.
// Built just in time by mobileformer/cpu_ops.py, which also falls back to standard Paddle ops.
//
// Threads: `#pragma omp` loops. The library is linked against Paddle's own libiomp5 (see
// cpu_ops.py), so these loops share one thread pool with MKL and oneDNN (whose OpenMP calls bind
// to the same runtime in Paddle's process) and follow `paddle.base.core.set_num_threads` like
// Paddle's math library does.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "paddle/extension.h"

namespace {

// Planes narrower than this are convolved as one long row (see conv_plane).
constexpr int kNarrow = 16;

// dst (rows x pitch) := zeros, then dst[offset + step*i][offset + step*j] = src[i][j] for the
// (i, j) that land inside dst. step 1 is zero padding; step 2 also dilates (stride-2 gradient).
void scatter_plane(const float* src, int h, int w, int step, int offset, float* dst, int rows,
                   int pitch) {
  std::fill(dst, dst + static_cast<int64_t>(rows) * pitch, 0.f);
  const int j_end = std::min(w, (pitch - offset + step - 1) / step);
  for (int i = 0; i < h; ++i) {
    const int r = offset + step * i;
    if (r >= rows) break;
    float* dst_row = dst + static_cast<int64_t>(r) * pitch + offset;
    const float* src_row = src + static_cast<int64_t>(i) * w;
    if (step == 1) {
      std::memcpy(dst_row, src_row, j_end * sizeof(float));
    } else {
      for (int j = 0; j < j_end; ++j) dst_row[step * j] = src_row[j];
    }
  }
}

// out[i] = sum_{kh, kw} w[kh][kw] * in[kh * pitch + S * i + kw] for i < len. The taps unroll
// (K is a template argument) and the loop over i vectorises along the row.
template <int K, int S>
void conv_row(const float* __restrict in, int64_t pitch, const float* __restrict w,
              float* __restrict out, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    float acc = 0.f;
    for (int kh = 0; kh < K; ++kh)
      for (int kw = 0; kw < K; ++kw) acc += w[kh * K + kw] * in[kh * pitch + S * i + kw];
    out[i] = acc;
  }
}

// One output plane (ho x wo) of the correlation of a padded plane (`pitch` floats a row) with a
// K x K kernel. Narrow stride-1 planes (7x7, 14x14) are computed as one long row over the padded
// pitch, discarding the results in the gap columns, so that the vector loop stays long; `scratch`
// holds ho * pitch floats for that.
template <int K, int S>
void conv_plane(const float* in, int pitch, const float* w, float* out, int ho, int wo,
                float* scratch) {
  if (S == 1 && wo < kNarrow) {
    conv_row<K, 1>(in, pitch, w, scratch, static_cast<int64_t>(ho - 1) * pitch + wo);
    for (int r = 0; r < ho; ++r)
      std::memcpy(out + static_cast<int64_t>(r) * wo, scratch + static_cast<int64_t>(r) * pitch,
                  wo * sizeof(float));
  } else {
    for (int r = 0; r < ho; ++r)
      conv_row<K, S>(in + static_cast<int64_t>(r) * S * pitch, pitch, w,
                     out + static_cast<int64_t>(r) * wo, wo);
  }
}

// acc[kh][kw] += sum_i g[i] * in[kh * pitch + S * i + kw] for i < len (weight gradient).
template <int K, int S>
void accumulate_taps(const float* __restrict g, const float* __restrict in, int64_t pitch,
                     int64_t len, float* acc) {
  for (int kh = 0; kh < K; ++kh)
    for (int kw = 0; kw < K; ++kw) {
      const float* tap = in + kh * pitch + kw;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < len; ++i) sum += g[i] * tap[S * i];
      acc[kh * K + kw] += sum;
    }
}

struct DepthwiseShape {
  int n, c, m, h, w, ho, wo;
};

void check_depthwise_args(const paddle::Tensor& x, const paddle::Tensor& w, int padding) {
  PD_CHECK(x.is_cpu() && w.is_cpu(), "depthwise_conv2d: tensors must be on the CPU.");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 && w.dtype() == paddle::DataType::FLOAT32,
           "depthwise_conv2d: tensors must be float32.");
  const auto& xs = x.shape();
  const auto& ws = w.shape();
  PD_CHECK(xs.size() == 4 && ws.size() == 4 && ws[1] == 1 && ws[0] % xs[1] == 0 && ws[2] == ws[3],
           "depthwise_conv2d: x must be [N, C, H, W] and weight [C * multiplier, 1, k, k].");
  PD_CHECK(padding >= 0 && padding < ws[3], "depthwise_conv2d: padding must be in [0, k - 1].");
  PD_CHECK(xs[2] + 2 * padding >= ws[3] && xs[3] + 2 * padding >= ws[3],
           "depthwise_conv2d: the padded input is smaller than the kernel.");
}

DepthwiseShape depthwise_shape(const paddle::Tensor& x, const paddle::Tensor& w, int stride,
                               int padding) {
  const auto& xs = x.shape();
  const int k = static_cast<int>(w.shape()[3]);
  DepthwiseShape s;
  s.n = static_cast<int>(xs[0]);
  s.c = static_cast<int>(xs[1]);
  s.m = static_cast<int>(w.shape()[0] / xs[1]);
  s.h = static_cast<int>(xs[2]);
  s.w = static_cast<int>(xs[3]);
  s.ho = (s.h + 2 * padding - k) / stride + 1;
  s.wo = (s.w + 2 * padding - k) / stride + 1;
  return s;
}

template <int K, int S>
void depthwise_forward(const float* x, const float* w, float* y, const DepthwiseShape& s,
                       int padding) {
  const int rows = (s.ho - 1) * S + K, pitch = (s.wo - 1) * S + K;
  const int64_t planes = static_cast<int64_t>(s.n) * s.c;
  const int64_t in_size = static_cast<int64_t>(s.h) * s.w, out_size = static_cast<int64_t>(s.ho) * s.wo;
#pragma omp parallel
  {
    std::vector<float> padded(static_cast<int64_t>(rows) * pitch);
    std::vector<float> scratch(static_cast<int64_t>(s.ho) * pitch);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < planes; ++p) {  // p = (n, c): pad the input plane once for its m outputs
      scatter_plane(x + p * in_size, s.h, s.w, 1, padding, padded.data(), rows, pitch);
      const int c = static_cast<int>(p % s.c);
      for (int j = 0; j < s.m; ++j) {
        const int64_t out_plane = p * s.m + j;  // = n * C * m + c * m + j
        conv_plane<K, S>(padded.data(), pitch, w + static_cast<int64_t>(c * s.m + j) * K * K,
                         y + out_plane * out_size, s.ho, s.wo, scratch.data());
      }
    }
  }
}

// dx = correlation of the (stride-dilated) output gradient, padded by K - 1 - padding, with the
// flipped kernel; dw = correlation of the padded input with the output gradient. Parallel over
// input channels with the batch loop inside, so each thread owns its dw rows: no races.
// Padded input and padded gradient share one pitch, so with stride 1 the padded gradient, seen
// from its first real element, is dy laid out on the input's pitch (zero gaps) as the dw
// reduction wants it.
template <int K, int S>
void depthwise_backward(const float* x, const float* w, const float* dy, float* dx, float* dw,
                        const DepthwiseShape& s, int padding) {
  const int q = K - 1 - padding;  // padding of the gradient plane
  const int rows = (s.ho - 1) * S + K, g_rows = s.h - 1 + K;
  const int pitch = std::max((s.wo - 1) * S + K, s.w - 1 + K);
  const int64_t in_size = static_cast<int64_t>(s.h) * s.w, out_size = static_cast<int64_t>(s.ho) * s.wo;
#pragma omp parallel
  {
    std::vector<float> padded(static_cast<int64_t>(rows) * pitch);
    std::vector<float> g_padded(static_cast<int64_t>(g_rows) * pitch);
    std::vector<float> scratch(static_cast<int64_t>(s.h) * pitch), dx_part(in_size);
    std::vector<float> flipped(static_cast<size_t>(s.m) * K * K);
    std::vector<double> dw_sum(static_cast<size_t>(s.m) * K * K);
    std::vector<float> dw_plane(K * K);
#pragma omp for schedule(static)
    for (int c = 0; c < s.c; ++c) {
      const float* w_c = w + static_cast<int64_t>(c) * s.m * K * K;
      for (int j = 0; j < s.m; ++j)
        std::reverse_copy(w_c + j * K * K, w_c + (j + 1) * K * K, flipped.data() + j * K * K);
      std::fill(dw_sum.begin(), dw_sum.end(), 0.0);
      for (int n = 0; n < s.n; ++n) {
        const int64_t p = static_cast<int64_t>(n) * s.c + c;
        scatter_plane(x + p * in_size, s.h, s.w, 1, padding, padded.data(), rows, pitch);
        float* dx_plane = dx + p * in_size;
        for (int j = 0; j < s.m; ++j) {
          const float* g = dy + (p * s.m + j) * out_size;
          scatter_plane(g, s.ho, s.wo, S, q, g_padded.data(), g_rows, pitch);
          std::fill(dw_plane.begin(), dw_plane.end(), 0.f);
          if (S == 1) {
            accumulate_taps<K, 1>(g_padded.data() + static_cast<int64_t>(q) * pitch + q, padded.data(),
                                  pitch, static_cast<int64_t>(s.ho - 1) * pitch + s.wo, dw_plane.data());
          } else {
            for (int r = 0; r < s.ho; ++r)
              accumulate_taps<K, S>(g + static_cast<int64_t>(r) * s.wo,
                                    padded.data() + static_cast<int64_t>(r) * S * pitch, pitch, s.wo,
                                    dw_plane.data());
          }
          for (int t = 0; t < K * K; ++t) dw_sum[j * K * K + t] += dw_plane[t];

          float* target = j == 0 ? dx_plane : dx_part.data();
          conv_plane<K, 1>(g_padded.data(), pitch, flipped.data() + j * K * K, target, s.h, s.w,
                           scratch.data());
          if (j > 0)
            for (int64_t i = 0; i < in_size; ++i) dx_plane[i] += dx_part[i];
        }
      }
      for (int t = 0; t < s.m * K * K; ++t)
        dw[static_cast<int64_t>(c) * s.m * K * K + t] = static_cast<float>(dw_sum[t]);
    }
  }
}

template <int V>
using Int = std::integral_constant<int, V>;

// Calls f(Int<K>(), Int<S>()) for the supported (kernel size, stride) pairs.
template <typename F>
void dispatch(int k, int stride, F&& f) {
  if (k == 3 && stride == 1) return f(Int<3>(), Int<1>());
  if (k == 3 && stride == 2) return f(Int<3>(), Int<2>());
  if (k == 5 && stride == 1) return f(Int<5>(), Int<1>());
  if (k == 5 && stride == 2) return f(Int<5>(), Int<2>());
  PD_THROW("depthwise_conv2d: kernel size must be 3 or 5 and stride 1 or 2, got k=", k,
           " stride=", stride, ".");
}

std::vector<paddle::Tensor> DepthwiseConv2dForward(const paddle::Tensor& x_in,
                                                   const paddle::Tensor& w_in, int stride,
                                                   int padding) {
  check_depthwise_args(x_in, w_in, padding);
  const paddle::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const DepthwiseShape s = depthwise_shape(x, w, stride, padding);
  auto y = paddle::empty({s.n, s.c * s.m, s.ho, s.wo}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  dispatch(static_cast<int>(w.shape()[3]), stride, [&](auto kernel, auto step) {
    depthwise_forward<decltype(kernel)::value, decltype(step)::value>(
        x.data<float>(), w.data<float>(), y.data<float>(), s, padding);
  });
  return {y};
}

std::vector<paddle::Tensor> DepthwiseConv2dBackward(const paddle::Tensor& x_in,
                                                    const paddle::Tensor& w_in,
                                                    const paddle::Tensor& dy_in, int stride,
                                                    int padding) {
  const paddle::Tensor x = x_in.contiguous(), w = w_in.contiguous(), dy = dy_in.contiguous();
  const DepthwiseShape s = depthwise_shape(x, w, stride, padding);
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dw = paddle::empty(w.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  dispatch(static_cast<int>(w.shape()[3]), stride, [&](auto kernel, auto step) {
    depthwise_backward<decltype(kernel)::value, decltype(step)::value>(
        x.data<float>(), w.data<float>(), dy.data<float>(), dx.data<float>(), dw.data<float>(), s,
        padding);
  });
  return {dx, dw};
}

std::vector<std::vector<int64_t>> DepthwiseConv2dInferShape(const std::vector<int64_t>& x,
                                                            const std::vector<int64_t>& w,
                                                            int stride, int padding) {
  auto out = [&](int64_t size) { return size < 0 ? size : (size + 2 * padding - w[3]) / stride + 1; };
  return {{x[0], w[0], out(x[2]), out(x[3])}};
}

// ---- dynamic ReLU: y = max(x * a1, x * a2), a1 and a2 per (n, c) plane ----

void check_dynamic_relu_args(const paddle::Tensor& x, const paddle::Tensor& a1,
                             const paddle::Tensor& a2) {
  PD_CHECK(x.is_cpu() && a1.is_cpu() && a2.is_cpu(), "dynamic_relu: tensors must be on the CPU.");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 && a1.dtype() == paddle::DataType::FLOAT32 &&
               a2.dtype() == paddle::DataType::FLOAT32,
           "dynamic_relu: tensors must be float32.");
  PD_CHECK(x.shape().size() == 4 && a1.shape() == std::vector<int64_t>({x.shape()[0], x.shape()[1]}) &&
               a2.shape() == a1.shape(),
           "dynamic_relu: x must be [N, C, H, W] and both slopes [N, C].");
}

std::vector<paddle::Tensor> DynamicReluForward(const paddle::Tensor& x_in,
                                               const paddle::Tensor& a1_in,
                                               const paddle::Tensor& a2_in) {
  check_dynamic_relu_args(x_in, a1_in, a2_in);
  const paddle::Tensor x = x_in.contiguous(), a1 = a1_in.contiguous(), a2 = a2_in.contiguous();
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const int64_t planes = a1.numel(), size = x.numel() / std::max<int64_t>(planes, 1);
  const float *xp = x.data<float>(), *a1p = a1.data<float>(), *a2p = a2.data<float>();
  float* yp = y.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < planes; ++p) {
    // The larger product takes the larger slope where x >= 0 and the smaller where x < 0: the
    // same float as max(x * a1, x * a2), with one multiply.
    const float hi = std::max(a1p[p], a2p[p]), lo = std::min(a1p[p], a2p[p]);
    const float* xi = xp + p * size;
    float* yi = yp + p * size;
#pragma omp simd
    for (int64_t i = 0; i < size; ++i) yi[i] = xi[i] * (xi[i] >= 0.f ? hi : lo);
  }
  return {y};
}

// Gradient with Paddle's `maximum` convention: the larger product's branch gets g; on a tie
// (x * a1 == x * a2, e.g. x == 0 or a1 == a2) each branch gets g / 2.
std::vector<paddle::Tensor> DynamicReluBackward(const paddle::Tensor& x_in,
                                                const paddle::Tensor& a1_in,
                                                const paddle::Tensor& a2_in,
                                                const paddle::Tensor& dy_in) {
  const paddle::Tensor x = x_in.contiguous(), a1 = a1_in.contiguous(), a2 = a2_in.contiguous(),
                       dy = dy_in.contiguous();
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto da1 = paddle::empty(a1.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto da2 = paddle::empty(a2.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const int64_t planes = a1.numel(), size = x.numel() / std::max<int64_t>(planes, 1);
  const float *xp = x.data<float>(), *a1p = a1.data<float>(), *a2p = a2.data<float>(),
              *gp = dy.data<float>();
  float *dxp = dx.data<float>(), *da1p = da1.data<float>(), *da2p = da2.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < planes; ++p) {
    const float s1 = a1p[p], s2 = a2p[p];
    const float* xi = xp + p * size;
    const float* gi = gp + p * size;
    float* dxi = dxp + p * size;
    float sum1 = 0.f, sum2 = 0.f;
#pragma omp simd reduction(+ : sum1, sum2)
    for (int64_t i = 0; i < size; ++i) {
      const float y1 = xi[i] * s1, y2 = xi[i] * s2;
      const float share1 = y1 > y2 ? 1.f : (y1 == y2 ? 0.5f : 0.f);
      const float g1 = gi[i] * share1, g2 = gi[i] - g1;
      dxi[i] = g1 * s1 + g2 * s2;
      sum1 += g1 * xi[i];
      sum2 += g2 * xi[i];
    }
    da1p[p] = sum1;
    da2p[p] = sum2;
  }
  return {dx, da1, da2};
}

std::vector<std::vector<int64_t>> FirstShape3(const std::vector<int64_t>& x,
                                                        const std::vector<int64_t>&,
                                                        const std::vector<int64_t>&) {
  return {x};
}

// ---- linear: y = x W + b through oneDNN's GEMM ----
// Paddle's dygraph `linear` / `matmul` call MKL, which has no AVX-512 kernels on AMD CPUs;
// oneDNN's sgemm picks its kernels by instruction set alone (and honours ONEDNN_MAX_CPU_ISA).

// oneDNN's C API (libdnnl.so.3; Paddle's wheel ships the library but not all of its headers):
// returns dnnl_success (0) or an error status.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha,
                          const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                          float* c, int64_t ldc);
constexpr int kDnnlSuccess = 0;

// Row-major C[m x n] = A' B' + beta C, A' = A or A^T (trans_a), likewise B'.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
          const float* b, float beta, float* c) {
  const int status =
      dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, 1.f, a, trans_a ? m : k, b,
                 trans_b ? k : n, beta, c, n);
  PD_CHECK(status == kDnnlSuccess, "linear: oneDNN sgemm failed with status ", status, ".");
}

void check_linear_args(const paddle::Tensor& x, const paddle::Tensor& w, const paddle::Tensor& b) {
  PD_CHECK(x.is_cpu() && w.is_cpu() && b.is_cpu(), "linear: tensors must be on the CPU.");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 && w.dtype() == paddle::DataType::FLOAT32 &&
               b.dtype() == paddle::DataType::FLOAT32,
           "linear: tensors must be float32.");
  PD_CHECK(!x.shape().empty() && w.shape().size() == 2 && x.shape().back() == w.shape()[0] &&
               b.shape() == std::vector<int64_t>({w.shape()[1]}),
           "linear: x must be [..., K], the weight [K, N] and the bias [N].");
}

std::vector<paddle::Tensor> LinearForward(const paddle::Tensor& x_in, const paddle::Tensor& w_in,
                                          const paddle::Tensor& b_in) {
  check_linear_args(x_in, w_in, b_in);
  const paddle::Tensor x = x_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
  const int64_t k = w.shape()[0], n = w.shape()[1], m = x.numel() / std::max<int64_t>(k, 1);
  std::vector<int64_t> shape = x.shape();
  shape.back() = n;
  auto y = paddle::empty(shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* bp = b.data<float>();
  float* yp = y.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < m; ++i) std::memcpy(yp + i * n, bp, n * sizeof(float));
  if (m > 0 && k > 0) gemm(false, false, m, n, k, x.data<float>(), w.data<float>(), 1.f, yp);
  return {y};
}

// dx = dy W^T, dW = x^T dy, db = the column sums of dy (summed in row order whatever the thread
// count, so the bias gradient does not depend on it).
std::vector<paddle::Tensor> LinearBackward(const paddle::Tensor& x_in, const paddle::Tensor& w_in,
                                           const paddle::Tensor& b_in, const paddle::Tensor& dy_in) {
  const paddle::Tensor x = x_in.contiguous(), w = w_in.contiguous(), dy = dy_in.contiguous();
  const int64_t k = w.shape()[0], n = w.shape()[1], m = x.numel() / std::max<int64_t>(k, 1);
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dw = paddle::empty(w.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto db = paddle::empty(b_in.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = x.data<float>(), *wp = w.data<float>(), *gp = dy.data<float>();
  float *dxp = dx.data<float>(), *dwp = dw.data<float>(), *dbp = db.data<float>();
  if (m > 0 && n > 0 && k > 0) {
    gemm(false, true, m, k, n, gp, wp, 0.f, dxp);
    gemm(true, false, k, n, m, xp, gp, 0.f, dwp);
  } else {  // an empty product: zero gradients
    std::fill(dxp, dxp + dx.numel(), 0.f);
    std::fill(dwp, dwp + dw.numel(), 0.f);
  }
  constexpr int64_t kColumns = 64;
#pragma omp parallel for schedule(static)
  for (int64_t c0 = 0; c0 < n; c0 += kColumns) {
    const int64_t c1 = std::min(n, c0 + kColumns);
    float* sums = dbp + c0;
    std::fill(sums, dbp + c1, 0.f);
    for (int64_t i = 0; i < m; ++i) {
      const float* row = gp + i * n;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) sums[c - c0] += row[c];
    }
  }
  return {dx, dw, db};
}

std::vector<std::vector<int64_t>> LinearInferShape(const std::vector<int64_t>& x,
                                                   const std::vector<int64_t>& w,
                                                   const std::vector<int64_t>&) {
  std::vector<int64_t> out = x;
  out.back() = w[1];
  return {out};
}

// ---- token linear: y[b] = W^T x[b] + b 1^T, x [B, K, C] -> y [B, N, C] ----
// The token-mixing layers of the MLP models apply a Linear along the token axis. Written as
// linear(x^T)^T it costs a copy of x into the transposed layout and leaves a strided result that
// the next op copies again (forward and backward); as a left multiplication per sample it needs
// neither.

void check_token_linear_args(const paddle::Tensor& x, const paddle::Tensor& w, const paddle::Tensor& b) {
  PD_CHECK(x.is_cpu() && w.is_cpu() && b.is_cpu(), "token_linear: tensors must be on the CPU.");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 && w.dtype() == paddle::DataType::FLOAT32 &&
               b.dtype() == paddle::DataType::FLOAT32,
           "token_linear: tensors must be float32.");
  PD_CHECK(x.shape().size() == 3 && w.shape().size() == 2 && x.shape()[1] == w.shape()[0] &&
               b.shape() == std::vector<int64_t>({w.shape()[1]}),
           "token_linear: x must be [B, K, C], the weight [K, N] and the bias [N].");
}

std::vector<paddle::Tensor> TokenLinearForward(const paddle::Tensor& x_in, const paddle::Tensor& w_in,
                                               const paddle::Tensor& b_in) {
  check_token_linear_args(x_in, w_in, b_in);
  const paddle::Tensor x = x_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
  const int64_t batch = x.shape()[0], k = x.shape()[1], c = x.shape()[2], n = w.shape()[1];
  auto y = paddle::empty({batch, n, c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = x.data<float>(), *wp = w.data<float>(), *bp = b.data<float>();
  float* yp = y.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < batch * n; ++row) std::fill(yp + row * c, yp + (row + 1) * c, bp[row % n]);
  if (k > 0 && c > 0)
    for (int64_t s = 0; s < batch; ++s) gemm(true, false, n, c, k, wp, xp + s * k * c, 1.f, yp + s * n * c);
  return {y};
}

// dx[b] = W dy[b]; dW = sum over b of x[b] dy[b]^T (in batch order); db[t] = the sum of dy[:, t, :].
std::vector<paddle::Tensor> TokenLinearBackward(const paddle::Tensor& x_in, const paddle::Tensor& w_in,
                                                const paddle::Tensor& b_in, const paddle::Tensor& dy_in) {
  const paddle::Tensor x = x_in.contiguous(), w = w_in.contiguous(), dy = dy_in.contiguous();
  const int64_t batch = x.shape()[0], k = x.shape()[1], c = x.shape()[2], n = w.shape()[1];
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dw = paddle::empty(w.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto db = paddle::empty(b_in.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = x.data<float>(), *wp = w.data<float>(), *gp = dy.data<float>();
  float *dxp = dx.data<float>(), *dwp = dw.data<float>(), *dbp = db.data<float>();
  if (batch > 0 && c > 0 && n > 0 && k > 0) {
    for (int64_t s = 0; s < batch; ++s) {
      gemm(false, false, k, c, n, wp, gp + s * n * c, 0.f, dxp + s * k * c);
      gemm(false, true, k, n, c, xp + s * k * c, gp + s * n * c, s == 0 ? 0.f : 1.f, dwp);
    }
  } else {  // an empty product: zero gradients
    std::fill(dxp, dxp + dx.numel(), 0.f);
    std::fill(dwp, dwp + dw.numel(), 0.f);
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n; ++t) {
    double sum = 0.0;
    for (int64_t s = 0; s < batch; ++s) {
      const float* row = gp + (s * n + t) * c;
      float partial = 0.f;
#pragma omp simd reduction(+ : partial)
      for (int64_t i = 0; i < c; ++i) partial += row[i];
      sum += partial;
    }
    dbp[t] = static_cast<float>(sum);
  }
  return {dx, dw, db};
}

std::vector<std::vector<int64_t>> TokenLinearInferShape(const std::vector<int64_t>& x,
                                                        const std::vector<int64_t>& w,
                                                        const std::vector<int64_t>&) {
  return {{x[0], w[1], x[2]}};
}

// ---- exact GELU: y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) ----
// Paddle's CPU kernel runs one thread and a scalar erf; these loops use every thread and, where
// glibc's vector math library is linked (MF_LIBMVEC, see cpu_ops.py), its vector erf and exp.

#ifdef MF_LIBMVEC
extern "C" {
#pragma omp declare simd notinbranch
float erff(float);
#pragma omp declare simd notinbranch
float expf(float);
}
#endif

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 pi)

std::vector<paddle::Tensor> GeluForward(const paddle::Tensor& x_in) {
  PD_CHECK(x_in.is_cpu() && x_in.dtype() == paddle::DataType::FLOAT32,
           "gelu: x must be a float32 CPU tensor.");
  const paddle::Tensor x = x_in.contiguous();
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  const int64_t size = x.numel();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < size; ++i) yp[i] = 0.5f * xp[i] * (1.f + erff(xp[i] * kSqrtHalf));
  return {y};
}

// dx = dy * (Phi(x) + x phi(x)), phi the standard normal density.
std::vector<paddle::Tensor> GeluBackward(const paddle::Tensor& x_in, const paddle::Tensor& dy_in) {
  const paddle::Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = x.data<float>(), *gp = dy.data<float>();
  float* dxp = dx.data<float>();
  const int64_t size = x.numel();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < size; ++i) {
    const float v = xp[i];
    const float cdf = 0.5f * (1.f + erff(v * kSqrtHalf));
    dxp[i] = gp[i] * (cdf + v * kInvSqrt2Pi * expf(-0.5f * v * v));
  }
  return {dx};
}

// ---- per-channel scale (and shift) over the last axis: y = x * a (+ b), a and b [C] ----
// ResMLP's Affine normalisation and LayerScale. Paddle's broadcast multiply and add reduce their
// parameter gradients on one thread.

void check_channel_args(const paddle::Tensor& x, const paddle::Tensor& a) {
  PD_CHECK(x.is_cpu() && a.is_cpu() && x.dtype() == paddle::DataType::FLOAT32 &&
               a.dtype() == paddle::DataType::FLOAT32,
           "channel scale: tensors must be float32 CPU tensors.");
  PD_CHECK(!x.shape().empty() && a.shape() == std::vector<int64_t>({x.shape().back()}),
           "channel scale: x must be [..., C] and the scale (and shift) [C].");
}

// y = x * a + (b or 0), rows of `channels` floats.
void channel_affine(const float* x, const float* a, const float* b, float* y, int64_t rows,
                    int64_t channels) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * channels;
    float* yr = y + r * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) yr[c] = xr[c] * a[c] + (b ? b[c] : 0.f);
  }
}

// dx = dy * a; da = the column sums of dy * x and db (when given) those of dy, summed in row
// order whatever the thread count.
void channel_affine_grad(const float* x, const float* a, const float* dy, float* dx, float* da,
                         float* db, int64_t rows, int64_t channels) {
  constexpr int64_t kColumns = 64;
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) dx[r * channels + c] = dy[r * channels + c] * a[c];
    }
#pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < channels; c0 += kColumns) {
      const int64_t c1 = std::min(channels, c0 + kColumns);
      std::fill(da + c0, da + c1, 0.f);
      if (db) std::fill(db + c0, db + c1, 0.f);
      for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * channels, *gr = dy + r * channels;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) da[c] += gr[c] * xr[c];
        if (db) {
#pragma omp simd
          for (int64_t c = c0; c < c1; ++c) db[c] += gr[c];
        }
      }
    }
  }
}

std::vector<paddle::Tensor> ChannelScaleForward(const paddle::Tensor& x_in, const paddle::Tensor& a_in) {
  check_channel_args(x_in, a_in);
  const paddle::Tensor x = x_in.contiguous(), a = a_in.contiguous();
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const int64_t channels = a.numel(), rows = x.numel() / std::max<int64_t>(channels, 1);
  channel_affine(x.data<float>(), a.data<float>(), nullptr, y.data<float>(), rows, channels);
  return {y};
}

std::vector<paddle::Tensor> ChannelScaleBackward(const paddle::Tensor& x_in, const paddle::Tensor& a_in,
                                                 const paddle::Tensor& dy_in) {
  const paddle::Tensor x = x_in.contiguous(), a = a_in.contiguous(), dy = dy_in.contiguous();
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto da = paddle::empty(a.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const int64_t channels = a.numel(), rows = x.numel() / std::max<int64_t>(channels, 1);
  channel_affine_grad(x.data<float>(), a.data<float>(), dy.data<float>(), dx.data<float>(),
                      da.data<float>(), nullptr, rows, channels);
  return {dx, da};
}

std::vector<paddle::Tensor> ChannelAffineForward(const paddle::Tensor& x_in, const paddle::Tensor& a_in,
                                                 const paddle::Tensor& b_in) {
  check_channel_args(x_in, a_in);
  check_channel_args(x_in, b_in);
  const paddle::Tensor x = x_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const int64_t channels = a.numel(), rows = x.numel() / std::max<int64_t>(channels, 1);
  channel_affine(x.data<float>(), a.data<float>(), b.data<float>(), y.data<float>(), rows, channels);
  return {y};
}

std::vector<paddle::Tensor> ChannelAffineBackward(const paddle::Tensor& x_in, const paddle::Tensor& a_in,
                                                  const paddle::Tensor& b_in, const paddle::Tensor& dy_in) {
  const paddle::Tensor x = x_in.contiguous(), a = a_in.contiguous(), dy = dy_in.contiguous();
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto da = paddle::empty(a.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto db = paddle::empty(b_in.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const int64_t channels = a.numel(), rows = x.numel() / std::max<int64_t>(channels, 1);
  channel_affine_grad(x.data<float>(), a.data<float>(), dy.data<float>(), dx.data<float>(),
                      da.data<float>(), db.data<float>(), rows, channels);
  return {dx, da, db};
}

std::vector<std::vector<int64_t>> FirstShape2(const std::vector<int64_t>& x,
                                              const std::vector<int64_t>&) {
  return {x};
}

// ---- layer norm over the last axis: y = (x - mean) / sqrt(var + eps) * gamma + beta ----
// Paddle's CPU kernel, and most of all its gradient, run one thread.

std::vector<paddle::Tensor> LayerNormForward(const paddle::Tensor& x_in, const paddle::Tensor& g_in,
                                             const paddle::Tensor& b_in, float epsilon) {
  check_channel_args(x_in, g_in);
  check_channel_args(x_in, b_in);
  const paddle::Tensor x = x_in.contiguous(), g = g_in.contiguous(), b = b_in.contiguous();
  const int64_t channels = g.numel(), rows = x.numel() / std::max<int64_t>(channels, 1);
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto mean = paddle::empty({rows}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto rstd = paddle::empty({rows}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = x.data<float>(), *gp = g.data<float>(), *bp = b.data<float>();
  float *yp = y.data<float>(), *mp = mean.data<float>(), *rp = rstd.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * channels;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < channels; ++c) sum += xr[c];
    const float mu = sum / channels;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < channels; ++c) squares += (xr[c] - mu) * (xr[c] - mu);
    const float inv = 1.f / std::sqrt(squares / channels + epsilon);
    float* yr = yp + r * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) yr[c] = (xr[c] - mu) * inv * gp[c] + bp[c];
    mp[r] = mu;
    rp[r] = inv;
  }
  return {y, mean, rstd};
}

// With xh = (x - mean) * rstd and h = dy * gamma per row:
// dx = rstd * (h - mean(h) - xh * mean(h * xh)); dgamma, dbeta = the column sums of dy * xh and
// dy, summed in row order whatever the thread count.
std::vector<paddle::Tensor> LayerNormBackward(const paddle::Tensor& x_in, const paddle::Tensor& g_in,
                                              const paddle::Tensor& b_in, const paddle::Tensor& mean,
                                              const paddle::Tensor& rstd, const paddle::Tensor& dy_in,
                                              float) {
  const paddle::Tensor x = x_in.contiguous(), g = g_in.contiguous(), dy = dy_in.contiguous();
  const int64_t channels = g.numel(), rows = x.numel() / std::max<int64_t>(channels, 1);
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dg = paddle::empty(g.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto db = paddle::empty(b_in.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = x.data<float>(), *gp = g.data<float>(), *dyp = dy.data<float>(),
              *mp = mean.data<float>(), *rp = rstd.data<float>();
  float *dxp = dx.data<float>(), *dgp = dg.data<float>(), *dbp = db.data<float>();
  constexpr int64_t kColumns = 64;
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < rows; ++r) {
      const float *xr = xp + r * channels, *gr = dyp + r * channels;
      const float mu = mp[r], inv = rp[r];
      float sum_h = 0.f, sum_hx = 0.f;
#pragma omp simd reduction(+ : sum_h, sum_hx)
      for (int64_t c = 0; c < channels; ++c) {
        const float h = gr[c] * gp[c];
        sum_h += h;
        sum_hx += h * (xr[c] - mu) * inv;
      }
      const float mean_h = sum_h / channels, mean_hx = sum_hx / channels;
      float* dxr = dxp + r * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c)
        dxr[c] = inv * (gr[c] * gp[c] - mean_h - (xr[c] - mu) * inv * mean_hx);
    }
#pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < channels; c0 += kColumns) {
      const int64_t c1 = std::min(channels, c0 + kColumns);
      std::fill(dgp + c0, dgp + c1, 0.f);
      std::fill(dbp + c0, dbp + c1, 0.f);
      for (int64_t r = 0; r < rows; ++r) {
        const float *xr = xp + r * channels, *gr = dyp + r * channels;
        const float mu = mp[r], inv = rp[r];
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) {
          dgp[c] += gr[c] * (xr[c] - mu) * inv;
          dbp[c] += gr[c];
        }
      }
    }
  }
  return {dx, dg, db};
}

std::vector<std::vector<int64_t>> LayerNormInferShape(const std::vector<int64_t>& x,
                                                      const std::vector<int64_t>& g,
                                                      const std::vector<int64_t>&) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) rows = x[i] < 0 ? -1 : (rows < 0 ? -1 : rows * x[i]);
  return {x, {rows}, {rows}};
}

std::vector<paddle::DataType> LayerNormDtypes(const paddle::DataType& x, const paddle::DataType&,
                                              const paddle::DataType&) {
  return {x, x, x};
}

std::vector<std::vector<int64_t>> SameShape(const std::vector<int64_t>& x) { return {x}; }

std::vector<paddle::DataType> SameDtype1(const paddle::DataType& x) { return {x}; }

std::vector<paddle::DataType> SameDtype(const paddle::DataType& x, const paddle::DataType&,
                                        const paddle::DataType&) {
  return {x};
}

std::vector<paddle::DataType> SameDtype2(const paddle::DataType& x, const paddle::DataType&) {
  return {x};
}

}  // namespace

PD_BUILD_OP(mf_depthwise_conv2d)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .Attrs({"stride: int", "padding: int"})
    .SetKernelFn(PD_KERNEL(DepthwiseConv2dForward))
    .SetInferShapeFn(PD_INFER_SHAPE(DepthwiseConv2dInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype2));

PD_BUILD_GRAD_OP(mf_depthwise_conv2d)
    .Inputs({"X", "W", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W")})
    .Attrs({"stride: int", "padding: int"})
    .SetKernelFn(PD_KERNEL(DepthwiseConv2dBackward));

PD_BUILD_OP(mf_dynamic_relu)
    .Inputs({"X", "A1", "A2"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(DynamicReluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(FirstShape3))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype));

PD_BUILD_GRAD_OP(mf_dynamic_relu)
    .Inputs({"X", "A1", "A2", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("A1"), paddle::Grad("A2")})
    .SetKernelFn(PD_KERNEL(DynamicReluBackward));

PD_BUILD_OP(mf_linear)
    .Inputs({"X", "W", "B"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(LinearForward))
    .SetInferShapeFn(PD_INFER_SHAPE(LinearInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype));

PD_BUILD_GRAD_OP(mf_linear)
    .Inputs({"X", "W", "B", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W"), paddle::Grad("B")})
    .SetKernelFn(PD_KERNEL(LinearBackward));

PD_BUILD_OP(mf_token_linear)
    .Inputs({"X", "W", "B"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(TokenLinearForward))
    .SetInferShapeFn(PD_INFER_SHAPE(TokenLinearInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype));

PD_BUILD_GRAD_OP(mf_token_linear)
    .Inputs({"X", "W", "B", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W"), paddle::Grad("B")})
    .SetKernelFn(PD_KERNEL(TokenLinearBackward));

PD_BUILD_OP(mf_gelu)
    .Inputs({"X"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(GeluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype1));

PD_BUILD_GRAD_OP(mf_gelu)
    .Inputs({"X", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(GeluBackward));

PD_BUILD_OP(mf_channel_scale)
    .Inputs({"X", "A"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(ChannelScaleForward))
    .SetInferShapeFn(PD_INFER_SHAPE(FirstShape2))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype2));

PD_BUILD_GRAD_OP(mf_channel_scale)
    .Inputs({"X", "A", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("A")})
    .SetKernelFn(PD_KERNEL(ChannelScaleBackward));

PD_BUILD_OP(mf_channel_affine)
    .Inputs({"X", "A", "B"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(ChannelAffineForward))
    .SetInferShapeFn(PD_INFER_SHAPE(FirstShape3))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype));

PD_BUILD_GRAD_OP(mf_channel_affine)
    .Inputs({"X", "A", "B", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("A"), paddle::Grad("B")})
    .SetKernelFn(PD_KERNEL(ChannelAffineBackward));

PD_BUILD_OP(mf_layer_norm)
    .Inputs({"X", "Gamma", "Beta"})
    .Outputs({"Out", "Mean", "Rstd"})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(LayerNormInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(LayerNormDtypes));

PD_BUILD_GRAD_OP(mf_layer_norm)
    .Inputs({"X", "Gamma", "Beta", "Mean", "Rstd", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Gamma"), paddle::Grad("Beta")})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNormBackward));
