// One-token paged attention for XLA:CPU, called from jit through the typed XLA FFI.
//
// Each row walks its own pages once, in order, with an online softmax; every query head
// of a page is done while the page is in cache, and the page after next is prefetched. Rows
// are split over threads. The pool is float32 or bfloat16 (as such, or as its uint16 bits),
// a handler each; a bfloat16 key or value is widened to float32 as it is read, so the
// arithmetic is float32 either way and a bfloat16 pool halves the bytes read. Compiled at
// first use by models/cpu_kernels.py (-O3 -march=native).
//
// Letters: B rows, H query heads, K kv heads, G = H / K, D head dim, L layers, N pool
// pages, Z page size, P pages per row.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Rows = ffi::Buffer<ffi::F32, 3>;  // q, out [B, H, D]
template <ffi::DataType kType>
using Pool = ffi::Buffer<kType, 5>;  // k, v [L, N, Z, K, D]
using Index = ffi::Buffer<ffi::S32, 0>;
using Table = ffi::Buffer<ffi::S32, 2>;
using Lengths = ffi::Buffer<ffi::S32, 1>;

struct Shape {
  int64_t N, H, K, G, D, Z, P, page_elements;
};

struct Scratch {
  explicit Scratch(const Shape& s) : scores(s.H * s.Z), acc(s.H * s.D), max(s.H), sum(s.H) {}
  std::vector<float> scores, acc, max, sum;
};

// A page index from the table, clamped into the pool as XLA's gather clamps it.
inline int64_t Page(const Shape& s, const int32_t* pages, int64_t p) {
  return std::clamp<int64_t>(pages[p], 0, s.N - 1);
}

// A pool element as float32: bfloat16 is the top half of a float32's bits.
inline float Widen(float x) { return x; }
inline float Widen(uint16_t x) {
  uint32_t bits = uint32_t{x} << 16;
  float out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}

// Asks for a page's keys and values ahead of use, one 64-byte cache line at a time.
template <typename T>
inline void Prefetch(const T* k, const T* v, int64_t page, int64_t elements) {
  for (int64_t i = 0; i < elements; i += 64 / sizeof(T)) {
    __builtin_prefetch(k + page * elements + i);
    __builtin_prefetch(v + page * elements + i);
  }
}

// T: the pool's element type (float, or uint16_t holding bfloat16). kD, kG: compile-time head
// dim and group size, so the inner loops unroll and vectorize; 0 takes them from `s` at run
// time.
template <typename T, int64_t kD, int64_t kG>
void AttendRow(const Shape& s, const float* q, const T* k, const T* v,
               const int32_t* pages, int64_t start, int64_t length, float* out, Scratch& w) {
  const int64_t D = kD ? kD : s.D, G = kG ? kG : s.G;
  const int64_t K = s.K, H = K * G, Z = s.Z, F = s.page_elements;
  float* scores = w.scores.data();
  float* acc = w.acc.data();
  std::fill(acc, acc + H * D, 0.f);
  std::fill(w.max.begin(), w.max.end(), -1e30f);  // finite: -ffast-math assumes no inf
  std::fill(w.sum.begin(), w.sum.end(), 0.f);
  // Memory runs two pages ahead of the arithmetic. Keys before `start` (outside a sliding
  // window) are skipped: their pages are never read.
  const int64_t first = start / Z;
  for (int64_t p = first; p < first + 2 && p * Z < length; ++p) {
    Prefetch(k, v, Page(s, pages, p), F);
  }
  for (int64_t p = first; p * Z < length; ++p) {
    const int64_t tokens = std::min(Z, length - p * Z);
    const int64_t z0 = std::max<int64_t>(0, start - p * Z);  // the page's first visible key
    const T* kp = k + Page(s, pages, p) * F;
    const T* vp = v + Page(s, pages, p) * F;
    if ((p + 2) * Z < length) Prefetch(k, v, Page(s, pages, p + 2), F);
    for (int64_t z = z0; z < tokens; ++z) {
      for (int64_t kh = 0; kh < K; ++kh) {  // the G query heads of kv head kh share its key
        const T* key = kp + (z * K + kh) * D;
        for (int64_t h = kh * G; h < (kh + 1) * G; ++h) {
          const float* qh = q + h * D;
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += qh[d] * Widen(key[d]);
          scores[h * Z + z] = dot;
        }
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      float* sh = scores + h * Z;
      float m = w.max[h];
      for (int64_t z = z0; z < tokens; ++z) m = std::max(m, sh[z]);
      const float rescale = std::exp(w.max[h] - m);
      float total = 0.f;
      for (int64_t z = z0; z < tokens; ++z) {
        sh[z] = std::exp(sh[z] - m);
        total += sh[z];
      }
      w.max[h] = m;
      w.sum[h] = w.sum[h] * rescale + total;
      float* ah = acc + h * D;
      for (int64_t d = 0; d < D; ++d) ah[d] *= rescale;
    }
    for (int64_t z = z0; z < tokens; ++z) {
      for (int64_t kh = 0; kh < K; ++kh) {
        const T* value = vp + (z * K + kh) * D;
        for (int64_t h = kh * G; h < (kh + 1) * G; ++h) {
          const float e = scores[h * Z + z];
          float* ah = acc + h * D;
          for (int64_t d = 0; d < D; ++d) ah[d] += e * Widen(value[d]);
        }
      }
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    const float inv = w.sum[h] > 0.f ? 1.f / w.sum[h] : 0.f;  // a row of length 0 gets zeros
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = acc[h * D + d] * inv;
  }
}

template <typename T>
using RowFn = void (*)(const Shape&, const float*, const T*, const T*, const int32_t*, int64_t,
                       int64_t, float*, Scratch&);

template <typename T, int64_t kD>
RowFn<T> ForGroup(int64_t G) {
  switch (G) {
    case 1: return AttendRow<T, kD, 1>;
    case 2: return AttendRow<T, kD, 2>;
    case 3: return AttendRow<T, kD, 3>;
    case 4: return AttendRow<T, kD, 4>;
    case 8: return AttendRow<T, kD, 8>;
    default: return AttendRow<T, kD, 0>;
  }
}

template <typename T>
RowFn<T> Specialized(int64_t D, int64_t G) {
  switch (D) {
    case 64: return ForGroup<T, 64>(G);
    case 128: return ForGroup<T, 128>(G);
    case 256: return ForGroup<T, 256>(G);
    default: return AttendRow<T, 0, 0>;
  }
}

// q [B, H, D] (already scaled by 1/sqrt(D)); k, v [L, N, Z, K, D]; layer []; page_table
// [B, P]; each row attends to its keys [starts[b], lengths[b]) (a sliding window starts past
// 0; length 0 = padding row) -> out [B, H, D].
// T is the element type the kernel reads the pool buffers as (uint16_t for bfloat16).
template <ffi::DataType kType, typename T>
ffi::Error PagedDecode(Rows q, Pool<kType> k, Pool<kType> v, Index layer, Table page_table,
                       Lengths starts, Lengths lengths, ffi::Result<Rows> out) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  const int64_t B = qd[0], L = kd[0], N = kd[1];
  Shape s{N, qd[1], kd[3], 0, qd[2], kd[2], page_table.dimensions()[1], kd[2] * kd[3] * kd[4]};
  if (kd[4] != s.D || s.K == 0 || s.H % s.K != 0) {
    return ffi::Error::InvalidArgument("paged_decode: q [B, H, D] and the pool [L, N, Z, K, D] "
                                       "disagree on D, or H is not a multiple of K");
  }
  s.G = s.H / s.K;
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("paged_decode: layer out of range");
  const T* k_layer = reinterpret_cast<const T*>(k.typed_data()) + l * N * s.page_elements;
  const T* v_layer = reinterpret_cast<const T*>(v.typed_data()) + l * N * s.page_elements;
  const RowFn<T> attend = Specialized<T>(s.D, s.G);

  auto rows = [&](int64_t first, int64_t stride) {
    Scratch scratch(s);
    for (int64_t b = first; b < B; b += stride) {
      const int64_t length = std::clamp<int64_t>(lengths.typed_data()[b], 0, s.P * s.Z);
      const int64_t start = std::clamp<int64_t>(starts.typed_data()[b], 0, length);
      attend(s, q.typed_data() + b * s.H * s.D, k_layer, v_layer,
             page_table.typed_data() + b * s.P, start, length,
             out->typed_data() + b * s.H * s.D, scratch);
    }
  };
  // Rows are interleaved over threads (the runner sorts them longest first), at least four
  // rows to a thread so that starting one pays for itself.
  const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads = std::max<int64_t>(1, std::min(cores, (B + 3) / 4));
  std::vector<std::thread> helpers;
  for (int64_t t = 1; t < threads; ++t) helpers.emplace_back(rows, t, threads);
  rows(0, threads);
  for (auto& helper : helpers) helper.join();
  return ffi::Error::Success();
}

}  // namespace

#define MESHSERVE_PAGED_DECODE(name, type, element)                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (PagedDecode<type, element>),      \
                                ffi::Ffi::Bind()                         \
                                    .Arg<Rows>() /* q */                 \
                                    .Arg<Pool<type>>() /* k */           \
                                    .Arg<Pool<type>>() /* v */           \
                                    .Arg<Index>() /* layer */            \
                                    .Arg<Table>() /* page_table */       \
                                    .Arg<Lengths>() /* starts */         \
                                    .Arg<Lengths>() /* lengths */        \
                                    .Ret<Rows>()) /* out */

MESHSERVE_PAGED_DECODE(MeshservePagedDecode, ffi::F32, float);
MESHSERVE_PAGED_DECODE(MeshservePagedDecodeBf16, ffi::BF16, uint16_t);
MESHSERVE_PAGED_DECODE(MeshservePagedDecodeBf16Bits, ffi::U16, uint16_t);  // a pool kept as bits
