// Streaming (non-temporal) stores for the CPU kernels' write-only outputs, shared by the op loops (loops.h)
// and the fused-step loops (step_loops.h). SSE2 only, which every x86-64 CPU has: compiled once for the
// baseline instruction set, so the AVX2 variants can inline it without the linker ever sharing an AVX2 body
// with code that runs on CPUs without AVX2. Elsewhere the functions fall back to memcpy/memset.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define FP_HAVE_STREAM_STORES 1
#endif

namespace fastperturb {
namespace cpu {

// A chunk's write-only output (the backup written by ascent_step_(first=True), restore_'s copy, zeroed
// gradients) of at least this many bytes is written with streaming stores. A plain store first reads the
// destination line from memory (read for ownership), so a write-only stream costs two passes of memory
// traffic instead of one: streaming stores make the backup write and restore_'s copy cost what the byte
// model counts. Smaller outputs (a list of small tensors, which may stay in cache for the next op) keep
// plain stores. The choice moves bits exactly like memcpy: results are the same either way.
constexpr int64_t kStreamMinBytes = int64_t(64) * 1024;

// Where a kernel streams a block it computed (or copied) beside its other work, the block's size: the streamed
// stores then interleave finely with the loop's loads (1 KB measured faster than 4 KB: docs/design.md §5.1).
constexpr int64_t kStreamBlockBytes = 1024;

// Orders the streaming stores before everything after it, so the data is visible to whichever thread reads
// it next. Once per kernel call, after its last streaming store.
inline void stream_fence() {
#ifdef FP_HAVE_STREAM_STORES
  _mm_sfence();
#endif
}

// memcpy whose stores bypass the cache (see kStreamMinBytes); stream_fence() must follow. Any alignment:
// the destination is aligned to 16 bytes by a short memcpy head, the source is loaded unaligned.
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
#ifdef FP_HAVE_STREAM_STORES
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(bytes, (16 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(d) % 16)) % 16);
  std::memcpy(d, s, static_cast<size_t>(head));
  d += head, s += head, bytes -= head;
  const int64_t body = bytes - bytes % 64;
  for (int64_t i = 0; i < body; i += 64) {
    const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i v2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i v3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), v0);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), v1);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), v2);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), v3);
  }
  std::memcpy(d + body, s + body, static_cast<size_t>(bytes - body));
#else
  std::memcpy(dst, src, static_cast<size_t>(bytes));
#endif
}

// memset(dst, 0, bytes) with streaming stores, as stream_copy (stream_fence() must follow).
inline void stream_zero(void* dst, int64_t bytes) {
#ifdef FP_HAVE_STREAM_STORES
  char* d = static_cast<char*>(dst);
  const int64_t head = std::min<int64_t>(bytes, (16 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(d) % 16)) % 16);
  std::memset(d, 0, static_cast<size_t>(head));
  d += head, bytes -= head;
  const int64_t body = bytes - bytes % 64;
  const __m128i z = _mm_setzero_si128();
  for (int64_t i = 0; i < body; i += 64) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), z);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), z);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), z);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), z);
  }
  std::memset(d + body, 0, static_cast<size_t>(bytes - body));
#else
  std::memset(dst, 0, static_cast<size_t>(bytes));
#endif
}

}  // namespace cpu
}  // namespace fastperturb
