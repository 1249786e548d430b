// Fused grouped-query attention for XLA:CPU, as two XLA FFI custom calls (forward and backward).
//
// Layouts (row-major, float32): queries q [B, S, K, G, D] (K kv heads, G query heads per kv head),
// keys and values [B, T, K, D], mask [B, S, T] (true = may attend), output o like q, and the
// softmax's log-normalizer lse [B, K, G, S]. Scores are q.k * scale. A row whose mask allows no
// key softmaxes to uniform weights over all T keys, as XLA's where(mask, s, finfo.min) does, and
// passes no gradient to q or k. The backward recomputes the probabilities from lse (no [S, T]
// residual), FlashAttention-style.
//
// Work is split over the B*K (batch, kv head) pairs, run on XLA's intra-op thread pool; each pair
// writes only its own slices of every output, so results do not depend on the thread count. Per
// pair, keys and values are packed once into contiguous (and transposed) tiles, and query rows go
// in blocks of 4 against key columns in blocks of 32, skipping columns outside a row block's valid
// range (a causal mask halves the work). D must be a multiple of 16 (the Python side checks).
// Vector code uses GCC/Clang vector extensions (16 lanes; AVX-512 where the CPU has it, split into
// narrower registers elsewhere).
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int W = 16;
typedef float vf __attribute__((vector_size(64), aligned(4)));

typedef int32_t vi __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16)));

inline float hsum(vf x) {
  float s = 0.f;
  for (int u = 0; u < W; ++u) s += x[u];
  return s;
}

// exp on 16 lanes: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2; p a degree-6 polynomial (rel. error ~2e-7).
inline vf vexp(vf x) {
  const vf lo = vf{} - 87.33f, hi = vf{} + 88.37f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf*>(p) = x; }

template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& f) {
  struct State { std::atomic<int64_t> next{0}, done{0}; };
  auto st = std::make_shared<State>();
  const F* fp = &f;
  auto work = [st, n, fp]() {
    for (;;) {
      int64_t i = st->next.fetch_add(1);
      if (i >= n) return;
      (*fp)(i);
      st->done.fetch_add(1);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (st->done.load() < n) std::this_thread::yield();
}

struct Dims {
  int64_t B, S, K, G, D, T, Tp;
};

// Valid key range [lo, hi) of one query row (lo >= hi when no key is valid), skipping masked keys
// eight at a time.
inline void valid_range(const bool* m, int64_t T, int64_t* lo, int64_t* hi) {
  auto none8 = [m](int64_t j) { uint64_t w; std::memcpy(&w, m + j, 8); return w == 0; };
  int64_t a = 0, b = T;
  while (a + 8 <= T && none8(a)) a += 8;
  while (a < T && !m[a]) ++a;
  while (b - 8 >= a && none8(b - 8)) b -= 8;
  while (b > a && !m[b - 1]) --b;
  *lo = a; *hi = b;
}

// The valid key ranges of batch row b's S query positions, once per (batch, kv head) pair rather
// than once per query head.
void row_ranges(const bool* M, int64_t S, int64_t T, int64_t b, std::vector<int64_t>& out) {
  out.resize(2 * S);
  for (int64_t i = 0; i < S; ++i) valid_range(M + (b * S + i) * T, T, &out[2 * i], &out[2 * i + 1]);
}

// scores[r][j] = sum_d rows[r][d] * kt[d][j] for j in [j0, j1) (multiples of W), r < nr <= 4.
inline void row_block_dot(const float* const* rows, int nr, const float* kt, int64_t Tp, int64_t D,
                          int64_t j0, int64_t j1, float* out, int64_t ostride) {
  for (int64_t c = j0; c < j1; c += 2 * W) {
    bool two = c + W < j1;
    vf a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
    for (int64_t d = 0; d < D; ++d) {
      vf k0 = load(kt + d * Tp + c);
      vf k1 = two ? load(kt + d * Tp + c + W) : vf{};
      float q0 = rows[0][d], q1 = nr > 1 ? rows[1][d] : 0.f, q2 = nr > 2 ? rows[2][d] : 0.f,
            q3 = nr > 3 ? rows[3][d] : 0.f;
      a0 += q0 * k0; a1 += q1 * k0; a2 += q2 * k0; a3 += q3 * k0;
      b0 += q0 * k1; b1 += q1 * k1; b2 += q2 * k1; b3 += q3 * k1;
    }
    vf as[4] = {a0, a1, a2, a3}, bs[4] = {b0, b1, b2, b3};
    for (int r = 0; r < nr; ++r) {
      store(out + r * ostride + c, as[r]);
      if (two) store(out + r * ostride + c + W, bs[r]);
    }
  }
}

// out_r[d] = sum_j w[r][j] * x[j][d] for r < nr <= 4, j in [j0, je); x rows of D floats.
inline void block_weighted_sum(const float* w, int64_t wstride, int nr, const float* x, int64_t D, int64_t j0,
                               int64_t je, float* const* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 4 * W) {
    int nv = (int)std::min<int64_t>(4, (D - d0) / W);
    vf acc[4][4] = {};
    if (nv == 4) {
      for (int64_t j = j0; j < je; ++j) {
        const float* xr = x + j * D + d0;
        vf x0 = load(xr), x1 = load(xr + W), x2 = load(xr + 2 * W), x3 = load(xr + 3 * W);
        for (int r = 0; r < 4; ++r) {
          float c = r < nr ? w[r * wstride + j] : 0.f;
          acc[r][0] += c * x0; acc[r][1] += c * x1; acc[r][2] += c * x2; acc[r][3] += c * x3;
        }
      }
    } else {
      for (int64_t j = j0; j < je; ++j)
        for (int r = 0; r < nr; ++r)
          for (int u = 0; u < nv; ++u) acc[r][u] += w[r * wstride + j] * load(x + j * D + d0 + u * W);
    }
    for (int r = 0; r < nr; ++r)
      for (int u = 0; u < nv; ++u) store(out[r] + d0 + u * W, acc[r][u]);
  }
}

// out[j][d0 + ...] for the nj <= 4 keys j of the tile at jt: sum over rows r of c[r][j] * x_r[d0 + ...],
// visiting only the 4-row blocks whose key range [ranges[2b], ranges[2b+1]) holds the tile (c is
// written only there; tiles and ranges are aligned so a tile is wholly inside or outside).
template <int NV>
inline void key_tile_nv(const float* c, int64_t Tp, const float* const* x, const int64_t* ranges, int64_t R,
                        int64_t jt, int nj, int64_t d0, float* out, int64_t ostride) {
  vf acc[4][NV] = {};
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    if (ranges[r0 / 2] > jt || ranges[r0 / 2 + 1] <= jt) continue;
    for (int64_t r = r0; r < std::min(R, r0 + 4); ++r) {
      vf xv[NV];
      for (int u = 0; u < NV; ++u) xv[u] = load(x[r] + d0 + u * W);
      const float* cr = c + r * Tp + jt;
      float c0 = cr[0], c1 = cr[1], c2 = cr[2], c3 = cr[3];
      for (int u = 0; u < NV; ++u) {
        acc[0][u] += c0 * xv[u]; acc[1][u] += c1 * xv[u]; acc[2][u] += c2 * xv[u]; acc[3][u] += c3 * xv[u];
      }
    }
  }
  for (int jj = 0; jj < nj; ++jj)
    for (int u = 0; u < NV; ++u) store(out + (jt + jj) * ostride + d0 + u * W, acc[jj][u]);
}

inline void key_tile(const float* c, int64_t Tp, const float* const* x, const int64_t* ranges, int64_t R, int64_t jt,
                     int nj, int64_t d0, int nv, float* out, int64_t ostride) {
  switch (nv) {
    case 1: return key_tile_nv<1>(c, Tp, x, ranges, R, jt, nj, d0, out, ostride);
    case 2: return key_tile_nv<2>(c, Tp, x, ranges, R, jt, nj, d0, out, ostride);
    case 3: return key_tile_nv<3>(c, Tp, x, ranges, R, jt, nj, d0, out, ostride);
    default: return key_tile_nv<4>(c, Tp, x, ranges, R, jt, nj, d0, out, ostride);
  }
}

struct Task {
  // per-thread scratch
  std::vector<float> kt, vt, kk, vv, s, p, dp, delta;
  std::vector<const float*> rows, drows;
  std::vector<int64_t> ranges, valid;
};

thread_local Task scratch;

// Row (b, i, kh, g) of a [B, S, K, G, D] array (q, o, do, dq), and the (b, kh, g, i) entry of lse [B, K, G, S].
template <class T>
inline T* qptr(T* q, const Dims& z, int64_t b, int64_t i, int64_t kh, int64_t g) {
  return q + (((b * z.S + i) * z.K + kh) * z.G + g) * z.D;
}

inline int64_t lse_index(const Dims& z, int64_t b, int64_t i, int64_t kh, int64_t g) {
  return ((b * z.K + kh) * z.G + g) * z.S + i;
}

// A block of up to 4 query rows r0.. of a (batch, kv head) pair: each row's head g and position i,
// mask row and valid key range [lo, hi), and the key columns [j0, j1) the block computes (multiples
// of 2W within Tp, covering every valid key; all T keys where a row has none).
struct RowBlock {
  int nr;
  int64_t g[4], i[4], lo[4], hi[4], j0, j1, je;
  const bool* ms[4];
};

// `valid`: the ranges of batch row b's positions (row_ranges).
inline RowBlock row_block(const bool* M, const Dims& z, int64_t b, int64_t r0, const int64_t* valid) {
  RowBlock k;
  k.nr = (int)std::min<int64_t>(4, z.G * z.S - r0);
  int64_t jlo = z.T, jhi = 0;
  for (int r = 0; r < k.nr; ++r) {
    k.g[r] = (r0 + r) / z.S; k.i[r] = (r0 + r) % z.S;
    k.ms[r] = M + (b * z.S + k.i[r]) * z.T;
    k.lo[r] = valid[2 * k.i[r]]; k.hi[r] = valid[2 * k.i[r] + 1];
    if (k.lo[r] >= k.hi[r]) { jlo = 0; jhi = z.T; }
    else { jlo = std::min(jlo, k.lo[r]); jhi = std::max(jhi, k.hi[r]); }
  }
  k.j0 = jlo / (2 * W) * (2 * W);
  k.j1 = std::min(z.Tp, (jhi + 2 * W - 1) / (2 * W) * (2 * W));
  if (k.j1 <= k.j0) k.j1 = k.j0 + 2 * W;
  k.je = std::min(k.j1, z.T);
  return k;
}

inline Dims dims_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return Dims{qd[0], qd[1], qd[2], qd[3], qd[4], kd[1], (kd[1] + 2 * W - 1) / (2 * W) * (2 * W)};
}

void pack(const float* src, const Dims& z, int64_t b, int64_t kh, std::vector<float>& rows,
          std::vector<float>* cols) {
  rows.resize(z.Tp * z.D);
  if (cols) cols->resize(z.D * z.Tp);
  for (int64_t j = 0; j < z.T; ++j) {
    const float* r = src + ((b * z.T + j) * z.K + kh) * z.D;
    std::memcpy(rows.data() + j * z.D, r, z.D * sizeof(float));
    if (cols)
      for (int64_t d = 0; d < z.D; ++d) (*cols)[d * z.Tp + j] = r[d];
  }
  // zeros in the padding keys T..Tp (their scores are masked; their values must not be NaN garbage)
  std::fill(rows.begin() + z.T * z.D, rows.end(), 0.f);
  if (cols)
    for (int64_t d = 0; d < z.D; ++d) std::fill(cols->begin() + d * z.Tp + z.T, cols->begin() + (d + 1) * z.Tp, 0.f);
}

// Softmax rows: p = exp(scale*s - lse) on valid keys, 0 elsewhere; uniform 1/T where no key is valid.
// With `lse_out`, computes and stores lse; otherwise reads `lse_in`.
void probs(float* s, float* p, const bool* m, int64_t lo, int64_t hi, int64_t j0, int64_t j1, int64_t T,
           float scale, float* lse_out, float lse_in) {
  if (lo >= hi) {  // no valid key: XLA's where(mask, s, min) softmaxes to uniform
    for (int64_t j = j0; j < j1; ++j) p[j] = j < T ? 1.f / T : 0.f;
    if (lse_out) *lse_out = -FLT_MAX;
    return;
  }
  // masked (and padding) columns to -inf, in place, scaled; 16 at a time inside [lo, hi)
  const vf ninf = vf{} - INFINITY;
  for (int64_t j = j0; j < j1; j += W) {
    if (j + W <= lo || j >= hi) {
      store(s + j, ninf);
    } else if (j >= lo && j + W <= hi) {
      vb bytes;
      std::memcpy(&bytes, m + j, W);
      vi keep = __builtin_convertvector(bytes, vi) != 0;
      store(s + j, keep ? load(s + j) * scale : ninf);
    } else {
      for (int64_t u = j; u < j + W; ++u) s[u] = (u >= lo && u < hi && m[u]) ? s[u] * scale : -INFINITY;
    }
  }
  if (lse_out) {  // forward: p = exp(s - max) / sum, and lse = max + log(sum)
    vf mx = vf{} - INFINITY;
    for (int64_t j = j0; j < j1; j += W) { vf x = load(s + j); mx = x > mx ? x : mx; }
    float m1 = -INFINITY;
    for (int u = 0; u < W; ++u) m1 = std::max(m1, mx[u]);
    vf acc = {};
    for (int64_t j = j0; j < j1; j += W) {
      vf x = load(s + j);
      vf e = x == -INFINITY ? vf{} : vexp(x - m1);
      store(p + j, e);
      acc += e;
    }
    float sum = 0.f;
    for (int u = 0; u < W; ++u) sum += acc[u];
    *lse_out = m1 + std::log(sum);
    float inv = 1.f / sum;
    for (int64_t j = j0; j < j1; j += W) store(p + j, load(p + j) * inv);
    return;
  }
  for (int64_t j = j0; j < j1; j += W) {  // backward: p = exp(s - lse)
    vf x = load(s + j);
    store(p + j, x == -INFINITY ? vf{} : vexp(x - lse_in));
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse, float scale) {
  Dims z = dims_of(q, k);
  if (z.D % W) return ffi::Error::InvalidArgument("head_dim must be a multiple of 16");
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *Vp = v.typed_data();
  const bool* M = mask.typed_data();
  float *O = o->typed_data(), *L = lse->typed_data();
  auto task = [&](int64_t t) {
    int64_t b = t / z.K, kh = t % z.K;
    Task& w = scratch;
    row_ranges(M, z.S, z.T, b, w.valid);
    pack(Kp, z, b, kh, w.kk, &w.kt);
    pack(Vp, z, b, kh, w.vv, nullptr);
    w.s.resize(4 * z.Tp); w.p.resize(4 * z.Tp);
    for (int64_t r0 = 0; r0 < z.G * z.S; r0 += 4) {
      RowBlock k = row_block(M, z, b, r0, w.valid.data());
      const float* rows[4];
      float* outs[4];
      for (int r = 0; r < k.nr; ++r) {
        rows[r] = qptr(Q, z, b, k.i[r], kh, k.g[r]);
        outs[r] = qptr(O, z, b, k.i[r], kh, k.g[r]);
      }
      row_block_dot(rows, k.nr, w.kt.data(), z.Tp, z.D, k.j0, k.j1, w.s.data(), z.Tp);
      for (int r = 0; r < k.nr; ++r)
        probs(w.s.data() + r * z.Tp, w.p.data() + r * z.Tp, k.ms[r], k.lo[r], k.hi[r], k.j0, k.j1, z.T, scale,
              L + lse_index(z, b, k.i[r], kh, k.g[r]), 0.f);
      block_weighted_sum(w.p.data(), z.Tp, k.nr, w.vv.data(), z.D, k.j0, k.je, outs);
    }
  };
  parallel_for(pool, z.B * z.K, task);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> o,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, float scale) {
  Dims z = dims_of(q, k);
  if (z.D % W) return ffi::Error::InvalidArgument("head_dim must be a multiple of 16");
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *Vp = v.typed_data(), *O = o.typed_data(),
              *L = lse.typed_data(), *DO = dout.typed_data();
  const bool* M = mask.typed_data();
  float *DQ = dq->typed_data(), *DK = dk->typed_data(), *DV = dv->typed_data();
  auto task = [&](int64_t t) {
    int64_t b = t / z.K, kh = t % z.K;
    Task& w = scratch;
    row_ranges(M, z.S, z.T, b, w.valid);
    pack(Kp, z, b, kh, w.kk, &w.kt);
    pack(Vp, z, b, kh, w.vv, &w.vt);
    int64_t R = z.G * z.S, nb = (R + 3) / 4;
    // Phase 1, per block of 4 query rows: probabilities P and dS (scaled) into R x Tp buffers over
    // the block's key range [j0, j1), and dq = dS @ K.
    w.s.resize(R * z.Tp); w.p.resize(R * z.Tp); w.dp.resize(4 * z.Tp);
    w.rows.resize(R); w.drows.resize(R); w.ranges.resize(2 * nb);
    // rowsum(dO * O) of every row first, in one tight pass (the O rows are read nowhere else)
    w.delta.resize(R);
    for (int64_t i = 0; i < z.S; ++i)
      for (int64_t g = 0; g < z.G; ++g) {
        const float *orow = qptr(O, z, b, i, kh, g), *dorow = qptr(DO, z, b, i, kh, g);
        vf acc = {};
        for (int64_t d = 0; d < z.D; d += W) acc += load(dorow + d) * load(orow + d);
        w.delta[g * z.S + i] = hsum(acc);
      }
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      RowBlock k = row_block(M, z, b, r0, w.valid.data());
      float* dqs[4];
      for (int r = 0; r < k.nr; ++r) {
        w.rows[r0 + r] = qptr(Q, z, b, k.i[r], kh, k.g[r]);
        w.drows[r0 + r] = qptr(DO, z, b, k.i[r], kh, k.g[r]);
        dqs[r] = qptr(DQ, z, b, k.i[r], kh, k.g[r]);
      }
      w.ranges[r0 / 2] = k.j0; w.ranges[r0 / 2 + 1] = k.j1;
      float* S = w.s.data() + r0 * z.Tp;
      float* P = w.p.data() + r0 * z.Tp;
      row_block_dot(&w.rows[r0], k.nr, w.kt.data(), z.Tp, z.D, k.j0, k.j1, S, z.Tp);
      row_block_dot(&w.drows[r0], k.nr, w.vt.data(), z.Tp, z.D, k.j0, k.j1, w.dp.data(), z.Tp);
      for (int r = 0; r < k.nr; ++r) {
        float* pr = P + r * z.Tp;
        probs(S + r * z.Tp, pr, k.ms[r], k.lo[r], k.hi[r], k.j0, k.j1, z.T, scale, nullptr,
              L[lse_index(z, b, k.i[r], kh, k.g[r])]);
        float delta = w.delta[r0 + r];
        float* ds = S + r * z.Tp;  // dS * scale, in place of the scores
        const float* dpr = w.dp.data() + r * z.Tp;
        bool none = k.lo[r] >= k.hi[r];
        for (int64_t j = k.j0; j < k.j1; ++j) ds[j] = none ? 0.f : pr[j] * (dpr[j] - delta) * scale;
      }
      block_weighted_sum(S, z.Tp, k.nr, w.kk.data(), z.D, k.j0, k.je, dqs);
    }
    // Phase 2, per tile of 4 keys: dk = dSᵀ q and dv = Pᵀ do over the row blocks that reach it.
    float* dk_base = DK + (b * z.T * z.K + kh) * z.D;
    float* dv_base = DV + (b * z.T * z.K + kh) * z.D;
    for (int64_t jt = 0; jt < z.T; jt += 4) {
      int nj = (int)std::min<int64_t>(4, z.T - jt);
      for (int64_t d0 = 0; d0 < z.D; d0 += 4 * W) {
        int nv = (int)std::min<int64_t>(4, (z.D - d0) / W);
        key_tile(w.s.data(), z.Tp, w.rows.data(), w.ranges.data(), R, jt, nj, d0, nv, dk_base, z.K * z.D);
        key_tile(w.p.data(), z.Tp, w.drows.data(), w.ranges.data(), R, jt, nj, d0, nv, dv_base, z.K * z.D);
      }
    }
  };
  parallel_for(pool, z.B * z.K, task);
  return ffi::Error::Success();
}

}  // namespace

// Both calls take (q, k, v, mask, ...) on XLA's intra-op thread pool, with the score scale.
using F32 = ffi::Buffer<ffi::F32>;
inline auto bind_qkv_mask() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<ffi::Buffer<ffi::PRED>>();
}

// (q, k, v, mask) -> (o, lse)
XLA_FFI_DEFINE_HANDLER_SYMBOL(BdjaxAttentionForward, Forward,
                              bind_qkv_mask().Ret<F32>().Ret<F32>().Attr<float>("scale"));

// (q, k, v, mask, o, lse, do) -> (dq, dk, dv)
XLA_FFI_DEFINE_HANDLER_SYMBOL(BdjaxAttentionBackward, Backward,
                              bind_qkv_mask().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Ret<F32>().Ret<F32>().Ret<F32>().Attr<float>("scale"));
