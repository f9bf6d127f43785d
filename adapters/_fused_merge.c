/* The CPU merge kernel: out = w0 + s * (left @ right) in ONE pass over the weight, for many layers per call.
 *
 * Why it exists: an adapter switch rewrites every targeted weight from its pristine copy W0. torch.addmm(W0, B, A,
 * out=W) does that in two passes (it copies W0 into W, then runs the rank-r GEMM over W), about 1.5-1.75 copies
 * of the weights. Here each row of W is read from W0 and written once, with the rank-r update added on the way
 * through registers. A switch larger than the last-level cache writes with streaming stores (no read of the
 * destination before it is overwritten, as memcpy does for large buffers) and prefetches W0 ahead of the
 * arithmetic. Plain C, no Python API: built by setuptools (setup.py) and loaded with ctypes
 * (adapters/merge_kernel.py), which releases the GIL during the call.
 *
 * Threads: OpenMP. torch's CPU wheels bundle libgomp with the soname libgomp.so.1, and torch is always loaded
 * first, so the dynamic loader binds this library to torch's OpenMP runtime: the same (already warm) worker
 * threads run both, instead of two pools spinning against each other on the same cores.
 *
 * Layout: every tensor row-major and contiguous; out and w0 float32 or bfloat16 (`dtype`), the factors always
 * float32 (for bfloat16 weights the caller widens the small factors once, so the inner loop never converts).
 *   out, w0  (rows, cols)    left (rows, rank)    right (rank, cols)
 * Each element is computed the same way whatever the thread split (acc = sum_k left[i,k] * right[k,j] in k order,
 * in float32, then w0 + s * acc, rounded once to the output's dtype, to nearest even for bfloat16), so a result
 * never depends on the number of threads.
 */
#include <stdint.h>
#include <unistd.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };

typedef struct {
    void *out;
    const void *w0;
    const void *left;
    const void *right;
    int64_t rows, cols, rank;
    double scale;
    int64_t dtype; /* DTYPE_* */
} merge_job;

/* 16 floats: one AVX-512 register, two AVX2 ones, four SSE ones (GCC splits it for narrower targets).
 * aligned(4) / aligned(2): rows of W need not start on a 64-byte boundary. */
typedef float vf16 __attribute__((vector_size(64), aligned(4)));
typedef uint32_t vu32 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t vh16 __attribute__((vector_size(32), aligned(2)));

/* Element access, float32: plain loads and stores. */
#define F32_LOADV(p) (*(const vf16 *)(p))
#define F32_STOREV(p, v) (*(vf16 *)(p) = (v))
#define F32_LOAD(p) (*(p))
#define F32_STORE(p, x) (*(p) = (x))

/* bfloat16 is the top half of a float32: widening is a shift; narrowing rounds to nearest even, and a NaN stays
 * a (quiet) NaN instead of rounding into infinity. */
static inline __attribute__((always_inline)) vf16 bf16_loadv(const uint16_t *p) {
    return (vf16)(__builtin_convertvector(*(const vh16 *)p, vu32) << 16);
}
static inline __attribute__((always_inline)) void bf16_storev(uint16_t *p, vf16 f) {
    const vu32 bits = (vu32)f;
    const vu32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const vu32 nan = (vu32)(f != f); /* all ones where f is NaN */
    *(vh16 *)p = __builtin_convertvector((rounded & ~nan) | (((bits >> 16) | 0x40u) & nan), vh16);
}
static inline __attribute__((always_inline)) float bf16_load(const uint16_t *p) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)*p << 16};
    return v.f;
}
static inline __attribute__((always_inline)) void bf16_store(uint16_t *p, float x) {
    union { float f; uint32_t u; } v = {.f = x};
    *p = x != x ? (uint16_t)((v.u >> 16) | 0x40u) : (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

#define PREFETCH_BYTES 4096

/* merge_rows body for `blocks` accumulators of 16 columns, held in registers across the k loop (float32 whatever
 * the weights' storage type T, read and written through LOADV/STOREV/LOAD/STORE, or STREAMV when `stream`). More
 * blocks hide the FMA latency better but need more registers: 8 (128 columns) fit AVX-512's 32, 4 fit AVX2's 16. */

#define MERGE_ROWS_BODY(blocks, T, LOADV, STOREV, STREAMV, LOAD, STORE)                                 \
    const int64_t cols = job->cols, rank = job->rank;                                                    \
    const float s = (float)job->scale;                                                                   \
    const float *left = job->left, *right = job->right;                                                  \
    for (int64_t i = first_row; i < stop_row; i++) {                                                     \
        const float *l = left + i * rank;                    /* (rank,) */                               \
        const T *w0 = (const T *)job->w0 + i * cols;         /* (cols,) */                               \
        T *out = (T *)job->out + i * cols;                   /* (cols,) */                               \
        /* Streaming stores need 64-byte aligned vectors: a row that does not start on a cache line keeps  \
         * plain stores (same arithmetic, so the same bits either way). */                               \
        const int nt = stream && ((uintptr_t)out & 63) == 0;                                             \
        int64_t j = 0;                                                                                   \
        for (; j + 16 * (blocks) <= cols; j += 16 * (blocks)) {                                          \
            /* W0 4 kB ahead (into this row's rest or the next row's start), into L2: the hardware          \
             * prefetcher alone leaves the core waiting on memory between the blocks' FMAs. */              \
            for (int v = 0; v < 16 * (blocks); v += 64 / (int)sizeof(T))                                 \
                __builtin_prefetch((const char *)(w0 + j + v) + PREFETCH_BYTES, 0, 1);                   \
            vf16 acc[blocks];                                                                            \
            for (int v = 0; v < (blocks); v++) acc[v] = (vf16){0};                                       \
            for (int64_t k = 0; k < rank; k++) { /* acc (16 * blocks,) += l[k] * right[k, j:...] */      \
                const vf16 *r = (const vf16 *)(right + k * cols + j);                                    \
                for (int v = 0; v < (blocks); v++) acc[v] += l[k] * r[v];                                \
            }                                                                                            \
            if (nt)                                                                                      \
                for (int v = 0; v < (blocks); v++) STREAMV(out + j + 16 * v, LOADV(w0 + j + 16 * v) + s * acc[v]); \
            else                                                                                         \
                for (int v = 0; v < (blocks); v++) STOREV(out + j + 16 * v, LOADV(w0 + j + 16 * v) + s * acc[v]); \
        }                                                                                                \
        for (; j + 16 <= cols; j += 16) {                                                                \
            vf16 acc = (vf16){0};                                                                        \
            for (int64_t k = 0; k < rank; k++) acc += l[k] * *(const vf16 *)(right + k * cols + j);      \
            if (nt) STREAMV(out + j, LOADV(w0 + j) + s * acc); else STOREV(out + j, LOADV(w0 + j) + s * acc); \
        }                                                                                                \
        for (; j < cols; j++) {                                                                          \
            float acc = 0.f;                                                                             \
            for (int64_t k = 0; k < rank; k++) acc += l[k] * right[k * cols + j];                        \
            STORE(out + j, LOAD(w0 + j) + s * acc);                                                      \
        }                                                                                                \
    }

typedef void (*merge_rows_fn)(const merge_job *, int64_t, int64_t, int);

#define DEFINE_MERGE_ROWS(name, attributes, blocks, F32_STREAMV, BF16_STREAMV)                           \
    attributes static void name##_f32(const merge_job *job, int64_t first_row, int64_t stop_row, int stream) { \
        MERGE_ROWS_BODY(blocks, float, F32_LOADV, F32_STOREV, F32_STREAMV, F32_LOAD, F32_STORE)          \
    }                                                                                                    \
    attributes static void name##_bf16(const merge_job *job, int64_t first_row, int64_t stop_row, int stream) { \
        MERGE_ROWS_BODY(blocks, uint16_t, bf16_loadv, bf16_storev, BF16_STREAMV, bf16_load, bf16_store)  \
    }

DEFINE_MERGE_ROWS(merge_rows_generic, , 4, F32_STOREV, bf16_storev) /* no streaming stores in portable C */

/* The kernel for this CPU, per dtype: AVX-512, else AVX2 + FMA, else whatever the compiler's baseline is. */
typedef struct { merge_rows_fn f32, bf16; } merge_rows_table;

#if defined(__x86_64__) && defined(__GNUC__)
/* Streaming (non-temporal) stores write whole cache lines to memory without first reading them into the cache
 * (the write-allocate read a plain store pays): the same bytes, one memory read fewer per line. Callers pass
 * 64-byte aligned pointers. */
static inline __attribute__((always_inline, target("avx2"))) void f32_streamv_avx2(float *p, vf16 v) {
    _mm256_stream_ps(p, (__m256)__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_stream_ps(p + 8, (__m256)__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}
static inline __attribute__((always_inline, target("avx512f"))) void f32_streamv_avx512(float *p, vf16 v) {
    _mm512_stream_ps(p, (__m512)v);
}
/* bf16_storev's rounding, then one 32-byte streaming store (16 bfloat16 values: half a line, 32-byte aligned). */
#define DEFINE_BF16_STREAMV(name, target_isa)                                                            \
    static inline __attribute__((always_inline, target(target_isa))) void name(uint16_t *p, vf16 f) {    \
        const vu32 bits = (vu32)f;                                                                       \
        const vu32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;                               \
        const vu32 nan = (vu32)(f != f);                                                                 \
        const vh16 h = __builtin_convertvector((rounded & ~nan) | (((bits >> 16) | 0x40u) & nan), vh16);  \
        _mm256_stream_si256((__m256i *)p, (__m256i)h);                                                   \
    }
DEFINE_BF16_STREAMV(bf16_streamv_avx2, "avx2")
DEFINE_BF16_STREAMV(bf16_streamv_avx512, "avx512f,avx512bw")

DEFINE_MERGE_ROWS(merge_rows_avx2, __attribute__((target("avx2,fma"))), 4, f32_streamv_avx2, bf16_streamv_avx2)
DEFINE_MERGE_ROWS(merge_rows_avx512, __attribute__((target("avx512f,avx512bw"))), 8, f32_streamv_avx512,
                  bf16_streamv_avx512)

static merge_rows_table pick_merge_rows(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        return (merge_rows_table){merge_rows_avx512_f32, merge_rows_avx512_bf16};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return (merge_rows_table){merge_rows_avx2_f32, merge_rows_avx2_bf16};
    return (merge_rows_table){merge_rows_generic_f32, merge_rows_generic_bf16};
}
#else
static merge_rows_table pick_merge_rows(void) {
    return (merge_rows_table){merge_rows_generic_f32, merge_rows_generic_bf16};
}
#endif

/* The rows holding elements [start, stop) of the jobs laid end to end; a row goes to the span holding its first
 * element, so every row is done exactly once and the threads get equal numbers of elements, not of rows. */
static void merge_span(merge_rows_table kernels, const merge_job *jobs, int64_t n_jobs, int64_t start,
                       int64_t stop, int stream) {
    int64_t base = 0;
    for (int64_t n = 0; n < n_jobs; n++) {
        const merge_job *job = &jobs[n];
        const int64_t cols = job->cols;
        if (job->rows <= 0 || cols <= 0) continue; /* empty: nothing to write (and no division by zero) */
        int64_t lo = start - base, hi = stop - base;
        lo = lo <= 0 ? 0 : (lo + cols - 1) / cols;
        hi = hi <= 0 ? 0 : (hi + cols - 1) / cols;
        if (hi > job->rows) hi = job->rows;
        if (lo < hi) (job->dtype == DTYPE_BFLOAT16 ? kernels.bf16 : kernels.f32)(job, lo, hi, stream);
        base += job->rows * cols;
    }
}

int lora_fused_merge_abi(void) { return 3; } /* bumped whenever merge_job or the signatures below change */

/* Calls that write more than this many bytes in all use streaming stores; -1: the last-level cache's size.
 * Below it the written weights may still be in the cache for the next forward pass, above it they cannot be,
 * and the write-allocate reads only cost memory bandwidth. */
static int64_t stream_min_bytes = -1;

int64_t lora_fused_merge_set_stream_min(int64_t bytes) {
    const int64_t before = stream_min_bytes;
    stream_min_bytes = bytes;
    return before;
}

static int64_t stream_threshold(void) {
    if (stream_min_bytes >= 0) return stream_min_bytes;
#ifdef _SC_LEVEL3_CACHE_SIZE
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l3 > 0) return l3;
#endif
    return (int64_t)32 << 20; /* unknown: a typical server LLC */
}

void lora_fused_merge(const merge_job *jobs, int64_t n_jobs, int64_t n_threads) {
    int64_t total = 0, bytes = 0;
    for (int64_t n = 0; n < n_jobs; n++)
        if (jobs[n].rows > 0 && jobs[n].cols > 0) {
            total += jobs[n].rows * jobs[n].cols;
            bytes += jobs[n].rows * jobs[n].cols * (jobs[n].dtype == DTYPE_BFLOAT16 ? 2 : 4);
        }
    if (n_threads < 1 || total < (1 << 15)) n_threads = 1; /* below ~128 kB a thread's wake-up costs more */
    const merge_rows_table kernels = pick_merge_rows();
    const int stream = bytes > stream_threshold();
#pragma omp parallel num_threads((int)n_threads)
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
#else
        const int64_t t = 0, count = 1;
#endif
        merge_span(kernels, jobs, n_jobs, total * t / count, total * (t + 1) / count, stream);
#if defined(__x86_64__) && defined(__GNUC__)
        if (stream) _mm_sfence(); /* streaming stores are weakly ordered: drain them before the threads join */
#endif
    }
}
