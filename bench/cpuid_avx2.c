/* cpuid_avx2.so: make a process see an AVX2-only x86-64 CPU (no AVX-512, no AMX, no AVX-VNNI).
 *
 * Why: ECSEARCH_CPU_ISA / ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA cap ecsearch, torch and
 * oneDNN, but ONNX Runtime's MLAS (and OpenBLAS, faiss, ...) pick their kernels from CPUID
 * and have no knob. Preloaded, this library turns on Linux CPUID faulting
 * (arch_prctl(ARCH_SET_CPUID, 0); needs the "cpuid_fault" CPU flag), so every CPUID the process
 * executes traps into a SIGSEGV handler that runs the real CPUID and clears the AVX-512, AMX,
 * AVX-VNNI, AVX-IFMA and AVX-NE-CONVERT feature bits. The setting is inherited by threads and
 * forks and reset by execve, where the preload runs again. glibc's own string functions were
 * chosen before this runs and keep their AVX-512 variants. Bench use only; our choice.
 *
 * Build and use (bench/README in docs/serving.md):
 *   cc -O2 -shared -fPIC -o /tmp/cpuid_avx2.so bench/cpuid_avx2.c
 *   LD_PRELOAD=/tmp/cpuid_avx2.so ECSEARCH_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 \
 *       ONEDNN_MAX_CPU_ISA=AVX2 python bench/bench_encode.py ...
 * A program that installs its own SIGSEGV handler (Python's faulthandler, pytest, torch's
 * DataLoader workers) does not replace ours: sigaction() and signal() are interposed for SIGSEGV,
 * the program's handler is kept aside and called for every fault that is not a CPUID.
 *
 * ECSEARCH_CPUID_MAX_ISA=avx512_bf16 (default avx2) masks less: only AMX, AVX512-FP16, AVX-IFMA,
 * AVX-VNNI-INT8 and AVX-NE-CONVERT, so an AMX CPU looks like an AVX-512-BF16 one without AMX
 * (an AMD EPYC Zen 4, a Cooper Lake Xeon). Pair it with ECSEARCH_CPU_ISA=avx512_bf16
 * ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16. Any other value exits 3.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static long set_cpuid(unsigned long enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static int amx_only; /* ECSEARCH_CPUID_MAX_ISA=avx512_bf16: hide AMX and later, keep AVX-512 + bf16 */

static void mask_amx(unsigned leaf, unsigned sub, unsigned *a, unsigned *b, unsigned *c, unsigned *d) {
    (void)b; (void)c;
    if (leaf == 7 && sub == 0) {
        /* EDX: amx-bf16, avx512-fp16, amx-tile, amx-int8 */
        *d &= ~((1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: amx-fp16, avx-ifma; EDX: avx-vnni-int8, avx-ne-convert */
        *a &= ~((1u << 21) | (1u << 23));
        *d &= ~((1u << 4) | (1u << 5));
    } else if (leaf == 0x1d || leaf == 0x1e) {
        *a = *b = *c = *d = 0; /* AMX tile / TMUL information */
    }
}

static void mask(unsigned leaf, unsigned sub, unsigned *a, unsigned *b, unsigned *c, unsigned *d) {
    if (amx_only) {
        mask_amx(leaf, sub, a, b, c, d);
        return;
    }
    if (leaf == 7 && sub == 0) {
        /* EBX: avx512 f dq ifma pf er cd bw vl */
        *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        /* ECX: avx512 vbmi vbmi2 vnni bitalg vpopcntdq */
        *c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: avx512 4vnniw 4fmaps vp2intersect, amx-bf16, avx512-fp16, amx-tile, amx-int8 */
        *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: avx-vnni, avx512-bf16, amx-fp16, avx-ifma; EDX: avx-vnni-int8, avx-ne-convert */
        *a &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        *d &= ~((1u << 4) | (1u << 5));
    } else if (leaf == 0x1d || leaf == 0x1e) {
        *a = *b = *c = *d = 0; /* AMX tile / TMUL information */
    }
}

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction;
static struct sigaction chained; /* the program's own SIGSEGV action (SIG_DFL until it sets one) */
static int installed;

static sigaction_fn next_sigaction(void) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return real_sigaction;
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real fault: the program's handler, else default */
        if (chained.sa_flags & SA_SIGINFO) {
            chained.sa_sigaction(sig, info, context);
        } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
            chained.sa_handler(sig);
        } else {
            struct sigaction dfl;
            memset(&dfl, 0, sizeof dfl);
            dfl.sa_handler = SIG_DFL;
            next_sigaction()(SIGSEGV, &dfl, NULL); /* let it happen again, unhandled */
        }
        return;
    }
    unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
    set_cpuid(1);
    __cpuid_count(leaf, sub, a, b, c, d);
    set_cpuid(0);
    mask(leaf, sub, &a, &b, &c, &d);
    r[REG_RAX] = a; r[REG_RBX] = b; r[REG_RCX] = c; r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

int sigaction(int signum, const struct sigaction *act, struct sigaction *old) {
    if (signum != SIGSEGV || !installed) return next_sigaction()(signum, act, old);
    if (old) *old = chained;
    if (act) chained = *act;
    return 0;
}

sighandler_t signal(int signum, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    sigemptyset(&act.sa_mask);
    act.sa_flags = SA_RESTART;
    if (sigaction(signum, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

__attribute__((constructor)) static void cpuid_avx2_init(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    memset(&chained, 0, sizeof chained);
    chained.sa_handler = SIG_DFL;
    const char *level = getenv("ECSEARCH_CPUID_MAX_ISA");
    if (level && *level && strcmp(level, "avx2") != 0) {
        if (strcmp(level, "avx512_bf16") != 0) {
            fprintf(stderr, "cpuid_avx2: ECSEARCH_CPUID_MAX_ISA=%s: expected avx2 or avx512_bf16\n", level);
            exit(3);
        }
        amx_only = 1;
    }
    if (next_sigaction()(SIGSEGV, &action, NULL) != 0 || set_cpuid(0) != 0) {
        perror("cpuid_avx2: cannot enable CPUID faulting");
        exit(3);
    }
    installed = 1;
}
