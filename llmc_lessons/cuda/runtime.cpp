// runtime.cpp: the CPU emulator's runtime. Built once into a shared library and loaded with RTLD_GLOBAL, so
// every kernel library compiled against llmc_cuda.h finds the llmc_rt_* functions here.
//
// A launch runs the grid's blocks on a few worker OS threads (blocks taken from a shared counter). Inside a
// block, each CUDA thread is a fiber with its own stack; a round-robin scheduler resumes them in turn. A
// fiber runs until it exits or must wait (at __syncthreads, or for its warp at a shuffle/vote/__syncwarp).
// A full pass over the block in which no fiber made progress is a deadlock, reported instead of hanging.
#include "llmc_cuda.h"
#undef printf
#undef assert
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <sys/mman.h>
#include <thread>
#include <vector>

#if defined(LLMC_UCONTEXT) || !((defined(__x86_64__) || defined(__aarch64__)) && (defined(__linux__) || defined(__APPLE__)))
#define LLMC_USE_UCONTEXT 1
#include <ucontext.h>
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
enum FiberState { kReady, kWaiting, kDone };
enum WarpOp { kShfl, kVote, kSyncwarp };
const char *kOpNames[] = {"a warp shuffle (__shfl*_sync)", "a warp vote (__ballot/__any/__all_sync)", "__syncwarp"};

struct Launch;
struct Worker;

struct Fiber {
    llmc_thread t;
    Worker *w = nullptr;
    int state = kReady;
    Fiber *next = nullptr;  // the next live fiber of the block, in a ring (round-robin order)
    Fiber *prev = nullptr;
    const char *wait_what = "", *wait_file = "";
    int wait_line = 0;
    char *stack = nullptr;
#ifdef LLMC_USE_UCONTEXT
    ucontext_t uc;
#else
    void *sp = nullptr;
#endif
};

struct Warp {
    unsigned exist = 0;    // lanes that exist (the last warp of a block may be partial)
    unsigned arrived = 0;  // lanes arrived at the collective now being formed
    unsigned target = 0;   // lanes it waits for (the mask)
    int op = 0;
    unsigned long long gen = 0;
    unsigned long long slots[2][32];  // double-buffered by generation parity: one barrier per collective
    unsigned votes[2];
};

struct Launch {
    void (*thunk)(void **);
    void **args;
    unsigned grid[3], block[3];
    size_t dyn_shared, shared_limit;
    const char *name;
    long nblocks;
    std::atomic<long> next{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::string error, output;
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
#ifdef LLMC_USE_UCONTEXT
    ucontext_t sched_uc;
#else
    void *sched_sp = nullptr;
#endif

    Worker() {
        shared = static_cast<char *>(std::malloc(kSharedArena));
        std::fill(slot_off, slot_off + kMaxSlots, -1L);
    }
    ~Worker() {
        std::free(shared);
        for (auto &f : fibers) munmap(f->stack - 4096, stack_size + 4096);
    }
};

thread_local Worker *tw = nullptr;

std::mutex g_pool_mu;
std::vector<std::unique_ptr<Worker>> g_pool;  // idle workers, kept with their fiber stacks between launches
std::string g_error, g_output;

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

// Fiber f cannot go on (it waits): hand over to the next live fiber. If every live fiber in turn was
// resumed and could not go on, nothing can change any more: a deadlock, reported by the scheduler.
void pass_on(Worker &w, Fiber *f, bool made_progress) {
    w.stalled = made_progress ? 0 : w.stalled + 1;
    if (w.stalled > w.n_threads - w.n_exited) {
        w.deadlock = true;
        to_scheduler(w, f);
        __builtin_trap();  // a deadlocked block is never resumed
    }
    fiber_to_fiber(w, f, f->next);
}

void fiber_main(void *arg) {
    Fiber *f = static_cast<Fiber *>(arg);
    Worker &w = *f->w;
    w.L->thunk(w.L->args);
    f->state = kDone;
    w.n_exited++;
    w.stalled = 0;
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

[[noreturn]] void fail_now(Worker &w, const std::string &msg) {
    Launch &L = *w.L;
    {
        std::lock_guard<std::mutex> g(L.mu);
        if (!L.failed.exchange(true)) L.error = msg;
    }
    w.abort = true;
    to_scheduler(w, w.cur);
    __builtin_trap();  // an aborted block is never resumed
}

std::string where(Worker &w) {
    const llmc_thread &t = w.cur->t;
    char buf[200];
    std::snprintf(buf, sizeof buf, "kernel '%s', block (%u, %u, %u), thread (%u, %u, %u)", w.L->name,
                  t.blockIdx.x, t.blockIdx.y, t.blockIdx.z, t.threadIdx.x, t.threadIdx.y, t.threadIdx.z);
    return buf;
}

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
        for (auto &f : w.fibers) munmap(f->stack - 4096, w.stack_size + 4096);
        w.fibers.clear();
        w.stack_size = stack_size;
    }
    while ((int)w.fibers.size() < n) {
        auto f = std::make_unique<Fiber>();
        // One guard page under each stack: an overflow faults instead of corrupting a neighbour.
        char *mem = static_cast<char *>(mmap(nullptr, stack_size + 4096, PROT_READ | PROT_WRITE,
                                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        if (mem == MAP_FAILED) throw std::bad_alloc();
        mprotect(mem, 4096, PROT_NONE);
        f->stack = mem + 4096;
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
                  w.L->name, t.blockIdx.x, t.blockIdx.y, t.blockIdx.z);
    std::string msg = head;
    for (auto &g : groups) msg += "  " + std::to_string(g.second) + " threads wait in " + g.first + "\n";
    if (w.n_exited)
        msg += "  " + std::to_string(w.n_exited) + " threads have already exited the kernel.\n";
    msg += "Every thread of a block must reach each __syncthreads (and every lane named in a warp mask must "
           "reach the same collective): an early `return` or a barrier inside an `if` that not all threads "
           "take is the usual cause. Guard the work instead of returning before the barrier.";
    Launch &L = *w.L;
    std::lock_guard<std::mutex> g(L.mu);
    if (!L.failed.exchange(true)) L.error = msg;
}

void run_block(Worker &w, long b) {
    Launch &L = *w.L;
    const unsigned bx = L.block[0], by = L.block[1], bz = L.block[2];
    const int n = int(bx * by * bz);
    const unsigned gx = L.grid[0], gy = L.grid[1];
    uint3 bid = {unsigned(b % gx), unsigned((b / gx) % gy), unsigned(b / (long(gx) * gy))};
    // Fresh shared memory for every block: poisoned (0xFF bytes read as NaN floats, -1 integers).
    std::memset(w.shared, 0xFF, std::min(w.dirty, kSharedArena));
    w.static_base = (L.dyn_shared + 15) & ~size_t(15);
    w.static_used = 0;
    w.dirty = w.static_base;
    for (int s : w.touched) w.slot_off[s] = -1;
    w.touched.clear();
    w.n_threads = n; w.n_exited = 0; w.bar_arrived = 0; w.bar_gen = 0; w.abort = false;
    const int nwarps = (n + 31) / 32;
    w.warps.assign(nwarps, Warp{});
    for (int i = 0; i < nwarps; i++)
        w.warps[i].exist = (i == nwarps - 1 && n % 32) ? ((1u << (n % 32)) - 1u) : 0xffffffffu;
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
#ifdef LLMC_USE_UCONTEXT
        getcontext(&f->uc);
        f->uc.uc_stack.ss_sp = f->stack;
        f->uc.uc_stack.ss_size = w.stack_size;
        f->uc.uc_link = nullptr;
        makecontext(&f->uc, fiber_main_uc, 0);
#else
        f->sp = llmc_ctx_init(f->stack + w.stack_size, fiber_main, f);
#endif
    }
    for (int i = 0; i < n; i++) {  // the ring of live fibers, in thread order
        w.fibers[i]->next = w.fibers[(i + 1) % n].get();
        w.fibers[i]->prev = w.fibers[(i + n - 1) % n].get();
    }
    w.stalled = 0;
    w.deadlock = false;
    to_fiber(w, w.fibers[0].get());  // returns when every fiber has exited, on a deadlock, or on a failure
    if (w.deadlock && !w.abort) {
        report_deadlock(w, n);
        w.abort = true;
    }
}

void worker_loop(Worker *w, Launch *L) {
    tw = w;
    w->L = L;
    for (;;) {
        if (L->failed.load()) break;
        long b = L->next.fetch_add(1);
        if (b >= L->nblocks) break;
        run_block(*w, b);
    }
    llmc_rt_self = nullptr;
    tw = nullptr;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// The calls kernels make (declared in llmc_cuda.h).
extern "C" {

void llmc_rt_syncthreads(const char *file, int line) {
    Worker &w = *tw;
    unsigned long long g = w.bar_gen;
    if (++w.bar_arrived == w.n_threads) {
        w.bar_arrived = 0;
        w.bar_gen++;
        return;
    }
    wait_until(w, w.cur, [&] { return w.bar_gen != g; }, "__syncthreads", file, line);
}

static unsigned warp_collective(Worker &w, unsigned mask, int op, unsigned long long value, int pred,
                                unsigned long long *out_slot, int src, const char *file, int line) {
    Fiber *f = w.cur;
    Warp &wp = w.warps[f->t.warp];
    const unsigned lane = f->t.lane;
    char buf[400];
    if (!((mask >> lane) & 1u)) {
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
    const int par = int(wp.gen & 1);
    if (wp.arrived == 0) {
        wp.op = op;
        wp.target = mask;
        wp.votes[par] = 0;
    } else if (wp.op != op || wp.target != mask) {
        std::snprintf(buf, sizeof buf, "%s:%d: %s: the lanes of warp %u disagree: this lane calls %s with mask "
                      "0x%08x while others are in %s with mask 0x%08x", file, line, where(w).c_str(), f->t.warp,
                      kOpNames[op], mask, kOpNames[wp.op], wp.target);
        fail_now(w, buf);
    }
    wp.slots[par][lane] = value;
    if (pred) wp.votes[par] |= 1u << lane;
    wp.arrived |= 1u << lane;
    const unsigned long long g = wp.gen;
    if (wp.arrived == wp.target) {
        wp.arrived = 0;
        wp.gen++;
    } else {
        wait_until(w, f, [&] { return wp.gen != g; }, kOpNames[op], file, line);
    }
    if (out_slot) *out_slot = ((mask >> src) & 1u) ? wp.slots[par][src] : value;
    return wp.votes[par];
}

unsigned long long llmc_rt_shfl(unsigned mask, unsigned long long value, int src, int kind, const char *file,
                                int line) {
    (void)kind;
    unsigned long long out = value;
    warp_collective(*tw, mask, kShfl, value, 0, &out, src & 31, file, line);
    return out;
}

unsigned llmc_rt_vote(unsigned mask, int predicate, const char *file, int line) {
    return warp_collective(*tw, mask, kVote, 0, predicate, nullptr, 0, file, line);
}

void llmc_rt_syncwarp(unsigned mask, const char *file, int line) {
    warp_collective(*tw, mask, kSyncwarp, 0, 0, nullptr, 0, file, line);
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
        if (off + size > w.L->shared_limit) {
            char buf[500];
            std::snprintf(buf, sizeof buf, "%s:%d: %s: shared memory overflow: %zu bytes of static __shared__ "
                          "arrays plus %zu bytes of dynamic shared memory exceed the limit of %zu bytes per block "
                          "(48 KiB unless raised with max_dynamic_shared_size_bytes, as on a GPU)", file, line,
                          where(w).c_str(), static_total, w.L->dyn_shared, w.L->shared_limit);
            fail_now(w, buf);
        }
        w.slot_off[slot] = long(off);
        w.static_used = off + size - w.static_base;
        w.dirty = std::max(w.dirty, off + size);
        w.touched.push_back(slot);
    }
    return w.shared + w.slot_off[slot];
}

void *llmc_rt_dynamic_shared(void) { return tw->shared; }

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
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    Launch &L = *tw->L;
    std::lock_guard<std::mutex> g(L.mu);
    if (L.output.size() < (4u << 20)) L.output += buf;  // like the GPU's printf FIFO, output is bounded
    return n;
}

// Run one launch; returns 0, or 1 with the message in llmc_rt_error(). printf output: llmc_rt_output().
__attribute__((visibility("default"))) int llmc_rt_launch(void (*thunk)(void **), void **args,
                                                          const unsigned *grid, const unsigned *block,
                                                          size_t dyn_shared, size_t shared_limit, int nworkers,
                                                          size_t stack_size, const char *name) {
    Launch L;
    L.thunk = thunk; L.args = args; L.name = name;
    std::copy(grid, grid + 3, L.grid);
    std::copy(block, block + 3, L.block);
    L.dyn_shared = dyn_shared; L.shared_limit = shared_limit;
    L.nblocks = long(grid[0]) * grid[1] * grid[2];
    const int nthreads = int(block[0] * block[1] * block[2]);
    int k = int(std::max(1L, std::min<long>(nworkers, L.nblocks)));
    std::vector<std::unique_ptr<Worker>> ws;
    {
        std::lock_guard<std::mutex> g(g_pool_mu);
        while ((int)ws.size() < k && !g_pool.empty()) { ws.push_back(std::move(g_pool.back())); g_pool.pop_back(); }
    }
    while ((int)ws.size() < k) ws.push_back(std::make_unique<Worker>());
    try {
        for (auto &w : ws) ensure_fibers(*w, nthreads, stack_size);
    } catch (const std::bad_alloc &) {
        g_error = "could not allocate fiber stacks for " + std::to_string(nthreads) + " threads";
        return 1;
    }
    if (k == 1) {
        worker_loop(ws[0].get(), &L);
    } else {
        std::vector<std::thread> threads;
        for (auto &w : ws) threads.emplace_back(worker_loop, w.get(), &L);
        for (auto &t : threads) t.join();
    }
    {
        std::lock_guard<std::mutex> g(g_pool_mu);
        for (auto &w : ws) g_pool.push_back(std::move(w));
    }
    g_output = L.output;
    g_error = L.error;
    return L.failed.load() ? 1 : 0;
}

__attribute__((visibility("default"))) const char *llmc_rt_error(void) { return g_error.c_str(); }
__attribute__((visibility("default"))) const char *llmc_rt_output(void) { return g_output.c_str(); }

}  // extern "C"
