// Run-time CPU feature detection for the kernels' ISA dispatch.
//
// The extension is built with portable flags only (no -march), so that one binary runs on
// any x86-64 CPU. Hot loops are compiled a second time inside functions carrying a
// __attribute__((target(...))) and picked at run time from the flags below. Non-x86 builds
// (aarch64, ...) compile only the plain C++ paths.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__)
#define FASTATTN_X86 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
// Hamming kernels: VPOPCNTQ on 8 words at once.
#define FA_TARGET_AVX512_VPOPCNT \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt")))
// hamming_topk's AVX-512 selection: VPOPCNTQ plus PEXT (BMI2) and VPCOMPRESSW (VBMI2).
#define FA_TARGET_TOPK \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt,bmi2,avx512vbmi2")))
// SimHash microkernel: FMA and compare-into-mask only need AVX-512F.
#define FA_TARGET_AVX512F __attribute__((target("avx512f,fma")))
#define FA_TARGET_AVX2 __attribute__((target("avx2,fma,popcnt")))
#define FA_TARGET_POPCNT __attribute__((target("popcnt")))
// SimHash on AMX: bf16 tile products plus the AVX-512 split, compare and fix-up around them.
#define FA_TARGET_AMX \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")))
#else
#define FASTATTN_X86 0
#endif

// Lets a generic kernel body be inlined into each ISA-specific wrapper, where it is then
// compiled (and auto-vectorised) for that wrapper's target.
#define FA_INLINE inline __attribute__((always_inline))

namespace fastattn {

// Flush-to-zero and denormals-are-zero (MXCSR FTZ | DAZ) on the calling thread for the
// guard's lifetime; the previous MXCSR comes back on destruction. A subnormal operand or
// result costs ~100 cycles per instruction on x86 (a microcode assist); kernels whose
// softmaxes produce them in bulk (MIMN's MUR softmax over a usage that grows with the
// sequence) open one guard per thread inside their parallel region. Values below
// FLT_MIN / DBL_MIN then read and compute as 0 (a difference under 1.2e-38 / 2.3e-308
// absolute). Non-x86 builds: no effect.
class FlushDenormals {
   public:
#if FASTATTN_X86
    FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
    ~FlushDenormals() { _mm_setcsr(saved_); }

   private:
    unsigned saved_;

   public:
#else
    FlushDenormals() = default;
#endif
    FlushDenormals(const FlushDenormals&) = delete;
    FlushDenormals& operator=(const FlushDenormals&) = delete;
};

struct CpuFeatures {
    bool popcnt = false;
    bool avx2 = false;
    bool fma = false;
    bool avx512f = false;
    bool avx512bw = false;
    bool avx512vl = false;
    bool avx512vpopcntdq = false;
    bool bmi2 = false;
    bool avx512vbmi2 = false;
    bool avx512bf16 = false;
    // AMX-BF16 tiles usable: CPUID, the OS saves the tile state (XCR0) and, on Linux, it
    // granted this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM).
    bool amx_bf16 = false;
    std::string isa_cap;  // value of FASTATTN_CPU_ISA, "" when unset
    bool isa_cap_valid = true;  // false: FASTATTN_CPU_ISA is none of the known levels
};

// The values FASTATTN_CPU_ISA accepts, lowest level first.
inline const char* const* isa_levels() {
    static const char* const levels[] = {"default", "popcnt", "avx2", "avx512", "amx", nullptr};
    return levels;
}

#if FASTATTN_X86
// AMX-BF16 and AVX512-BF16 from CPUID leaf 7; the tiles also need XCR0's XTILECFG and
// XTILEDATA bits and, on Linux, a one-time per-process permission for the tile data.
inline bool detect_amx_bf16(bool* avx512bf16) {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) *avx512bf16 = (a >> 5) & 1;
    unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
    if (!tile || !bf16 || !__get_cpuid(1, &a1, &b1, &c1, &d1) || !((c1 >> 27) & 1)) return false;
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) != 0) return false;
    return true;
#else
    return false;  // other OSes: not wired up
#endif
}
#endif

// What the dispatch may use: the CPU's features, capped by the environment variable
// FASTATTN_CPU_ISA = default | popcnt | avx2 | avx512 | amx (read once, at first use). The cap
// exists so that tests on a fast machine can exercise every fallback path. Any other value
// marks the features invalid (the module then refuses to load, naming the variable): a
// typo must not silently mean "no cap".
inline const CpuFeatures& cpu_features() {
    static const CpuFeatures features = [] {
        CpuFeatures f;
#if FASTATTN_X86
        // __builtin_cpu_supports also checks (via XGETBV) that the OS saves the wide
        // registers, so a "true" here is safe to execute.
        __builtin_cpu_init();
        f.popcnt = __builtin_cpu_supports("popcnt");
        f.avx2 = __builtin_cpu_supports("avx2");
        f.fma = __builtin_cpu_supports("fma");
        f.avx512f = __builtin_cpu_supports("avx512f");
        f.avx512bw = __builtin_cpu_supports("avx512bw");
        f.avx512vl = __builtin_cpu_supports("avx512vl");
        f.avx512vpopcntdq = __builtin_cpu_supports("avx512vpopcntdq");
        f.bmi2 = __builtin_cpu_supports("bmi2");
        f.avx512vbmi2 = __builtin_cpu_supports("avx512vbmi2");
        f.amx_bf16 = detect_amx_bf16(&f.avx512bf16);
#endif
        const char* cap = std::getenv("FASTATTN_CPU_ISA");
        if (cap != nullptr && *cap != '\0') {
            f.isa_cap = cap;
            int level = -1;
            for (int i = 0; isa_levels()[i] != nullptr; ++i)
                if (std::strcmp(cap, isa_levels()[i]) == 0) level = i;
            if (level < 0) {
                f.isa_cap_valid = false;
                level = 0;  // never used: the module does not load (bindings.cpp)
            }
            if (level < 4) f.amx_bf16 = false;
            if (level < 3)
                f.avx512f = f.avx512bw = f.avx512vl = f.avx512vpopcntdq = f.avx512vbmi2 =
                    f.avx512bf16 = false;
            if (level < 2) f.avx2 = f.fma = f.bmi2 = false;
            if (level < 1) f.popcnt = false;
        }
        return f;
    }();
    return features;
}

inline bool use_avx512_vpopcnt() {
    const CpuFeatures& f = cpu_features();
    return f.avx512f && f.avx512bw && f.avx512vl && f.avx512vpopcntdq && f.popcnt;
}
// Every CPU with VPOPCNTQ has BMI2 and AVX512-VBMI2 but Knights Mill (portable scan there).
inline bool use_avx512_topk() {
    const CpuFeatures& f = cpu_features();
    return use_avx512_vpopcnt() && f.bmi2 && f.avx512vbmi2;
}
inline bool use_avx512f() { return cpu_features().avx512f && cpu_features().fma; }
inline bool use_avx2() { return cpu_features().avx2 && cpu_features().fma && cpu_features().popcnt; }
inline bool use_amx_bf16() {
    const CpuFeatures& f = cpu_features();
    return f.amx_bf16 && f.avx512bf16 && f.avx512f && f.avx512bw && f.avx512vl && f.fma;
}
inline bool use_popcnt() { return cpu_features().popcnt; }

}  // namespace fastattn
