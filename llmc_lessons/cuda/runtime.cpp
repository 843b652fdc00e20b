// runtime.cpp: the CPU emulator's runtime. Built once into a shared library and loaded with RTLD_GLOBAL, so
// every kernel library compiled against llmc_cuda.h finds the llmc_rt_* functions here.
//
// A launch runs the grid's blocks on a few worker OS threads (blocks taken from a shared counter). Inside a
// block, each CUDA thread is a fiber with its own stack; a round-robin scheduler resumes them in turn. A
// fiber runs until it exits or must wait (at __syncthreads, or for its warp at a shuffle/vote/__syncwarp).
// A full pass over the block in which no fiber made progress is a deadlock, reported instead of hanging.
//
// A launch can be stopped (Ctrl-C, or a time limit kept by a watchdog thread): a flag read at every fiber
// switch, and a signal that jumps out of a loop that never switches.
// A fault in a kernel (a bad address, a stack overflow, an integer division by zero) is caught by a signal
// handler that jumps out of the fiber and fails the launch with a message; the process lives on. Argument
// arrays are copied next to an inaccessible page for the launch, so an access past an array's end faults too.
#include "llmc_cuda.h"
#undef printf
#undef assert
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csetjmp>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <dlfcn.h>
#include <map>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <string>
#include <sys/mman.h>
#include <sys/ucontext.h>
#include <thread>
#include <unistd.h>
#include <unordered_map>
#include <vector>

#if defined(LLMC_UCONTEXT) || !((defined(__x86_64__) || defined(__aarch64__)) && (defined(__linux__) || defined(__APPLE__)))
#define LLMC_USE_UCONTEXT 1
#include <ucontext.h>
#endif

// Checked mode on Linux x86-64 also watches shared memory and the argument arrays for data races between the
// threads of a block, and shared memory for out-of-bounds accesses (see Word).
#if defined(__SANITIZE_ADDRESS__) && defined(__linux__) && defined(__x86_64__)
#define LLMC_RACECHECK 1
#include <sanitizer/common_interface_defs.h>
#endif

extern "C" {
__thread llmc_thread *llmc_rt_self;
}

// ---------------------------------------------------------------------------------------------------------
// Context switch: save the callee-saved registers on the current stack, store the stack pointer, load the
// other fiber's stack pointer and pop its registers. About 10 ns, against ~300 ns for swapcontext.
#ifndef LLMC_USE_UCONTEXT
#if defined(__APPLE__)
#define LLMC_SYM(name) "_" #name
#define LLMC_FUNC_BEGIN(name) ".private_extern " LLMC_SYM(name) "\n" LLMC_SYM(name) ":\n"
#define LLMC_FUNC_END(name) ""
#else
#define LLMC_SYM(name) #name
#define LLMC_FUNC_BEGIN(name) \
    ".globl " #name "\n.hidden " #name "\n.type " #name ",@function\n" #name ":\n"
#define LLMC_FUNC_END(name) ".size " #name ",.-" #name "\n"
#endif
extern "C" void llmc_ctx_switch(void **save_sp, void *new_sp);
extern "C" void llmc_ctx_start();
#if defined(__x86_64__)
asm(".text\n.p2align 4\n" LLMC_FUNC_BEGIN(llmc_ctx_switch)
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
    LLMC_FUNC_END(llmc_ctx_switch)
    ".p2align 4\n" LLMC_FUNC_BEGIN(llmc_ctx_start)
    "  movq %r12, %rdi\n  callq *%r13\n  ud2\n"
    LLMC_FUNC_END(llmc_ctx_start));
// The floating-point control words are not switched: every fiber of a launch shares one FP environment.
// Initial frame, from the saved stack pointer upward: r15, r14, r13 = entry, r12 = argument, rbx, rbp, return
// address = llmc_ctx_start. 7 words = 56 bytes; after `ret` the stack is 16-byte aligned.
static void *llmc_ctx_init(char *top, void (*entry)(void *), void *arg) {
    uintptr_t t = reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15);
    uint64_t *sp = reinterpret_cast<uint64_t *>(t - 56 - 16);
    sp[0] = 0; sp[1] = 0; sp[2] = reinterpret_cast<uint64_t>(entry); sp[3] = reinterpret_cast<uint64_t>(arg);
    sp[4] = 0; sp[5] = 0; sp[6] = reinterpret_cast<uint64_t>(&llmc_ctx_start);
    return sp;
}
#elif defined(__aarch64__)
asm(".text\n.p2align 4\n" LLMC_FUNC_BEGIN(llmc_ctx_switch)
    "  sub sp, sp, #160\n"
    "  stp x19, x20, [sp, #0]\n  stp x21, x22, [sp, #16]\n  stp x23, x24, [sp, #32]\n"
    "  stp x25, x26, [sp, #48]\n  stp x27, x28, [sp, #64]\n  stp x29, x30, [sp, #80]\n"
    "  stp d8, d9, [sp, #96]\n  stp d10, d11, [sp, #112]\n  stp d12, d13, [sp, #128]\n  stp d14, d15, [sp, #144]\n"
    "  mov x2, sp\n  str x2, [x0]\n  mov sp, x1\n"
    "  ldp x19, x20, [sp, #0]\n  ldp x21, x22, [sp, #16]\n  ldp x23, x24, [sp, #32]\n"
    "  ldp x25, x26, [sp, #48]\n  ldp x27, x28, [sp, #64]\n  ldp x29, x30, [sp, #80]\n"
    "  ldp d8, d9, [sp, #96]\n  ldp d10, d11, [sp, #112]\n  ldp d12, d13, [sp, #128]\n  ldp d14, d15, [sp, #144]\n"
    "  add sp, sp, #160\n  ret\n"
    LLMC_FUNC_END(llmc_ctx_switch)
    ".p2align 4\n" LLMC_FUNC_BEGIN(llmc_ctx_start)
    "  mov x0, x19\n  blr x20\n  brk #0\n"
    LLMC_FUNC_END(llmc_ctx_start));
// Initial frame: x19 = argument, x20 = entry, x29 = 0, x30 = llmc_ctx_start; 160 bytes, 16-byte aligned.
static void *llmc_ctx_init(char *top, void (*entry)(void *), void *arg) {
    uintptr_t t = reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15);
    uint64_t *sp = reinterpret_cast<uint64_t *>(t - 160 - 16);
    std::memset(sp, 0, 160);
    sp[0] = reinterpret_cast<uint64_t>(arg);
    sp[1] = reinterpret_cast<uint64_t>(entry);
    sp[11] = reinterpret_cast<uint64_t>(&llmc_ctx_start);
    return sp;
}
#endif
#endif

namespace {

constexpr int kMaxSlots = 256;
constexpr size_t kSharedArena = 256 * 1024;  // more than any GPU offers per block (H100: 227 KiB)
constexpr size_t kStackGuard = 4 * 1024;    // PROT_NONE under each fiber stack: an overflow faults there
constexpr size_t kAltStack = 64 * 1024;      // each worker's signal stack (a fault may come from a full fiber stack)
constexpr size_t kPrintfCap = 4u << 20;      // printf output kept per launch, like the GPU's bounded printf FIFO
constexpr int kCancelSignal = SIGURG;         // ignored by default, so one that arrives late does no harm
constexpr unsigned char kSlackByte = 0xA5;   // fills the page after a staged array (-2.9e-16 as a float)
enum FiberState { kReady, kWaiting, kDone };
enum WarpOp { kShfl, kVote, kSyncwarp };
enum CancelReason { kNotCancelled, kInterrupted, kTimedOut };
#ifdef LLMC_RACECHECK
// Checked mode: while a block runs, its shared memory and (copies of) the argument arrays are PROT_NONE, so
// every access by the kernel faults. The handler (on_watch) records the access by the address it starts at,
// opens the page and single-steps the instruction (the trap flag); the trap closes the page again. The blocks
// run one at a time, each with a fresh record. Two accesses that start at one address (an access's size is not
// known: a float4 at p and a float at p + 4 are not compared) by different threads, at least one a plain
// write, race unless a __syncthreads completed between them, or, for lanes of one warp, a warp
// collective (__syncwarp, a shuffle, a vote), or both went through volatile pointers (warp-synchronous code,
// run in lockstep). Atomics do not race with atomics nor with plain reads. Arrays lie kRedzone bytes apart,
// so an index a little past an array's end lands in a gap: an out-of-bounds access.
constexpr size_t kRedzone = 64;
constexpr size_t kArena = kSharedArena + (kMaxSlots + 1) * kRedzone;
constexpr int kWatchFound = -1;  // Worker::sig after a race or an out-of-bounds access
bool g_watch = true;             // LLMC_CHECK_RACES=0 turns the watching off (10-20 us an access)
struct Access {
    int tid = -1;  // linear thread index in the block; -1: none
    bool atomic = false, vol = false;
    unsigned long long epoch = 0, wgen = 0;  // the block's __syncthreads count, the warp's collective count
    void *pc = nullptr;
};
struct Word { Access write, read[2]; };  // the last write and up to two concurrent reads since
struct Region { size_t off, size, elem; unsigned rank, e1, e2; const char *name, *file; int line; };
struct Span { char *lo, *hi; int arg; };  // an argument array (arg >= 0), or pages watched around them (-1)
// Pages opened for the instruction being single-stepped (one instruction may touch a few watched pages).
thread_local Span t_open[4];
thread_local int t_nopen = 0;
#else
constexpr size_t kArena = kSharedArena;
#endif
const char *kOpNames[] = {"a warp shuffle (__shfl*_sync)", "a warp vote (__ballot/__any/__all_sync)", "__syncwarp"};

struct Launch;
struct Worker;

// A traced launch runs a kernel library built with -fsanitize=thread (emulator.py), whose compiler calls
// __tsan_read4(addr) & co. before every load and store; the functions below record the accesses to shared
// memory and to the argument arrays, one record each, in the order the block's threads make them. The launch
// runs its blocks one after another on one worker, so the record is the same on every run. Addresses of
// arguments are those of a virtual GPU (emulator.py picks one per array, 256-byte aligned as cudaMalloc's);
// shared memory addresses are byte offsets in the block's shared memory.
struct TraceRecord {
    unsigned long long addr, pc;  // pc: the offset of the access's instruction in the kernel library
    unsigned block;               // linear block index
    unsigned short tid;           // linear thread index in the block
    unsigned char size, flags;    // bytes; kTrace* bits
};
enum { kTraceStore = 1, kTraceAtomic = 2, kTraceShared = 4 };

struct Fiber {
    llmc_thread t;
    Worker *w = nullptr;
    int state = kReady;
    Fiber *next = nullptr;  // the next live fiber of the block, in a ring (round-robin order)
    Fiber *prev = nullptr;
    const char *wait_what = "", *wait_file = "";
    int wait_line = 0;
    char *stack = nullptr;
#ifdef LLMC_RACECHECK
    bool vol = false;  // its next access goes through a volatile pointer
#endif
#ifdef LLMC_USE_UCONTEXT
    ucontext_t uc;
#else
    void *sp = nullptr;
#endif
};

// One warp collective being formed: the lanes of its mask arrive one by one. Lanes with disjoint masks (two
// half-warps, say) form their own collectives at the same time.
struct Collective {
    unsigned target, arrived, votes;
    int op;
    const char *file;
    int line;
};

struct Warp {
    unsigned exist;   // lanes that exist (the last warp of a block may be partial)
    unsigned exited;  // lanes that have returned from the kernel
    unsigned ready;   // lanes whose collective has completed: res[lane] holds their result
    int ncoll;
    Collective coll[32];
    unsigned long long val[32], res[32];  // each lane's contribution to, and result of, its collective
    unsigned char src[32];                // the lane each shuffling lane reads
#ifdef LLMC_RACECHECK
    unsigned long long gen = 0;           // collectives completed: they order the lanes' accesses
#endif
};

// An argument array copied into its own mapping, followed by a page of kSlackByte and then a PROT_NONE page.
// Reading a little past the end gives garbage, as on a GPU (not NaN, so that what a kernel computes from it
// and writes back differs from the pattern); writing there changes the page, which is checked after the
// launch; an access further off faults at once.
// Arguments that overlap (in-place kernels, views of one array) share one copy.
struct Staged {
    char *orig = nullptr, *region = nullptr, *data = nullptr;
    size_t bytes = 0, data_pages = 0, slack = 0;
    bool writable = false;
    int last_arg = 0;   // the argument whose end is this copy's end
    int last_write = 0; // the writable argument that ends last (writes past the copy's end come through it)
    long long vdelta = 0; // traced launch: add to an address in the copy to get its address on the virtual GPU
};

struct Launch {
    void (*thunk)(void **);
    std::vector<void *> argv, ptrs;
    std::vector<Staged> staged;
    std::vector<std::string> arg_names;
    std::vector<long long> arg_bytes;
    unsigned grid[3], block[3];
    size_t dyn_shared, shared_limit;
    std::string name;
    long nblocks;
    std::vector<std::unique_ptr<Worker>> workers;
    alignas(64) std::atomic<long> next{0};
    alignas(64) std::atomic<bool> failed{false};  // read at every fiber switch: abandon the block when set
    std::mutex mu;
    std::condition_variable cv;  // wakes the time-limit watchdog when the launch is done
    bool done = false;
    volatile sig_atomic_t cancel = kNotCancelled;  // under mu, or kInterrupted from the SIGINT handler
    double limit = 0;
    std::string error, output, stopped_running, stopped_yielding;
    bool output_cut = false;
    void *fault_pc = nullptr;
#ifdef LLMC_RACECHECK
    // Watched copies of the argument arrays (see copy_arrays): each array, and the pages of each copy.
    std::vector<Span> arrays, pages;
    struct Copy { char *orig; size_t bytes; bool writable; };
    std::vector<Copy> origs;  // for each copy (pages[k]): where it came from, its size, whether to copy it back
#endif
    pthread_t caller;            // the thread that called llmc_rt_launch; it runs the first worker
    // A traced launch (see TraceRecord): the accesses, and where each argument lies on the virtual GPU.
    bool tracing = false;
    size_t trace_limit = 0;
    std::vector<long long> trace_vaddr;
    std::vector<TraceRecord> trace;
    char *pc_base = nullptr;     // the kernel library's load address: records hold pc offsets in it
};

struct Worker {
    size_t stack_size = 0;
    std::vector<std::unique_ptr<Fiber>> fibers;
    std::vector<Warp> warps;
    char *shared = nullptr;
    size_t dirty = kSharedArena;  // bytes of the arena to re-poison before the next block
    size_t static_used = 0, static_base = 0;
    long slot_off[kMaxSlots];
    std::vector<int> touched;
    int n_threads = 0, n_exited = 0, bar_arrived = 0;
    int stalled = 0;        // consecutive resumptions of fibers that could not go on
    bool deadlock = false;
    unsigned long long bar_gen = 0;
    bool abort = false;
    Fiber *cur = nullptr;
    Launch *L = nullptr;
    unsigned block = 0;     // the linear index of the block it runs
    // Signals: a fault in a fiber (or a cancel) jumps back to worker_loop through `jmp`.
    sigjmp_buf jmp;
    volatile sig_atomic_t in_fiber = 0;   // a fiber runs: a fault is the kernel's
    volatile sig_atomic_t no_cancel = 0;  // the fiber is inside the runtime (a lock, an allocation)
    int sig = 0, sig_code = 0;
    void *sig_addr = nullptr, *sig_pc = nullptr;
    pthread_t thread;
    bool running = false;  // under L->mu: thread may be signalled
#ifdef LLMC_USE_UCONTEXT
    ucontext_t sched_uc;
#else
    void *sched_sp = nullptr;
#endif
#ifdef LLMC_RACECHECK
    std::vector<Region> regions;  // regions[0]: the dynamic shared memory
    std::unordered_map<const char *, Word> words;  // the addresses this block has touched, by where accesses start
    volatile sig_atomic_t watching = 0;
    bool found_oob = false, found_a_write = false, found_b_write = false;  // what on_watch found
    Access found_a, found_b;
    size_t found_off = 0;
    int found_arg = -1;  // the argument array of a race on global memory; -1: shared memory
#endif

    Worker() {
#ifdef LLMC_RACECHECK
        void *m = mmap(nullptr, kArena, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) throw std::bad_alloc();
        shared = static_cast<char *>(m);
#else
        shared = static_cast<char *>(std::malloc(kSharedArena));
#endif
        std::fill(slot_off, slot_off + kMaxSlots, -1L);
    }
    ~Worker() {
#ifdef LLMC_RACECHECK
        munmap(shared, kArena);
#else
        std::free(shared);
#endif
        for (auto &f : fibers) munmap(f->stack - kStackGuard, stack_size + kStackGuard);
    }
};

thread_local Worker *tw = nullptr;

std::mutex g_pool_mu;
std::vector<std::unique_ptr<Worker>> g_pool;  // idle workers, kept with their fiber stacks between launches
std::string g_error, g_output;
struct { bool armed = false; size_t limit = 0; std::vector<long long> vaddr; } g_trace_next;  // llmc_rt_trace_next
std::vector<TraceRecord> g_trace;             // the last traced launch's record
std::atomic<Launch *> g_launch{nullptr};      // the launch in progress (one at a time)
std::atomic<bool> g_active{false};            // a launch runs: the signal handler looks at the thread's worker
const size_t g_page = size_t(sysconf(_SC_PAGESIZE));
int g_interrupted = 0;                        // the last launch was stopped by Ctrl-C
long long g_fault_offset = -1;                // where the last failed launch's fault was (see llmc_rt_fault_offset)
std::string g_fault_lib;

void to_scheduler(Worker &w, Fiber *f) {
#ifdef LLMC_USE_UCONTEXT
    swapcontext(&f->uc, &w.sched_uc);
#else
    llmc_ctx_switch(&f->sp, w.sched_sp);
#endif
}

void to_fiber(Worker &w, Fiber *f) {
    w.cur = f;
    llmc_rt_self = &f->t;
#ifdef LLMC_USE_UCONTEXT
    swapcontext(&w.sched_uc, &f->uc);
#else
    llmc_ctx_switch(&w.sched_sp, f->sp);
#endif
}

// Switch straight from fiber `from` to fiber `to` (one switch per hand-over, not two through a scheduler).
void fiber_to_fiber(Worker &w, Fiber *from, Fiber *to) {
    if (from == to) return;
    w.cur = to;
    llmc_rt_self = &to->t;
#ifdef LLMC_USE_UCONTEXT
    swapcontext(&from->uc, &to->uc);
#else
    llmc_ctx_switch(&from->sp, to->sp);
#endif
}

std::string where(Worker &w) {
    const llmc_thread &t = w.cur->t;
    char buf[300];
    std::snprintf(buf, sizeof buf, "kernel '%s', block (%u, %u, %u), thread (%u, %u, %u)", w.L->name.c_str(),
                  t.blockIdx.x, t.blockIdx.y, t.blockIdx.z, t.threadIdx.x, t.threadIdx.y, t.threadIdx.z);
    return buf;
}

std::string block_and_thread(Worker &w) {
    std::string s = where(w);
    return s.substr(s.find("block"));
}

// The launch failed elsewhere or was cancelled: leave this block at once.
__attribute__((noinline, cold)) void abandon(Worker &w, Fiber *f) {
    Launch &L = *w.L;
    if (L.cancel != kNotCancelled && f->state == kReady) {
        std::lock_guard<std::mutex> g(L.mu);
        if (L.stopped_yielding.empty()) L.stopped_yielding = block_and_thread(w);
    }
    w.abort = true;
    to_scheduler(w, f);
    __builtin_trap();  // an abandoned block is never resumed
}

inline void abandon_if_stopped(Worker &w, Fiber *f) {
    if (__builtin_expect(w.L->failed.load(std::memory_order_relaxed), 0)) abandon(w, f);
}

// Fiber f cannot go on (it waits): hand over to the next live fiber. If every live fiber in turn was
// resumed and could not go on, nothing can change any more: a deadlock, reported by the scheduler.
void pass_on(Worker &w, Fiber *f, bool made_progress) {
    abandon_if_stopped(w, f);
    w.stalled = made_progress ? 0 : w.stalled + 1;
    if (w.stalled > w.n_threads - w.n_exited) {
        w.deadlock = true;
        to_scheduler(w, f);
        __builtin_trap();  // a deadlocked block is never resumed
    }
    fiber_to_fiber(w, f, f->next);
}

[[noreturn]] void fail_now(Worker &w, const std::string &msg) {
    w.no_cancel = 1;
    Launch &L = *w.L;
    {
        std::lock_guard<std::mutex> g(L.mu);
        if (!L.failed.exchange(true)) L.error = msg;
    }
    w.abort = true;
    to_scheduler(w, w.cur);
    __builtin_trap();  // an aborted block is never resumed
}

void fiber_main(void *arg) {
    Fiber *f = static_cast<Fiber *>(arg);
    Worker &w = *f->w;
    w.L->thunk(w.L->argv.data());
    f->state = kDone;
    w.n_exited++;
    w.stalled = 0;
    Warp &wp = w.warps[f->t.warp];
    const unsigned bit = 1u << f->t.lane;
    wp.exited |= bit;
    for (int i = 0; i < wp.ncoll; i++) {
        const Collective &c = wp.coll[i];
        if (!(c.target & bit)) continue;
        char buf[600];
        std::snprintf(buf, sizeof buf, "%s:%d: %s: this lane returned from the kernel while lanes 0x%08x of warp "
                      "%u wait for it in %s with mask 0x%08x. Every lane named in a mask must reach the collective.",
                      c.file, c.line, where(w).c_str(), c.arrived, f->t.warp, kOpNames[c.op], c.target);
        fail_now(w, buf);
    }
    // As on NVIDIA hardware, a thread that has exited no longer holds a __syncthreads back.
    if (w.bar_arrived && w.bar_arrived == w.n_threads - w.n_exited) {
        w.bar_arrived = 0;
        w.bar_gen++;
    }
    if (f->next == f) {  // the last live fiber: the block is done
        to_scheduler(w, f);
    } else {             // unlink from the ring and go on with the next one
        f->prev->next = f->next;
        f->next->prev = f->prev;
        fiber_to_fiber(w, f, f->next);
    }
    __builtin_trap();  // a finished fiber is never resumed
}

#ifdef LLMC_USE_UCONTEXT
void fiber_main_uc() { fiber_main(tw->cur); }
#endif

template <typename Cond>
void wait_until(Worker &w, Fiber *f, Cond cond, const char *what, const char *file, int line) {
    bool progress = true;  // arriving is progress; only being resumed and waiting again is not
    while (!cond()) {
        f->state = kWaiting;
        f->wait_what = what; f->wait_file = file; f->wait_line = line;
        pass_on(w, f, progress);
        progress = false;
    }
    f->state = kReady;
}

void ensure_fibers(Worker &w, int n, size_t stack_size) {
    if (w.stack_size != stack_size) {
        for (auto &f : w.fibers) munmap(f->stack - kStackGuard, w.stack_size + kStackGuard);
        w.fibers.clear();
        w.stack_size = stack_size;
    }
    while ((int)w.fibers.size() < n) {
        auto f = std::make_unique<Fiber>();
        // A guard region under each stack: an overflow faults (and is reported) instead of corrupting a neighbour.
        char *mem = static_cast<char *>(mmap(nullptr, stack_size + kStackGuard, PROT_READ | PROT_WRITE,
                                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        if (mem == MAP_FAILED) throw std::bad_alloc();
        mprotect(mem, kStackGuard, PROT_NONE);
        f->stack = mem + kStackGuard;
        w.fibers.push_back(std::move(f));
    }
}

void report_deadlock(Worker &w, int n) {
    std::map<std::string, int> groups;
    for (int i = 0; i < n; i++) {
        Fiber *f = w.fibers[i].get();
        if (f->state != kWaiting) continue;
        char buf[300];
        std::snprintf(buf, sizeof buf, "%s at %s:%d", f->wait_what, f->wait_file, f->wait_line);
        groups[buf]++;
    }
    const llmc_thread &t = w.fibers[0]->t;
    char head[300];
    std::snprintf(head, sizeof head, "deadlock in kernel '%s', block (%u, %u, %u): no thread can go on.\n",
                  w.L->name.c_str(), t.blockIdx.x, t.blockIdx.y, t.blockIdx.z);
    std::string msg = head;
    for (auto &g : groups) msg += "  " + std::to_string(g.second) + " threads wait in " + g.first + "\n";
    if (w.n_exited)
        msg += "  " + std::to_string(w.n_exited) + " threads have already exited the kernel.\n";
    msg += "A __syncthreads waits for every thread of the block that has not exited, and a warp collective for "
           "every lane named in its mask: threads that wait at a barrier while others of the block wait in a "
           "warp collective (or the other way round) can never meet. Make every thread reach the same barriers "
           "and collectives in the same order.";
    Launch &L = *w.L;
    std::lock_guard<std::mutex> g(L.mu);
    if (!L.failed.exchange(true)) L.error = msg;
}

// Stacks lie a multiple of the page size apart, so their tops would all fall in the same few cache sets:
// starting each a different number of cache lines below its top spreads the hot frames over the cache.
inline size_t colour(int i) { return size_t(i % 64) * 64; }

#ifdef LLMC_RACECHECK
// Close (on) or open the block's shared memory and the pages of the argument arrays (see Word).
void watch(Worker &w, bool on) {
    const int prot = on ? PROT_NONE : PROT_READ | PROT_WRITE;
    w.watching = 0;
    mprotect(w.shared, kArena, prot);
    for (const Span &p : w.L->pages) mprotect(p.lo, size_t(p.hi - p.lo), prot);
    w.watching = on;
}
#endif

void run_block(Worker &w, long b) {
    Launch &L = *w.L;
    const unsigned bx = L.block[0], by = L.block[1], bz = L.block[2];
    const int n = int(bx * by * bz);
    const unsigned gx = L.grid[0], gy = L.grid[1];
    uint3 bid = {unsigned(b % gx), unsigned((b / gx) % gy), unsigned(b / (long(gx) * gy))};
    // Fresh shared memory for every block: poisoned (0xFF bytes read as NaN floats, -1 integers).
#ifdef LLMC_RACECHECK
    watch(w, false);
    w.words.clear();
    w.regions.assign(1, Region{0, L.dyn_shared, 1, 1, 0, 0, "extern __shared__ memory", "", 0});
#endif
    std::memset(w.shared, 0xFF, std::min(w.dirty, kArena));
    w.static_base = (L.dyn_shared + 15) & ~size_t(15);
#ifdef LLMC_RACECHECK
    w.static_base += kRedzone;
#endif
    w.static_used = 0;
    w.dirty = w.static_base;
    for (int s : w.touched) w.slot_off[s] = -1;
    w.touched.clear();
    w.block = unsigned(b);
    w.n_threads = n; w.n_exited = 0; w.bar_arrived = 0; w.bar_gen = 0; w.abort = false; w.no_cancel = 0;
    const int nwarps = (n + 31) / 32;
    if ((int)w.warps.size() < nwarps) w.warps.resize(nwarps);
    for (int i = 0; i < nwarps; i++) {
        Warp &wp = w.warps[i];
        wp.exist = (i == nwarps - 1 && n % 32) ? ((1u << (n % 32)) - 1u) : 0xffffffffu;
        wp.exited = 0; wp.ready = 0; wp.ncoll = 0;
#ifdef LLMC_RACECHECK
        wp.gen = 0;
#endif
    }
    for (int i = 0; i < n; i++) {
        Fiber *f = w.fibers[i].get();
        f->w = &w;
        f->t.threadIdx = {unsigned(i % bx), unsigned((i / bx) % by), unsigned(i / (bx * by))};
        f->t.blockIdx = bid;
        f->t.blockDim = {bx, by, bz};
        f->t.gridDim = {L.grid[0], L.grid[1], L.grid[2]};
        f->t.lane = unsigned(i % 32);
        f->t.warp = unsigned(i / 32);
        f->state = kReady;
#ifdef LLMC_RACECHECK
        f->vol = false;
#endif
#ifdef LLMC_USE_UCONTEXT
        getcontext(&f->uc);
        f->uc.uc_stack.ss_sp = f->stack;
        f->uc.uc_stack.ss_size = w.stack_size - colour(i);
        f->uc.uc_link = nullptr;
        makecontext(&f->uc, fiber_main_uc, 0);
#else
        f->sp = llmc_ctx_init(f->stack + w.stack_size - colour(i), fiber_main, f);
#endif
    }
    for (int i = 0; i < n; i++) {  // the ring of live fibers, in thread order
        w.fibers[i]->next = w.fibers[(i + 1) % n].get();
        w.fibers[i]->prev = w.fibers[(i + n - 1) % n].get();
    }
    w.stalled = 0;
    w.deadlock = false;
    w.in_fiber = 1;
    // A stop signal that came before in_fiber was set found no fiber to leave (its handler returned), and a block
    // that then spins without a fiber switch would never read the flag: read it now that a signal would be seen.
    // The flag is set before any stop signal is sent.
    std::atomic_signal_fence(std::memory_order_seq_cst);
    if (w.L->failed.load()) {
        w.in_fiber = 0;
        w.abort = true;
    } else {
#ifdef LLMC_RACECHECK
        if (g_watch) watch(w, true);
#endif
        to_fiber(w, w.fibers[0].get());  // returns when every fiber has exited, on a deadlock, or on a failure
        w.in_fiber = 0;
#ifdef LLMC_RACECHECK
        watch(w, false);
#endif
    }
    if (w.deadlock && !w.abort) {
        report_deadlock(w, n);
        w.abort = true;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Faults and cancellation. A fault (SIGSEGV, SIGBUS, SIGFPE, SIGILL) in a fiber, or the cancel signal, runs
// the handler on the worker's signal stack; it jumps back to worker_loop, which abandons the launch. Signals
// that do not come from a fiber go to the handler that was installed before ours.
struct sigaction g_prev[NSIG];

void *pc_of(void *ctx) {
    ucontext_t *uc = static_cast<ucontext_t *>(ctx);
#if defined(__linux__) && defined(__x86_64__)
    return reinterpret_cast<void *>(uc->uc_mcontext.gregs[REG_RIP]);
#elif defined(__linux__) && defined(__aarch64__)
    return reinterpret_cast<void *>(uc->uc_mcontext.pc);
#elif defined(__APPLE__) && defined(__x86_64__)
    return reinterpret_cast<void *>(uc->uc_mcontext->__ss.__rip);
#elif defined(__APPLE__) && defined(__aarch64__)
    return reinterpret_cast<void *>(uc->uc_mcontext->__ss.__pc);
#else
    (void)uc;
    return nullptr;
#endif
}

// A signal that is not ours: to the handler installed before ours, or the default action.
void chain(int sig, siginfo_t *si, void *ctx) {
    const struct sigaction &p = g_prev[sig];
    if (p.sa_flags & SA_SIGINFO) {
        p.sa_sigaction(sig, si, ctx);
    } else if (p.sa_handler == SIG_DFL) {
        signal(sig, SIG_DFL);
        raise(sig);  // delivered on return: the default action (a crash report, a core file) as without us
    } else if (p.sa_handler != SIG_IGN) {
        p.sa_handler(sig);
    }
}

void on_signal(int sig, siginfo_t *si, void *ctx) {
    Worker *w = g_active.load(std::memory_order_relaxed) ? tw : nullptr;
    if (w && w->in_fiber && !(sig == kCancelSignal && w->no_cancel)) {
        w->sig = sig; w->sig_code = si->si_code; w->sig_addr = si->si_addr; w->sig_pc = pc_of(ctx);
        w->in_fiber = 0;
        siglongjmp(w->jmp, 1);
    }
    if (sig == kCancelSignal) return;  // outside a fiber: the flag stops the worker at its next block
    chain(sig, si, ctx);
}

#ifdef LLMC_RACECHECK
// Is the instruction at pc atomic (lock-prefixed, or xchg with memory)?
__attribute__((no_sanitize_address)) bool is_atomic(const void *pc) {
    const unsigned char *p = static_cast<const unsigned char *>(pc);
    for (int i = 0; i < 15; i++) {
        const unsigned b = p[i];
        if (b == 0xF0) return true;
        const bool prefix = b == 0x66 || b == 0x67 || b == 0xF2 || b == 0xF3 || b == 0x2E || b == 0x3E ||
                            b == 0x26 || b == 0x36 || b == 0x64 || b == 0x65 || (b >= 0x40 && b <= 0x4F);
        if (!prefix) return b == 0x86 || b == 0x87;
    }
    return false;
}

// Can earlier access p and access c (by another thread) happen in either order?
bool concurrent(const Access &p, const Access &c) {
    if (p.tid < 0 || p.tid == c.tid || p.epoch != c.epoch) return false;
    return !(p.tid / 32 == c.tid / 32 && (p.wgen != c.wgen || (p.vol && c.vol)));
}

const Region *region_at(Worker &w, size_t off) {
    for (const Region &r : w.regions)
        if (off >= r.off && off < r.off + r.size) return &r;
    return nullptr;
}

// Record an access by the current fiber to byte off of shared memory (arg = -1) or of the argument array
// w.L->arrays[arg]; false (with w.found_*) on a race or an out-of-bounds access.
bool record(Worker &w, int arg, size_t off, bool write, void *pc) {
    Fiber *f = w.cur;
    Access c;
    c.tid = int(f->t.warp * 32 + f->t.lane);
    c.epoch = w.bar_gen;
    c.wgen = w.warps[f->t.warp].gen;
    c.pc = pc;
    c.vol = f->vol;
    f->vol = false;
    c.atomic = write && is_atomic(pc);
    w.found_off = off; w.found_b = c; w.found_b_write = write; w.found_oob = false;
    if (arg < 0 && !region_at(w, off)) {
        w.found_oob = true;
        return false;
    }
    Word &x = w.words[(arg < 0 ? w.shared : w.L->arrays[size_t(arg)].lo) + off];
    auto race = [&](const Access &p, bool p_write) {
        w.found_arg = arg; w.found_a = p; w.found_a_write = p_write;
        return false;
    };
    if (write) {
        if (concurrent(x.write, c) && !(x.write.atomic && c.atomic)) return race(x.write, true);
        if (!c.atomic)
            for (const Access &r : x.read)
                if (concurrent(r, c)) return race(r, false);
        x.write = c;
        if (!c.atomic) x.read[0] = x.read[1] = Access();
    } else {
        if (concurrent(x.write, c) && !x.write.atomic) return race(x.write, true);
        if (!concurrent(x.read[0], c)) x.read[0] = c;
        else if (!concurrent(x.read[1], c)) x.read[1] = c;
    }
    return true;
}

void on_watch(int sig, siginfo_t *si, void *ctx) {
    ucontext_t *uc = static_cast<ucontext_t *>(ctx);
    Worker *w = g_active.load(std::memory_order_relaxed) ? tw : nullptr;
    if (sig == SIGTRAP && t_nopen) {  // the instruction ran: close its pages again
        for (int i = 0; i < t_nopen; i++) mprotect(t_open[i].lo, size_t(t_open[i].hi - t_open[i].lo), PROT_NONE);
        t_nopen = 0;
        uc->uc_mcontext.gregs[REG_EFL] &= ~0x100LL;
        return;
    }
    char *a = static_cast<char *>(si->si_addr);
    Launch *L = g_launch.load(std::memory_order_relaxed);
    Span range{nullptr, nullptr, -1};  // the watched range that holds a
    if (sig == SIGSEGV && w && w->watching && a >= w->shared && a < w->shared + kArena)
        range = Span{w->shared, w->shared + kArena, -1};
    if (sig == SIGSEGV && !range.lo && L && g_watch)
        for (const Span &p : L->pages)
            if (a >= p.lo && a < p.hi) range = p;
    if (range.lo && t_nopen < 4) {
        if (w && w->in_fiber && w->watching) {  // an access by the kernel: is it one of ours?
            int arg = -2;
            size_t off = 0;
            if (range.lo == w->shared) {
                arg = -1; off = size_t(a - w->shared);
            } else {
                for (size_t i = 0; i < L->arrays.size(); i++)
                    if (a >= L->arrays[i].lo && a < L->arrays[i].hi) { arg = int(i); off = size_t(a - L->arrays[i].lo); }
            }
            if (arg > -2 && !record(*w, arg, off, (uc->uc_mcontext.gregs[REG_ERR] & 2) != 0, pc_of(ctx))) {
                w->sig = kWatchFound; w->sig_pc = nullptr;
                w->in_fiber = 0;
                siglongjmp(w->jmp, 1);
            }
        }
        char *page = range.lo + size_t(a - range.lo) / g_page * g_page;
        t_open[t_nopen] = Span{page, std::min(page + 2 * g_page, range.hi), -1};  // an access may cross a page
        mprotect(page, size_t(t_open[t_nopen].hi - page), PROT_READ | PROT_WRITE);
        t_nopen++;
        uc->uc_mcontext.gregs[REG_EFL] |= 0x100LL;  // trap after this one instruction
        return;
    }
    if (sig == kCancelSignal) on_signal(sig, si, ctx);
    else chain(sig, si, ctx);
}
#endif

void install_handlers() {
#if defined(LLMC_RACECHECK)
    const int sigs[] = {kCancelSignal, SIGSEGV, SIGTRAP};  // faults outside shared memory go on to the sanitizer
#elif defined(__SANITIZE_ADDRESS__)
    const int sigs[] = {kCancelSignal};  // under AddressSanitizer its own reports of faults are better
#else
    const int sigs[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, kCancelSignal};
#endif
    for (int s : sigs) {
        struct sigaction cur;
        sigaction(s, nullptr, &cur);
#ifdef LLMC_RACECHECK
        void (*handler)(int, siginfo_t *, void *) = on_watch;
#else
        void (*handler)(int, siginfo_t *, void *) = on_signal;
#endif
        if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == handler) continue;
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(s, &sa, &g_prev[s]);
    }
}

struct AltStack {
    void *mem = nullptr;
    ~AltStack() {
        if (!mem) return;
        stack_t ss;
        std::memset(&ss, 0, sizeof ss);
        ss.ss_flags = SS_DISABLE;
        sigaltstack(&ss, nullptr);
        std::free(mem);
    }
};
thread_local AltStack t_altstack;

void ensure_altstack() {
    stack_t ss;
    if (sigaltstack(nullptr, &ss) == 0 && !(ss.ss_flags & SS_DISABLE)) return;  // ours, or one already there
    if (!t_altstack.mem) t_altstack.mem = std::malloc(kAltStack);
    std::memset(&ss, 0, sizeof ss);
    ss.ss_sp = t_altstack.mem;
    ss.ss_size = kAltStack;
    sigaltstack(&ss, nullptr);
}

// Ctrl-C during a launch (Jupyter's "interrupt kernel" sends the same SIGINT): stop the launch; the caller then
// hands the signal on to Python's handler, which raises KeyboardInterrupt.
struct sigaction g_prev_sigint;

void on_sigint(int, siginfo_t *, void *) {
    Launch *L = g_launch.load();
    if (!L) return;
    L->cancel = kInterrupted;
    L->failed.store(true);
    pthread_kill(L->caller, kCancelSignal);  // the caller stops the other workers when its own loop ends
}

const char *kRerun = "\nRerun with LLMC_CHECK=1 (AddressSanitizer) to find the exact access.";
const char *kBoundsHint = "Check the index arithmetic and the bounds test (`if (i < n)`), and that n matches the "
                          "arrays' sizes.";

// arg_past(L, i, addr): how far `addr` (in a staged copy) lies past the end of argument i.
size_t arg_past(Launch &L, int i, const char *addr) {
    return size_t(addr - (static_cast<char *>(L.ptrs[size_t(i)]) + L.arg_bytes[size_t(i)]));
}

std::string past(size_t bytes) {
    return bytes ? std::to_string(bytes) + " bytes past" : std::string("just past");
}

#ifdef LLMC_RACECHECK
std::string line_of(void *pc) {
    char buf[600] = "";
    __sanitizer_symbolize_pc(static_cast<char *>(pc) + 1, "%s:%l", buf, sizeof buf);  // it looks 1 byte back
    const char *s = std::strchr(buf, '<');  // "<RawKernel source>:4", not the folder it was built in
    return s ? s : buf[0] ? buf : "an unknown line";
}

std::string thread_at(Worker &w, int tid) {
    const unsigned bx = w.L->block[0], by = w.L->block[1], i = unsigned(tid);
    char buf[100];
    std::snprintf(buf, sizeof buf, "thread (%u, %u, %u)", i % bx, (i / bx) % by, i / (bx * by));
    return buf;
}

// The element of a __shared__ array at byte offset off, as the kernel names it: tile[3][5].
std::string element_at(Worker &w, size_t off) {
    const Region *r = region_at(w, off);
    if (!r) return "shared memory";
    const size_t e = (off - r->off) / r->elem;
    std::string s = r->name;
    if (r->rank == 1) s += "[" + std::to_string(e) + "]";
    if (r->rank == 2) s += "[" + std::to_string(e / r->e1) + "][" + std::to_string(e % r->e1) + "]";
    if (r->rank >= 3 && r->e1 && r->e2)
        s += "[" + std::to_string(e / (size_t(r->e1) * r->e2)) + "][" + std::to_string(e / r->e2 % r->e1) + "][" +
             std::to_string(e % r->e2) + "]";
    return s;
}

std::string describe_watch(Worker &w) {
    const llmc_thread &t = w.cur->t;
    char head[400];
    std::snprintf(head, sizeof head, "kernel '%s', block (%u, %u, %u)", w.L->name.c_str(), t.blockIdx.x,
                  t.blockIdx.y, t.blockIdx.z);
    const Access &b = w.found_b;
    const char *verb_b = b.atomic ? "atomically updated" : w.found_b_write ? "wrote" : "read";
    if (w.found_oob) {
        const Region *r = &w.regions[0];  // the array that ends last before the access
        for (const Region &q : w.regions)
            if (q.off <= w.found_off && q.off >= r->off) r = &q;
        const size_t past = w.found_off - (r->off + r->size);
        std::string what = r == &w.regions[0]
            ? "the dynamic shared memory '" + std::string(r->name) + "' (" + std::to_string(r->size) +
              " bytes: the launch's shared_mem)"
            : "the __shared__ array '" + std::string(r->name) + "' (" + std::to_string(r->size) +
              " bytes, declared at " + r->file + ":" + std::to_string(r->line) + ")";
        return "shared memory out of bounds in " + std::string(head) + ", " + thread_at(w, b.tid) + ": it " +
               verb_b + " " + ::past(past) + " the end of " + what + " at " + line_of(b.pc) +
               ".\nCheck the index arithmetic against the array's size.";
    }
    const Access &a = w.found_a;
    const char *verb_a = a.atomic ? "atomically updated" : w.found_a_write ? "wrote" : "read";
    const bool warp = a.tid / 32 == b.tid / 32;
    // Global: "{arg 0 byte 20}", which checked.py turns into the argument's name and index (out[5]).
    const std::string element = w.found_arg < 0 ? element_at(w, w.found_off)
        : "{arg " + std::to_string(w.L->arrays[size_t(w.found_arg)].arg) + " byte " + std::to_string(w.found_off) + "}";
    return "data race on " + std::string(w.found_arg < 0 ? "shared" : "global") + " memory in " +
           std::string(head) + ": " + thread_at(w, a.tid) + " " + verb_a + " " + element + " at " + line_of(a.pc) + " and " + thread_at(w, b.tid) + " " + verb_b +
           " it at " + line_of(b.pc) + " with no __syncthreads between them" +
           (warp ? " (nor a __syncwarp: they are lanes of one warp)" : "") +
           ".\nOn a GPU the result depends on which thread runs first. Put a __syncthreads() between the two "
           "accesses" + (warp ? " (or a __syncwarp() for lanes of one warp)" : "") +
           ", or make a sum with atomicAdd.";
}
#endif

std::string describe_fault(Worker &w) {
#ifdef LLMC_RACECHECK
    if (w.sig == kWatchFound) return describe_watch(w);
#endif
    Launch &L = *w.L;
    const uintptr_t a = reinterpret_cast<uintptr_t>(w.sig_addr);
    char buf[900];
    if (w.sig == SIGSEGV || w.sig == SIGBUS) {
        for (auto &f : w.fibers) {
            uintptr_t s = reinterpret_cast<uintptr_t>(f->stack);
            if (a < s && a + kStackGuard >= s) {
                std::snprintf(buf, sizeof buf, "%s: stack overflow: the thread needs more than its %zu bytes of "
                              "stack (a large local array, or deep recursion). Make the array smaller or "
                              "__shared__, or raise LLMC_FIBER_STACK (bytes).", where(w).c_str(), w.stack_size);
                return buf;
            }
        }
        for (auto &s : L.staged) {
            uintptr_t end = reinterpret_cast<uintptr_t>(s.data + s.bytes);
            uintptr_t guard = reinterpret_cast<uintptr_t>(s.region + s.data_pages);
            if (a >= end && a < guard + g_page) {
                std::snprintf(buf, sizeof buf, "%s: an access %s the end of argument %d (%s, an array of %zu "
                              "bytes). %s%s", where(w).c_str(),
                              past(arg_past(L, s.last_arg, reinterpret_cast<char *>(a))).c_str(), s.last_arg,
                              L.arg_names[s.last_arg].c_str(), size_t(L.arg_bytes[s.last_arg]), kBoundsHint, kRerun);
                return buf;
            }
        }
        if (a < 65536)
            std::snprintf(buf, sizeof buf, "%s: a null pointer was dereferenced (address 0x%zx).%s",
                          where(w).c_str(), size_t(a), kRerun);
        else
            std::snprintf(buf, sizeof buf, "%s: an invalid memory access at address 0x%zx: an index far outside "
                          "its array, or a pointer that points nowhere.%s", where(w).c_str(), size_t(a), kRerun);
        return buf;
    }
    if (w.sig == SIGFPE) {
        bool intdiv = w.sig_code == FPE_INTDIV || w.sig_code == FPE_INTOVF;
        std::snprintf(buf, sizeof buf, "%s: %s (a GPU gives an unspecified value instead; the emulator stops).%s",
                      where(w).c_str(), intdiv ? "integer division or remainder by zero (or INT_MIN / -1)"
                                               : "an arithmetic exception", kRerun);
        return buf;
    }
    std::snprintf(buf, sizeof buf, "%s: an illegal instruction (a __trap(), or code the compiler proved can never "
                  "run correctly).%s", where(w).c_str(), kRerun);
    return buf;
}

void on_fault(Worker &w) {
    Launch &L = *w.L;
#ifdef LLMC_RACECHECK
    watch(w, false);
    t_nopen = 0;
#endif
    if (w.sig == kCancelSignal) {
        std::lock_guard<std::mutex> g(L.mu);
        if (L.stopped_running.empty()) {
            L.stopped_running = block_and_thread(w);
            L.fault_pc = w.sig_pc;
        }
        return;
    }
    std::string msg = describe_fault(w);
    std::lock_guard<std::mutex> g(L.mu);
    if (!L.failed.exchange(true)) {
        L.error = msg;
        L.fault_pc = w.sig_pc;
    }
}

void worker_loop(Worker *w, Launch *L) {
    tw = w;
    w->L = L;
    ensure_altstack();
    {
        std::lock_guard<std::mutex> g(L->mu);
        w->thread = pthread_self();
        w->running = true;
    }
    if (sigsetjmp(w->jmp, 1) == 0) {
        for (;;) {
            if (L->failed.load()) break;
            long b = L->next.fetch_add(1);
            if (b >= L->nblocks) break;
            run_block(*w, b);
        }
    } else {
        on_fault(*w);
    }
    {
        std::lock_guard<std::mutex> g(L->mu);
        w->running = false;
        if (L->failed.load())  // stop the others too, even in a loop that never switches
            for (auto &o : L->workers)
                if (o->running) pthread_kill(o->thread, kCancelSignal);
    }
    llmc_rt_self = nullptr;
    tw = nullptr;
}

// ---------------------------------------------------------------------------------------------------------
// Staging of argument arrays (see Staged).
std::vector<std::pair<size_t, char *>> g_regions;  // free mappings by data size, reused between launches
size_t g_region_bytes = 0;

char *get_region(size_t data_pages) {
    for (size_t i = 0; i < g_regions.size(); i++) {
        if (g_regions[i].first == data_pages) {
            char *r = g_regions[i].second;
            g_regions.erase(g_regions.begin() + long(i));
            g_region_bytes -= data_pages;
            return r;
        }
    }
    void *m = mmap(nullptr, data_pages + g_page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    char *r = static_cast<char *>(m);
    mprotect(r + data_pages, g_page, PROT_NONE);
    return r;
}

void put_region(char *r, size_t data_pages) {
    g_regions.emplace_back(data_pages, r);
    g_region_bytes += data_pages;
    while (g_regions.size() > 32 || g_region_bytes > (size_t(256) << 20)) {
        munmap(g_regions.front().second, g_regions.front().first + g_page);
        g_region_bytes -= g_regions.front().first;
        g_regions.erase(g_regions.begin());
    }
}

// Argument i covers bytes[i] bytes; around it, before[i] and after[i] bytes of the same array (a view's
// neighbours) are copied too, since CUDA allows touching them.
void stage(Launch &L, void **args, int nargs, const long long *bytes, const long long *before,
           const long long *after, const int *writable) {
    struct Item { char *lo, *hi, *p; int i; };
    std::vector<Item> items;
    L.argv.assign(args, args + nargs);
    L.ptrs.assign(size_t(nargs), nullptr);
#if defined(__SANITIZE_ADDRESS__)
    return;  // AddressSanitizer watches the arrays where they are, more closely than a copy could
#endif
    for (int i = 0; i < nargs; i++) {
        char *p = bytes[i] >= 0 ? *static_cast<char **>(args[i]) : nullptr;
        if (p) items.push_back({p - before[i], p + bytes[i] + after[i], p, i});
    }
    std::sort(items.begin(), items.end(), [](const Item &a, const Item &b) { return a.lo < b.lo; });
    for (size_t k = 0; k < items.size();) {
        size_t j = k + 1;
        char *end = items[k].hi, *last_end = items[k].p + bytes[items[k].i];
        int last = items[k].i;  // the argument that ends last: messages about the copy's end name it
        while (j < items.size() && items[j].lo < end) {
            char *e = items[j].p + bytes[items[j].i];
            if (items[j].hi > end || (items[j].hi == end && e > last_end)) {
                end = items[j].hi; last = items[j].i; last_end = e;
            }
            j++;
        }
        Staged s;
        s.orig = items[k].lo;
        s.bytes = size_t(end - s.orig);
        s.slack = (size_t(-reinterpret_cast<uintptr_t>(end)) & 15) + g_page;  // keeps alignments mod 16
        s.data_pages = (s.bytes + s.slack + g_page - 1) / g_page * g_page;
        s.region = get_region(s.data_pages);
        s.data = s.region + s.data_pages - s.slack - s.bytes;
        s.last_arg = last;
        std::memcpy(s.data, s.orig, s.bytes);
        std::memset(s.data + s.bytes, kSlackByte, s.slack);
        s.last_write = last;
        char *write_end = nullptr;
        for (size_t m = k; m < j; m++) {
            const int i = items[m].i;
            if (writable[i] && items[m].p + bytes[i] >= write_end) { write_end = items[m].p + bytes[i]; s.last_write = i; }
            s.writable |= writable[items[m].i] != 0;
            L.ptrs[items[m].i] = s.data + (items[m].p - s.orig);
            L.argv[items[m].i] = &L.ptrs[items[m].i];
        }
        if (L.tracing) {
            const int i = items[k].i;
            s.vdelta = L.trace_vaddr[size_t(i)] - reinterpret_cast<long long>(L.ptrs[size_t(i)]);
        }
        L.staged.push_back(s);
        k = j;
    }
}

void unstage(Launch &L) {
    for (auto &s : L.staged) {
        for (size_t i = 0; i < s.slack; i++) {
            if ((unsigned char)s.data[s.bytes + i] == kSlackByte) continue;
            if (!L.failed.exchange(true)) {
                char buf[600];
                std::snprintf(buf, sizeof buf, "kernel '%s' wrote %s the end of argument %d (%s, an array of %zu "
                              "bytes). %s%s", L.name.c_str(),
                              past(arg_past(L, s.last_write, s.data + s.bytes + i)).c_str(), s.last_write,
                              L.arg_names[s.last_write].c_str(), size_t(L.arg_bytes[s.last_write]), kBoundsHint,
                              kRerun);
                L.error = buf;
            }
            break;
        }
        if (s.writable) std::memcpy(s.orig, s.data, s.bytes);
        put_region(s.region, s.data_pages);
    }
    L.staged.clear();
}

#ifdef LLMC_RACECHECK
// Checked mode watches the argument arrays (see Word) in copies of their own, page-aligned heap blocks, so that
// the watched pages hold nothing else (AddressSanitizer still knows each block's size). Arguments that overlap
// share one copy, with the neighbours of a view (see stage).
void copy_arrays(Launch &L, void **args, int nargs, const long long *bytes, const long long *before,
                 const long long *after, const int *writable) {
    struct Item { char *lo, *hi, *p; int i; };
    std::vector<Item> items;
    for (int i = 0; i < nargs; i++) {
        char *p = bytes[i] > 0 ? *static_cast<char **>(args[i]) : nullptr;
        if (p) items.push_back({p - before[i], p + bytes[i] + after[i], p, i});
    }
    std::sort(items.begin(), items.end(), [](const Item &a, const Item &b) { return a.lo < b.lo; });
    for (size_t k = 0; k < items.size();) {
        size_t j = k + 1;
        char *hi = items[k].hi;
        while (j < items.size() && items[j].lo < hi) hi = std::max(hi, items[j++].hi);
        const size_t n = size_t(hi - items[k].lo);
        void *m = nullptr;
        if (posix_memalign(&m, g_page, n)) throw std::bad_alloc();
        char *c = static_cast<char *>(m);
        std::memcpy(c, items[k].lo, n);
        bool w = false;
        for (size_t q = k; q < j; q++) {
            const int i = items[q].i;
            char *p = c + (items[q].p - items[k].lo);
            L.ptrs[size_t(i)] = p;
            L.argv[size_t(i)] = &L.ptrs[size_t(i)];
            L.arrays.push_back(Span{p, p + bytes[i], i});
            w |= writable[i] != 0;
        }
        L.pages.push_back(Span{c, c + (n + g_page - 1) / g_page * g_page, -1});
        L.origs.push_back(Launch::Copy{items[k].lo, n, w});
        k = j;
    }
}
#endif

// Run the workers: the calling thread is the first. A worker that ends on a failure stops the others.
void run_workers(Launch *L) {
    std::vector<std::thread> threads;
    for (size_t i = 1; i < L->workers.size(); i++) threads.emplace_back(worker_loop, L->workers[i].get(), L);
    worker_loop(L->workers[0].get(), L);
    for (auto &t : threads) t.join();
}

void watchdog(Launch *L) {
    std::unique_lock<std::mutex> lk(L->mu);
    if (L->cv.wait_for(lk, std::chrono::duration<double>(L->limit), [&] { return L->done; })) return;
    if (L->cancel == kNotCancelled) L->cancel = kTimedOut;
    L->failed.store(true);
    for (auto &w : L->workers)
        if (w->running) pthread_kill(w->thread, kCancelSignal);
}

void finish(Launch *L) {
    unstage(*L);
    if (L->cancel == kTimedOut) {
        const std::string &at = L->stopped_running.empty() ? L->stopped_yielding : L->stopped_running;
        char buf[1200];
        std::snprintf(buf, sizeof buf, "kernel '%s' did not finish within the time limit of %g s "
                      "(LLMC_KERNEL_TIMEOUT)%s%s.\nLikely causes: a loop whose condition never changes, or a "
                      "thread that spins waiting for a value another thread of its block will write. A GPU since "
                      "Volta would eventually run that other thread; the emulator runs the threads of a block one "
                      "at a time and never pre-empts one, so the wait never ends here. Wait with __syncthreads() "
                      "instead of spinning.", L->name.c_str(), L->limit,
                      at.empty() ? "" : "; it was stopped in ", at.c_str());
        L->error = buf;
    } else if (L->cancel == kInterrupted) {
        L->error = "kernel '" + L->name + "' was interrupted";
    }
    if (L->output_cut)
        L->output += "[printf output stopped after 4 MiB: later lines were dropped, as a GPU drops them when its "
                     "printf buffer is full]\n";
}

// Record an access of `size` bytes at `a` by the current thread if it is to shared memory or to an argument array
// (not the thread's own stack, nor the runtime's state). Larger accesses are recorded as 16-byte pieces.
void trace_access(const void *a, size_t size, unsigned flags, void *pc) {
    Worker *w = tw;
    if (!w || !w->in_fiber || !w->L->tracing) return;
    Launch &L = *w->L;
    const char *p = static_cast<const char *>(a);
    long long delta;
    if (p >= w->shared && p < w->shared + kArena) {
        delta = -reinterpret_cast<long long>(w->shared);
        flags |= kTraceShared;
    } else {
        const Staged *s = nullptr;
        for (const Staged &t : L.staged)
            if (p >= t.data && p < t.data + t.bytes + t.slack) s = &t;
        if (!s) return;
        delta = s->vdelta;
    }
    const Fiber *f = w->cur;
    const unsigned long long at = (unsigned long long)(reinterpret_cast<long long>(p) + delta);
    const unsigned long long pc_off = (unsigned long long)(static_cast<char *>(pc) - L.pc_base);
    for (size_t done = 0; done < size; done += 16) {
        if (L.trace.size() >= L.trace_limit) {
            char buf[300];
            std::snprintf(buf, sizeof buf, "kernel '%s': the traced launch made more than %zu accesses to memory; "
                          "trace a smaller launch (fewer blocks, smaller arrays)", L.name.c_str(), L.trace_limit);
            fail_now(*w, buf);
        }
        L.trace.push_back(TraceRecord{at + done, pc_off, w->block, (unsigned short)(f->t.warp * 32 + f->t.lane),
                                      (unsigned char)std::min<size_t>(16, size - done), (unsigned char)flags});
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// The calls a kernel built for tracing makes (-fsanitize=thread): the compiler puts one before every load and
// store, and turns atomic operations into calls that do the operation. Loads by an atomic operation are not
// recorded: llmc_cuda.h's atomics load the old value before their compare-and-swap, which is one access.
extern "C" {
#define LLMC_PC __builtin_return_address(0)
#define LLMC_TRACE_SIZE(n) \
    void __tsan_read##n(void *a) { trace_access(a, n, 0, LLMC_PC); } \
    void __tsan_write##n(void *a) { trace_access(a, n, kTraceStore, LLMC_PC); } \
    void __tsan_unaligned_read##n(void *a) { trace_access(a, n, 0, LLMC_PC); } \
    void __tsan_unaligned_write##n(void *a) { trace_access(a, n, kTraceStore, LLMC_PC); } \
    void __tsan_volatile_read##n(void *a) { trace_access(a, n, 0, LLMC_PC); } \
    void __tsan_volatile_write##n(void *a) { trace_access(a, n, kTraceStore, LLMC_PC); }
LLMC_TRACE_SIZE(1) LLMC_TRACE_SIZE(2) LLMC_TRACE_SIZE(4) LLMC_TRACE_SIZE(8) LLMC_TRACE_SIZE(16)
#undef LLMC_TRACE_SIZE
void __tsan_read_range(void *a, unsigned long n) { trace_access(a, n, 0, LLMC_PC); }
void __tsan_write_range(void *a, unsigned long n) { trace_access(a, n, kTraceStore, LLMC_PC); }
void *__tsan_memcpy(void *d, const void *s, size_t n) {
    trace_access(s, n, 0, LLMC_PC);
    trace_access(d, n, kTraceStore, LLMC_PC);
    return std::memcpy(d, s, n);
}
void *__tsan_memmove(void *d, const void *s, size_t n) {
    trace_access(s, n, 0, LLMC_PC);
    trace_access(d, n, kTraceStore, LLMC_PC);
    return std::memmove(d, s, n);
}
void *__tsan_memset(void *d, int c, size_t n) {
    trace_access(d, n, kTraceStore, LLMC_PC);
    return std::memset(d, c, n);
}
void __tsan_init(void) {}
void __tsan_func_entry(void *) {}
void __tsan_func_exit(void) {}
void __tsan_vptr_update(void **, void *) {}
void __tsan_vptr_read(void **) {}
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
#define LLMC_AT(a) trace_access(const_cast<T *>(a), sizeof(T), kTraceStore | kTraceAtomic, LLMC_PC)
#define LLMC_TRACE_ATOMICS(bits, type) \
    typedef type llmc_a##bits; \
    llmc_a##bits __tsan_atomic##bits##_load(const volatile llmc_a##bits *a, int) { \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
    void __tsan_atomic##bits##_store(volatile llmc_a##bits *a, llmc_a##bits v, int) { \
        using T = llmc_a##bits; LLMC_AT(a); __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
    llmc_a##bits __tsan_atomic##bits##_exchange(volatile llmc_a##bits *a, llmc_a##bits v, int) { \
        using T = llmc_a##bits; LLMC_AT(a); return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
    LLMC_TRACE_RMW(bits, fetch_add) LLMC_TRACE_RMW(bits, fetch_sub) LLMC_TRACE_RMW(bits, fetch_and) \
    LLMC_TRACE_RMW(bits, fetch_or) LLMC_TRACE_RMW(bits, fetch_xor) LLMC_TRACE_RMW(bits, fetch_nand) \
    int __tsan_atomic##bits##_compare_exchange_strong(volatile llmc_a##bits *a, llmc_a##bits *c, llmc_a##bits v, \
                                                     int, int) { \
        using T = llmc_a##bits; LLMC_AT(a); \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); } \
    int __tsan_atomic##bits##_compare_exchange_weak(volatile llmc_a##bits *a, llmc_a##bits *c, llmc_a##bits v, \
                                                   int, int) { \
        using T = llmc_a##bits; LLMC_AT(a); \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); } \
    llmc_a##bits __tsan_atomic##bits##_compare_exchange_val(volatile llmc_a##bits *a, llmc_a##bits c, \
                                                           llmc_a##bits v, int, int) { \
        using T = llmc_a##bits; LLMC_AT(a); \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return c; }
#define LLMC_TRACE_RMW(bits, op) \
    llmc_a##bits __tsan_atomic##bits##_##op(volatile llmc_a##bits *a, llmc_a##bits v, int) { \
        using T = llmc_a##bits; LLMC_AT(a); return __atomic_##op(a, v, __ATOMIC_SEQ_CST); }
LLMC_TRACE_ATOMICS(8, char) LLMC_TRACE_ATOMICS(16, short) LLMC_TRACE_ATOMICS(32, int)
LLMC_TRACE_ATOMICS(64, long long)
#undef LLMC_TRACE_ATOMICS
#undef LLMC_TRACE_RMW
#undef LLMC_AT
#undef LLMC_PC

// Arm tracing for the next launch: vaddr[i] is argument i's address on the virtual GPU; at most `limit` records.
__attribute__((visibility("default"))) void llmc_rt_trace_next(const long long *vaddr, int nargs, size_t limit) {
    g_trace_next.armed = true;
    g_trace_next.limit = limit;
    g_trace_next.vaddr.assign(vaddr, vaddr + nargs);
}
// The last traced launch's record (llmc_rt_trace_size() entries of TraceRecord), and a way to free it.
__attribute__((visibility("default"))) const void *llmc_rt_trace_records(void) { return g_trace.data(); }
__attribute__((visibility("default"))) size_t llmc_rt_trace_size(void) { return g_trace.size(); }
__attribute__((visibility("default"))) void llmc_rt_trace_clear(void) { std::vector<TraceRecord>().swap(g_trace); }
}  // extern "C"

// ---------------------------------------------------------------------------------------------------------
// The calls kernels make (declared in llmc_cuda.h).
extern "C" {

void llmc_rt_syncthreads(const char *file, int line) {
    Worker &w = *tw;
    unsigned long long g = w.bar_gen;
    if (++w.bar_arrived == w.n_threads - w.n_exited) {
        w.bar_arrived = 0;
        w.bar_gen++;
        return;
    }
    wait_until(w, w.cur, [&] { return w.bar_gen != g; }, "__syncthreads", file, line);
}

static unsigned long long warp_collective(Worker &w, unsigned mask, int op, unsigned long long value, int pred,
                                          int src, const char *file, int line) {
    Fiber *f = w.cur;
    Warp &wp = w.warps[f->t.warp];
    const unsigned lane = f->t.lane, bit = 1u << lane;
    char buf[500];
    if (!(mask & bit)) {
        std::snprintf(buf, sizeof buf, "%s:%d: %s: lane %u calls %s with mask 0x%08x, which does not include "
                      "its own lane", file, line, where(w).c_str(), lane, kOpNames[op], mask);
        fail_now(w, buf);
    }
    if (mask & ~wp.exist) {
        std::snprintf(buf, sizeof buf, "%s:%d: %s: %s with mask 0x%08x names lanes that do not exist: warp %u "
                      "has only lanes 0x%08x because the block has %d threads. Use a block size that is a "
                      "multiple of 32, or a mask of the lanes that exist.", file, line, where(w).c_str(),
                      kOpNames[op], mask, f->t.warp, wp.exist, w.n_threads);
        fail_now(w, buf);
    }
    if (mask & wp.exited) {
        std::snprintf(buf, sizeof buf, "%s:%d: %s: %s with mask 0x%08x names lanes 0x%08x that have already "
                      "returned from the kernel. Every lane named in a mask must reach the collective.", file, line,
                      where(w).c_str(), kOpNames[op], mask, mask & wp.exited);
        fail_now(w, buf);
    }
    if (op == kShfl && !((mask >> src) & 1u)) {
        std::snprintf(buf, sizeof buf, "%s:%d: %s: lane %u reads lane %d in a shuffle with mask 0x%08x, which does "
                      "not include lane %d: the value is undefined in CUDA. Include every lane read from in the "
                      "mask, or do not use the result of such lanes' shuffles.", file, line, where(w).c_str(),
                      lane, src, mask, src);
        fail_now(w, buf);
    }
    int i = 0;
    while (i < wp.ncoll && !(wp.coll[i].target & mask)) i++;
    if (i == wp.ncoll) {
        wp.coll[i] = Collective{mask, 0, 0, op, file, line};
        wp.ncoll++;
    } else if (wp.coll[i].op != op || wp.coll[i].target != mask) {
        std::snprintf(buf, sizeof buf, "%s:%d: %s: the lanes of warp %u disagree: this lane calls %s with mask "
                      "0x%08x while lanes 0x%08x are in %s with mask 0x%08x at %s:%d", file, line, where(w).c_str(),
                      f->t.warp, kOpNames[op], mask, wp.coll[i].arrived, kOpNames[wp.coll[i].op],
                      wp.coll[i].target, wp.coll[i].file, wp.coll[i].line);
        fail_now(w, buf);
    }
    Collective &c = wp.coll[i];
    wp.val[lane] = value;
    wp.src[lane] = (unsigned char)src;
    wp.ready &= ~bit;
    if (pred) c.votes |= bit;
    c.arrived |= bit;
    if (c.arrived == c.target) {  // complete: every member's result, then the collective is gone
#ifdef LLMC_RACECHECK
        wp.gen++;
#endif
        for (unsigned m = c.target; m; m &= m - 1) {
            unsigned l = unsigned(__builtin_ctz(m));
            wp.res[l] = op == kShfl ? wp.val[wp.src[l]] : c.votes;
        }
        wp.ready |= c.target;
        wp.coll[i] = wp.coll[--wp.ncoll];
    } else {
        wait_until(w, f, [&] { return (wp.ready & bit) != 0; }, kOpNames[op], file, line);
    }
    return wp.res[lane];
}

unsigned long long llmc_rt_shfl(unsigned mask, unsigned long long value, int src, int kind, const char *file,
                                int line) {
    (void)kind;
    return warp_collective(*tw, mask, kShfl, value, 0, src & 31, file, line);
}

unsigned llmc_rt_vote(unsigned mask, int predicate, const char *file, int line) {
    return unsigned(warp_collective(*tw, mask, kVote, 0, predicate, 0, file, line));
}

void llmc_rt_syncwarp(unsigned mask, const char *file, int line) {
    warp_collective(*tw, mask, kSyncwarp, 0, 0, 0, file, line);
}

// Before each access through a volatile pointer: let the other threads of the block take their turn, so the
// lanes of a warp that talk through volatile shared memory step in lockstep, as warp-synchronous code expects.
void llmc_rt_yield(void) {
    Worker &w = *tw;
#ifdef LLMC_RACECHECK
    w.cur->vol = true;
#endif
    pass_on(w, w.cur, true);
}

void *llmc_rt_shared(int slot, size_t size, size_t align, const char *file, int line) {
    Worker &w = *tw;
    if (slot < 0 || slot >= kMaxSlots) {
        char buf[300];
        std::snprintf(buf, sizeof buf, "%s:%d: too many __shared__ declarations in one kernel source (at most "
                      "%d)", file, line, kMaxSlots);
        fail_now(w, buf);
    }
    if (w.slot_off[slot] < 0) {
        size_t off = (w.static_base + w.static_used + align - 1) & ~(align - 1);
        size_t static_total = off + size - w.static_base;
#ifdef LLMC_RACECHECK
        const size_t pad = kRedzone * (w.touched.size() + 1);  // red zones are not shared memory
        static_total -= pad - kRedzone;
        if (off + size - pad > w.L->shared_limit) {
#else
        if (off + size > w.L->shared_limit) {
#endif
            char buf[500];
            std::snprintf(buf, sizeof buf, "%s:%d: %s: shared memory overflow: %zu bytes of static __shared__ "
                          "arrays plus %zu bytes of dynamic shared memory exceed the limit of %zu bytes per block "
                          "(48 KiB unless raised with max_dynamic_shared_size_bytes, as on a GPU)", file, line,
                          where(w).c_str(), static_total, w.L->dyn_shared, w.L->shared_limit);
            fail_now(w, buf);
        }
        w.slot_off[slot] = long(off);
        w.static_used = off + size - w.static_base;
#ifdef LLMC_RACECHECK
        w.static_used += kRedzone;
#endif
        w.dirty = std::max(w.dirty, off + size);
        w.touched.push_back(slot);
    }
    return w.shared + w.slot_off[slot];
}

void *llmc_rt_dynamic_shared(void) { return tw->shared; }

// Checked mode's versions (llmc_cuda.h): the runtime also learns each array's name and shape.
void *llmc_rt_shared_checked(int slot, size_t size, size_t align, const char *file, int line, const char *name,
                             size_t elem, unsigned rank, unsigned e1, unsigned e2) {
#ifdef LLMC_RACECHECK
    Worker &w = *tw;
    const bool fresh = slot >= 0 && slot < kMaxSlots && w.slot_off[slot] < 0;
    char *p = static_cast<char *>(llmc_rt_shared(slot, size, align, file, line));
    if (fresh) w.regions.push_back(Region{size_t(p - w.shared), size, elem, rank, e1, e2, name, file, line});
    return p;
#else
    (void)name; (void)elem; (void)rank; (void)e1; (void)e2;
    return llmc_rt_shared(slot, size, align, file, line);
#endif
}

void *llmc_rt_dynamic_shared_checked(const char *name, size_t elem) {
#ifdef LLMC_RACECHECK
    tw->regions[0].name = name;
    tw->regions[0].elem = elem;
#else
    (void)name; (void)elem;
#endif
    return tw->shared;
}

void llmc_rt_fail(const char *file, int line, const char *fmt, ...) {
    Worker &w = *tw;
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fail_now(w, std::string(file) + ":" + std::to_string(line) + ": " + where(w) + ": " + msg);
    __builtin_unreachable();
}

int llmc_rt_printf(const char *fmt, ...) {
    Worker &w = *tw;
    char small[512];
    va_list ap, again;
    va_start(ap, fmt);
    va_copy(again, ap);
    int n = std::vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    Launch &L = *w.L;
    w.no_cancel = 1;  // an allocation and a lock follow: a cancel waits for the next switch
    if (n > 0) {
        std::string line;
        if (size_t(n) < sizeof small) {
            line.assign(small, size_t(n));
        } else {
            line.resize(size_t(n));
            std::vsnprintf(&line[0], size_t(n) + 1, fmt, again);
        }
        std::lock_guard<std::mutex> g(L.mu);
        if (L.output.size() + line.size() <= kPrintfCap) L.output += line;
        else L.output_cut = true;
    }
    va_end(again);
    w.no_cancel = 0;
    abandon_if_stopped(w, w.cur);
    return n;
}

// Run one launch: 0, or 1 with the message in llmc_rt_error() (printf output: llmc_rt_output()). args[i]
// points at argument i; for a pointer argument, bytes[i] is its array's size (it is staged, see Staged) and
// writable[i] whether to copy it back (before[i], after[i]: see stage); bytes[i] = -1 for scalars. names[i] describes argument i in messages.
// timeout > 0: stop the launch after that many seconds. Ctrl-C stops it too: llmc_rt_interrupted() is then 1.
__attribute__((visibility("default"))) int llmc_rt_launch(void (*thunk)(void **), void **args, int nargs,
                                                          const long long *bytes, const long long *before,
                                                          const long long *after, const int *writable,
                                                          const char **names, const unsigned *grid,
                                                          const unsigned *block, size_t dyn_shared,
                                                          size_t shared_limit, int nworkers, size_t stack_size,
                                                          const char *name, double timeout) {
    g_output.clear();
    g_error.clear();
    g_fault_offset = -1;
#ifdef LLMC_RACECHECK
    const char *races = std::getenv("LLMC_CHECK_RACES");
    g_watch = !(races && std::strcmp(races, "0") == 0);
#endif
    g_interrupted = 0;
    auto L = std::make_unique<Launch>();
    L->thunk = thunk; L->name = name;
    std::copy(grid, grid + 3, L->grid);
    std::copy(block, block + 3, L->block);
    L->dyn_shared = dyn_shared; L->shared_limit = shared_limit;
    L->nblocks = long(grid[0]) * grid[1] * grid[2];
    L->limit = timeout;
    L->caller = pthread_self();
    for (int i = 0; i < nargs; i++) L->arg_names.push_back(names[i]);
    L->arg_bytes.assign(bytes, bytes + nargs);
    if (g_trace_next.armed) {
        L->tracing = true;
        L->trace_limit = g_trace_next.limit;
        L->trace_vaddr = std::move(g_trace_next.vaddr);
        g_trace_next.armed = false;
        Dl_info info;
        if (dladdr(reinterpret_cast<void *>(thunk), &info)) L->pc_base = static_cast<char *>(info.dli_fbase);
        nworkers = 1;  // the blocks one after another: the record's order is the same on every run
    }
    g_trace.clear();
    const int nthreads = int(block[0] * block[1] * block[2]);
#ifdef LLMC_RACECHECK
    if (g_watch) nworkers = 1;  // pages of the arrays are opened and closed: one thread touches them at a time
#endif
    const int k = int(std::max(1L, std::min<long>(nworkers, L->nblocks)));
    {
        std::lock_guard<std::mutex> g(g_pool_mu);
        while ((int)L->workers.size() < k && !g_pool.empty()) {
            L->workers.push_back(std::move(g_pool.back()));
            g_pool.pop_back();
        }
    }
    try {
        while ((int)L->workers.size() < k) L->workers.push_back(std::make_unique<Worker>());
        for (auto &w : L->workers) ensure_fibers(*w, nthreads, stack_size);
        stage(*L, args, nargs, bytes, before, after, writable);
#ifdef LLMC_RACECHECK
        if (g_watch) copy_arrays(*L, args, nargs, bytes, before, after, writable);
#endif
    } catch (const std::bad_alloc &) {
        g_error = "could not allocate fiber stacks for " + std::to_string(nthreads) + " threads, or copies of the "
                  "argument arrays";
        for (auto &s : L->staged) put_region(s.region, s.data_pages);
#ifdef LLMC_RACECHECK
        for (auto &c : L->pages) std::free(c.lo);
#endif
        std::lock_guard<std::mutex> g(g_pool_mu);
        for (auto &w : L->workers) g_pool.push_back(std::move(w));
        return 1;
    }
    install_handlers();
    g_launch.store(L.get());
    g_active.store(true);
    struct sigaction sa, prev;
    sigaction(SIGINT, nullptr, &prev);
    const bool catch_sigint = (prev.sa_flags & SA_SIGINFO) || prev.sa_handler != SIG_IGN;
    if (catch_sigint) {
        std::memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigint;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, &g_prev_sigint);
    }
    std::thread dog;
    if (timeout > 0) dog = std::thread(watchdog, L.get());
    run_workers(L.get());
#ifdef LLMC_RACECHECK
    for (size_t k = 0; k < L->pages.size(); k++) {
        const Span &c = L->pages[k];
        if (L->origs[k].writable) std::memcpy(L->origs[k].orig, c.lo, L->origs[k].bytes);
        std::free(c.lo);
    }
#endif
    if (dog.joinable()) {
        {
            std::lock_guard<std::mutex> g(L->mu);
            L->done = true;
        }
        L->cv.notify_all();
        dog.join();
    }
    if (catch_sigint) sigaction(SIGINT, &g_prev_sigint, nullptr);
    g_active.store(false);
    g_launch.store(nullptr);
    finish(L.get());
    g_output = std::move(L->output);
    g_trace = std::move(L->trace);
    g_error = std::move(L->error);
    g_interrupted = L->cancel == kInterrupted;
    Dl_info info;
    if (L->fault_pc && dladdr(L->fault_pc, &info) && info.dli_fname) {
        g_fault_lib = info.dli_fname;
        g_fault_offset = (long long)(reinterpret_cast<char *>(L->fault_pc) - static_cast<char *>(info.dli_fbase));
    }
    {
        std::lock_guard<std::mutex> g(g_pool_mu);
        for (auto &w : L->workers) g_pool.push_back(std::move(w));
    }
    return L->failed.load() ? 1 : 0;
}

__attribute__((visibility("default"))) int llmc_rt_interrupted(void) { return g_interrupted; }
__attribute__((visibility("default"))) const char *llmc_rt_error(void) { return g_error.c_str(); }
__attribute__((visibility("default"))) const char *llmc_rt_output(void) { return g_output.c_str(); }
// Where the fault (or the thread stopped by a time limit) was: the library's path and the offset in it, or -1.
__attribute__((visibility("default"))) long long llmc_rt_fault_offset(void) { return g_fault_offset; }
__attribute__((visibility("default"))) const char *llmc_rt_fault_lib(void) { return g_fault_lib.c_str(); }

}  // extern "C"
