/* The CPU merge kernel: out = w0 + s * (left @ right) in ONE pass over the weight, for many layers per call.
 *
 * Why it exists: an adapter switch rewrites every targeted weight from its pristine copy W0. torch.addmm(W0, B, A,
 * out=W) does that in two passes (it copies W0 into W, then runs the rank-r GEMM over W), about 1.5-1.75 copies
 * of the weights. Here each row of W is read from W0 and written once, with the rank-r update added on the way
 * through registers: about one copy. Plain C, no Python API: built by setuptools (setup.py) and loaded with ctypes
 * (adapters/merge_kernel.py), which releases the GIL during the call.
 *
 * Threads: OpenMP. torch's CPU wheels bundle libgomp with the soname libgomp.so.1, and torch is always loaded
 * first, so the dynamic loader binds this library to torch's OpenMP runtime: the same (already warm) worker
 * threads run both, instead of two pools spinning against each other on the same cores.
 *
 * Layout: every tensor row-major and contiguous, float32.
 *   out, w0  (rows, cols)    left (rows, rank)    right (rank, cols)
 * Each element is computed the same way whatever the thread split (acc = sum_k left[i,k] * right[k,j] in k order,
 * then w0 + s * acc), so a result never depends on the number of threads.
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    float *out;
    const float *w0;
    const float *left;
    const float *right;
    int64_t rows, cols, rank;
    double scale;
} merge_job;

/* 16 floats: one AVX-512 register, two AVX2 ones, four SSE ones (GCC splits it for narrower targets).
 * aligned(4): rows of W need not start on a 64-byte boundary. */
typedef float vf16 __attribute__((vector_size(64), aligned(4)));

/* merge_rows body for `blocks` accumulators of 16 columns, held in registers across the k loop. More blocks hide
 * the FMA latency better but need more registers: 8 (128 columns) fit AVX-512's 32, 4 fit AVX2's 16. */
#define MERGE_ROWS_BODY(blocks)                                                                          \
    const int64_t cols = job->cols, rank = job->rank;                                                    \
    const float s = (float)job->scale;                                                                   \
    for (int64_t i = first_row; i < stop_row; i++) {                                                     \
        const float *l = job->left + i * rank; /* (rank,) */                                             \
        const float *w0 = job->w0 + i * cols;  /* (cols,) */                                             \
        float *out = job->out + i * cols;      /* (cols,) */                                             \
        int64_t j = 0;                                                                                   \
        for (; j + 16 * (blocks) <= cols; j += 16 * (blocks)) {                                          \
            vf16 acc[blocks];                                                                            \
            for (int v = 0; v < (blocks); v++) acc[v] = (vf16){0};                                       \
            for (int64_t k = 0; k < rank; k++) { /* acc (16 * blocks,) += l[k] * right[k, j:...] */      \
                const vf16 *r = (const vf16 *)(job->right + k * cols + j);                               \
                for (int v = 0; v < (blocks); v++) acc[v] += l[k] * r[v];                                \
            }                                                                                            \
            const vf16 *w = (const vf16 *)(w0 + j);                                                      \
            vf16 *o = (vf16 *)(out + j);                                                                 \
            for (int v = 0; v < (blocks); v++) o[v] = w[v] + s * acc[v];                                 \
        }                                                                                                \
        for (; j + 16 <= cols; j += 16) {                                                                \
            vf16 acc = (vf16){0};                                                                        \
            for (int64_t k = 0; k < rank; k++) acc += l[k] * *(const vf16 *)(job->right + k * cols + j); \
            *(vf16 *)(out + j) = *(const vf16 *)(w0 + j) + s * acc;                                      \
        }                                                                                                \
        for (; j < cols; j++) {                                                                          \
            float acc = 0.f;                                                                             \
            for (int64_t k = 0; k < rank; k++) acc += l[k] * job->right[k * cols + j];                   \
            out[j] = w0[j] + s * acc;                                                                    \
        }                                                                                                \
    }

typedef void (*merge_rows_fn)(const merge_job *, int64_t, int64_t);

static void merge_rows_generic(const merge_job *job, int64_t first_row, int64_t stop_row) { MERGE_ROWS_BODY(4) }

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma")))
static void merge_rows_avx2(const merge_job *job, int64_t first_row, int64_t stop_row) { MERGE_ROWS_BODY(4) }
__attribute__((target("avx512f")))
static void merge_rows_avx512(const merge_job *job, int64_t first_row, int64_t stop_row) { MERGE_ROWS_BODY(8) }

static merge_rows_fn pick_merge_rows(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return merge_rows_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return merge_rows_avx2;
    return merge_rows_generic;
}
#else
static merge_rows_fn pick_merge_rows(void) { return merge_rows_generic; }
#endif

/* The rows holding elements [start, stop) of the jobs laid end to end; a row goes to the span holding its first
 * element, so every row is done exactly once and the threads get equal numbers of elements, not of rows. */
static void merge_span(merge_rows_fn merge_rows, const merge_job *jobs, int64_t n_jobs, int64_t start,
                       int64_t stop) {
    int64_t base = 0;
    for (int64_t n = 0; n < n_jobs; n++) {
        const merge_job *job = &jobs[n];
        const int64_t cols = job->cols;
        if (job->rows <= 0 || cols <= 0) continue; /* empty: nothing to write (and no division by zero) */
        int64_t lo = start - base, hi = stop - base;
        lo = lo <= 0 ? 0 : (lo + cols - 1) / cols;
        hi = hi <= 0 ? 0 : (hi + cols - 1) / cols;
        if (hi > job->rows) hi = job->rows;
        if (lo < hi) merge_rows(job, lo, hi);
        base += job->rows * cols;
    }
}

int lora_fused_merge_abi(void) { return 1; } /* bumped whenever merge_job or the signature below changes */

void lora_fused_merge(const merge_job *jobs, int64_t n_jobs, int64_t n_threads) {
    int64_t total = 0;
    for (int64_t n = 0; n < n_jobs; n++)
        if (jobs[n].rows > 0 && jobs[n].cols > 0) total += jobs[n].rows * jobs[n].cols;
    if (n_threads < 1 || total < (1 << 15)) n_threads = 1; /* below ~128 kB a thread's wake-up costs more */
    const merge_rows_fn merge_rows = pick_merge_rows();
#pragma omp parallel num_threads((int)n_threads)
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
#else
        const int64_t t = 0, count = 1;
#endif
        merge_span(merge_rows, jobs, n_jobs, total * t / count, total * (t + 1) / count);
    }
}
