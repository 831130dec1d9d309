// The SIMT emulation layer (see d3k_emu/simt.h for the model): fibers with a
// hand-written context switch, block barriers and warp exchanges with seeded
// random release orders, guarded dynamic shared memory, fault trapping, and the
// few CUDA runtime calls the launchers make.
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "d3k_emu/control.h"
#include "d3k_emu/simt.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

thread_local uint3 threadIdx = {0, 0, 0};
thread_local uint3 blockIdx = {0, 0, 0};
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// ---------------------------------------------------------------- context switch
#if defined(__x86_64__)
// d3k_emu_switch(&save_sp, next_sp): pushes the callee-saved registers (and the
// SSE / x87 control words) on the current stack, stores its stack pointer in
// *save_sp, and resumes the context whose stack pointer is next_sp.
extern "C" void d3k_emu_switch(void** save_sp, void* next_sp);
extern "C" void d3k_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl d3k_emu_switch
  .hidden d3k_emu_switch
  .type d3k_emu_switch,@function
d3k_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size d3k_emu_switch,.-d3k_emu_switch

  .p2align 4
  .globl d3k_emu_trampoline
  .hidden d3k_emu_trampoline
  .type d3k_emu_trampoline,@function
d3k_emu_trampoline:
  andq $-16, %rsp
  call d3k_emu_fiber_main
  ud2
  .size d3k_emu_trampoline,.-d3k_emu_trampoline
)");
#endif

extern "C" __attribute__((used)) void d3k_emu_fiber_main();

namespace d3k_emu {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kStackBytes = 64 * 1024;  // per fiber; a guard page below each
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxDynSmem = 227 * 1024;  // sm_90's opt-in maximum
constexpr size_t kDefaultDynSmem = 48 * 1024;  // without cudaFuncSetAttribute
constexpr size_t kAltStackBytes = 64 * 1024;

enum class Wait : uint8_t { kRun, kBarrier, kWarp, kDone };

struct Fiber {
  void* sp = nullptr;
  char* guard = nullptr;  // [guard, guard + kPage) is PROT_NONE; the stack is above it
  uint3 tid = {0, 0, 0};
  int warp = 0, lane = 0;
  Wait wait = Wait::kRun;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
};

struct Warp {
  int size = 0, arrived = 0, exited = 0, parity = 0;
  uint64_t buf[2][32];
};

// splitmix64
struct Rng {
  uint64_t s = 1;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) { return next() % n; }
};

template <typename V>
void shuffle(V& v, size_t begin, size_t end, Rng& rng) {
  for (size_t i = end; i > begin + 1; --i) {
    const size_t j = begin + rng.below(i - begin);
    std::swap(v[i - 1], v[j]);
  }
}

std::atomic<uint64_t> g_seed{1};
std::atomic<uint64_t> g_seed_epoch{0};

struct State {
  std::vector<Fiber> fibers = std::vector<Fiber>(kMaxThreads);
  int stacks = 0;  // fibers with a stack
  std::vector<Warp> warps = std::vector<Warp>(kMaxThreads / 32);
  std::vector<int> ready;
  size_t ready_head = 0;
  std::vector<uint64_t> order;
  int nthreads = 0, arrived = 0, exited = 0;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_uc;
#endif
  Fiber* cur = nullptr;
  KernelBody body{nullptr, nullptr};
  char* smem_region = nullptr;  // kMaxDynSmem bytes, then a PROT_NONE page
  char* smem = nullptr;         // this launch's dynamic shared memory, ending at the guard page
  Rng rng;
  uint64_t epoch = ~0ull, launch_no = 0;
  volatile bool in_kernel = false;
  sigjmp_buf jmp;
  void* fault_addr = nullptr;
  int fault_sig = 0;
  std::string fail_msg;
  cudaError_t last_error = cudaSuccess;  // sticky until cudaGetLastError
  cudaError_t failed_code = cudaSuccess;  // code of last_msg
  std::string last_msg;
  Stats stats;
};

thread_local State* t_state = nullptr;

void* map_or_die(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "d3k-emu: mmap of %zu bytes failed\n", bytes);
    std::abort();
  }
  return p;
}

State& st() {
  if (t_state == nullptr) {
    State* s = new State();
    s->smem_region = static_cast<char*>(map_or_die(kMaxDynSmem + kPage));
    mprotect(s->smem_region + kMaxDynSmem, kPage, PROT_NONE);
    // Faults are handled on an alternate stack: the faulting fiber's stack may be the problem.
    stack_t ss = {};
    ss.ss_sp = map_or_die(kAltStackBytes);
    ss.ss_size = kAltStackBytes;
    sigaltstack(&ss, nullptr);
    t_state = s;
  }
  return *t_state;
}

[[noreturn]] void fail(const std::string& msg) {
  State& s = st();
  s.fail_msg = msg;
  siglongjmp(s.jmp, 2);
}

std::string idx3(uint3 v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}
std::string where() {
  return "block " + idx3(blockIdx) + " thread " + idx3(threadIdx);
}

// ---------------------------------------------------------------- faults
struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* si, void* uc) {
  State* s = t_state;
  if (s != nullptr && s->in_kernel) {
    s->fault_addr = si->si_addr;
    s->fault_sig = sig;
    siglongjmp(s->jmp, 1);
  }
  // Not a kernel of ours: hand the fault to whoever handled it before.
  struct sigaction* old = sig == SIGBUS ? &g_old_bus : &g_old_segv;
  if (old->sa_flags & SA_SIGINFO) {
    if (old->sa_sigaction != nullptr) return old->sa_sigaction(sig, si, uc);
  } else if (old->sa_handler != SIG_IGN && old->sa_handler != SIG_DFL && old->sa_handler != nullptr) {
    return old->sa_handler(sig);
  }
  signal(sig, SIG_DFL);  // returning re-executes the access, which now takes the default action
}

void install_fault_handlers() {
  for (int sig : {SIGSEGV, SIGBUS}) {
    struct sigaction cur = {};
    sigaction(sig, nullptr, &cur);
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_fault) continue;
    struct sigaction sa = {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, sig == SIGBUS ? &g_old_bus : &g_old_segv);
  }
}

// ---------------------------------------------------------------- fibers
void ensure_stacks(State& s, int n) {
  for (; s.stacks < n; ++s.stacks) {
    char* base = static_cast<char*>(map_or_die(kStackBytes + kPage));
    mprotect(base, kPage, PROT_NONE);
    s.fibers[s.stacks].guard = base;
  }
}

void start_fiber(State& s, Fiber& f) {
  char* top = f.guard + kPage + kStackBytes;
#if defined(__x86_64__)
  uint64_t* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t{15});
  *--sp = 0;                                                   // alignment slot
  *--sp = reinterpret_cast<uint64_t>(&d3k_emu_trampoline);     // "return" address
  for (int i = 0; i < 6; ++i) *--sp = 0;                       // rbp rbx r12 r13 r14 r15
  uint32_t csr[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  *--sp = static_cast<uint64_t>(csr[0]) | (static_cast<uint64_t>(csr[1] & 0xffffu) << 32);
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.guard + kPage;
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, d3k_emu_fiber_main, 0);
#endif
  (void)s;
}

void resume(State& s, Fiber& f) {
  s.cur = &f;
  threadIdx = f.tid;
  ++s.stats.switches;
  s.stats.schedule = (s.stats.schedule ^ static_cast<uint64_t>(&f - s.fibers.data())) * 0x100000001b3ull;
#if defined(__x86_64__)
  d3k_emu_switch(&s.sched_sp, f.sp);
#else
  swapcontext(&s.sched_uc, &f.uc);
#endif
}

void yield(State& s, Wait w) {
  Fiber& f = *s.cur;
  f.wait = w;
#if defined(__x86_64__)
  d3k_emu_switch(&f.sp, s.sched_sp);
#else
  swapcontext(&f.uc, &s.sched_uc);
#endif
}

void release(State& s, int first, int count, Wait w) {
  const size_t begin = s.ready.size();
  for (int i = first; i < first + count; ++i) {
    if (s.fibers[i].wait == w) {
      s.fibers[i].wait = Wait::kRun;
      s.ready.push_back(i);
    }
  }
  shuffle(s.ready, begin, s.ready.size(), s.rng);
}

// After fiber i stopped (waits or exited): release or diagnose its barriers.
void settle(State& s, Fiber& f) {
  Warp& w = s.warps[f.warp];
  switch (f.wait) {
    case Wait::kBarrier: ++s.arrived; break;
    case Wait::kWarp: ++w.arrived; break;
    case Wait::kDone: ++s.exited; ++w.exited; break;
    case Wait::kRun: break;
  }
  if (w.arrived > 0 && w.arrived + w.exited == w.size) {
    if (w.exited > 0)
      fail("warp exchange (__shfl_*_sync with a full mask) reached by " + std::to_string(w.arrived) +
           " lanes of warp " + std::to_string(f.warp) + " while " + std::to_string(w.exited) +
           " of its lanes have exited, in block " + idx3(blockIdx));
    w.arrived = 0;
    w.parity ^= 1;
    release(s, f.warp * 32, w.size, Wait::kWarp);
  }
  if (s.arrived > 0 && s.arrived + s.exited == s.nthreads) {
    if (s.exited > 0)
      fail("__syncthreads() reached by " + std::to_string(s.arrived) + " threads while " +
           std::to_string(s.exited) + " threads of the block have exited, in block " + idx3(blockIdx));
    s.arrived = 0;
    release(s, 0, s.nthreads, Wait::kBarrier);
  }
}

void run_block(State& s) {
  const dim3 bd = blockDim;
  const int n = s.nthreads;
  s.arrived = s.exited = 0;
  for (int wi = 0; wi * 32 < n; ++wi) {
    Warp& w = s.warps[wi];
    w.size = std::min(32, n - wi * 32);
    w.arrived = w.exited = w.parity = 0;
  }
  s.ready.clear();
  s.ready_head = 0;
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.tid = {static_cast<unsigned>(i) % bd.x, (static_cast<unsigned>(i) / bd.x) % bd.y,
             static_cast<unsigned>(i) / (bd.x * bd.y)};
    f.warp = i / 32;
    f.lane = i % 32;
    f.wait = Wait::kRun;
    start_fiber(s, f);
    s.ready.push_back(i);
  }
  shuffle(s.ready, 0, s.ready.size(), s.rng);
  while (s.ready_head < s.ready.size()) {
    Fiber& f = s.fibers[s.ready[s.ready_head++]];
    resume(s, f);
    settle(s, f);
  }
  s.cur = nullptr;
  if (s.exited != n) {
    int at_barrier = 0, at_warp = 0;
    for (int i = 0; i < n; ++i) {
      at_barrier += s.fibers[i].wait == Wait::kBarrier;
      at_warp += s.fibers[i].wait == Wait::kWarp;
    }
    fail("deadlock in block " + idx3(blockIdx) + ": " + std::to_string(at_barrier) +
         " threads wait at __syncthreads() and " + std::to_string(at_warp) +
         " at warp exchanges that can never complete");
  }
}

std::string fault_message(State& s) {
  char buf[160];
  const uintptr_t a = reinterpret_cast<uintptr_t>(s.fault_addr);
  for (int i = 0; i < s.stacks; ++i) {
    const uintptr_t g = reinterpret_cast<uintptr_t>(s.fibers[i].guard);
    if (a >= g && a < g + kPage) return "fiber stack overflow (" + std::to_string(kStackBytes) + " bytes) in " + where();
  }
  const uintptr_t sg = reinterpret_cast<uintptr_t>(s.smem_region + kMaxDynSmem);
  if (a >= sg && a < sg + kPage)
    return "out-of-bounds shared memory access past the dynamic shared memory, in " + where();
  std::snprintf(buf, sizeof buf, "illegal address 0x%llx (%s) in ", static_cast<unsigned long long>(a),
                s.fault_sig == SIGBUS ? "SIGBUS" : "SIGSEGV");
  return std::string("out-of-bounds access: ") + buf + where();
}

void set_error(State& s, cudaError_t e, const std::string& msg) {
  s.last_error = e;
  s.failed_code = e;
  s.last_msg = msg;
}

}  // namespace

// ---------------------------------------------------------------- device API
void syncthreads() {
  State& s = st();
  if (s.cur == nullptr) fail("__syncthreads() outside a kernel");
  yield(s, Wait::kBarrier);
}

void shfl(unsigned mask, const void* v, void* out, size_t size, Shfl kind, int arg, int width) {
  State& s = st();
  if (s.cur == nullptr) fail("warp exchange outside a kernel");
  Fiber& f = *s.cur;
  Warp& w = s.warps[f.warp];
  const unsigned full = w.size == 32 ? 0xffffffffu : ((1u << w.size) - 1u);
  if (mask != full) {
    char m[64];
    std::snprintf(m, sizeof m, "0x%08x (warp of %d lanes)", mask, w.size);
    fail(std::string("warp exchange with mask ") + m + ": only full-warp masks are emulated, in " + where());
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail("warp exchange width " + std::to_string(width) + " is not a power of two <= 32, in " + where());
  const int par = w.parity;
  uint64_t slot = 0;
  std::memcpy(&slot, v, size);
  w.buf[par][f.lane] = slot;
  yield(s, Wait::kWarp);
  const int lane = f.lane, seg = lane & ~(width - 1);
  int src = lane;
  switch (kind) {
    case Shfl::kIdx: src = seg + (((arg % width) + width) % width); break;
    case Shfl::kXor: src = lane ^ arg; if (src < seg || src >= seg + width) src = lane; break;
    case Shfl::kDown: src = lane + arg; if (src >= seg + width) src = lane; break;
    case Shfl::kUp: src = lane - arg; if (src < seg) src = lane; break;
  }
  if (src < 0 || src >= w.size) src = lane;
  std::memcpy(out, &w.buf[par][src], size);
}

void* dynamic_smem() { return st().smem; }

cudaError_t launch_grid(dim3 grid, dim3 block, size_t smem, KernelBody body) {
  State& s = st();
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (nthreads < 1 || nthreads > kMaxThreads || block.z > 64 || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    set_error(s, cudaErrorInvalidConfiguration,
              "invalid launch configuration: grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
                  std::to_string(grid.z) + ", block " + std::to_string(block.x) + "x" + std::to_string(block.y) +
                  "x" + std::to_string(block.z));
    return cudaErrorInvalidConfiguration;
  }
  if (smem > kDefaultDynSmem) {
    set_error(s, cudaErrorInvalidValue,
              "dynamic shared memory of " + std::to_string(smem) + " bytes exceeds the 48 KB a launch gets "
              "without cudaFuncSetAttribute");
    return cudaErrorInvalidValue;
  }
  const uint64_t epoch = g_seed_epoch.load();
  if (s.epoch != epoch) {
    s.epoch = epoch;
    s.launch_no = 0;
  }
  s.rng.s = g_seed.load() * 0x2545f4914f6cdd1dull + (++s.launch_no) * 0x9e3779b97f4a7c15ull;
  ++s.stats.launches;
  s.stats.schedule = 0xcbf29ce484222325ull;
  s.body = body;
  s.nthreads = static_cast<int>(nthreads);
  ensure_stacks(s, s.nthreads);
  // Dynamic shared memory ends at a guard page, so running past it faults.
  s.smem = s.smem_region + kMaxDynSmem - ((smem + 15) & ~size_t{15});
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  s.order.resize(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) s.order[i] = i;
  shuffle(s.order, 0, nblocks, s.rng);
  gridDim = grid;
  blockDim = block;

  install_fault_handlers();
  s.in_kernel = true;
  const int jumped = sigsetjmp(s.jmp, 1);
  if (jumped != 0) {
    s.in_kernel = false;
    s.cur = nullptr;
    // An execution error is reported like the GPU reports one: asynchronously, by
    // the next cudaGetLastError (the launch call itself succeeded).
    if (jumped == 1) set_error(s, cudaErrorIllegalAddress, fault_message(s));
    else set_error(s, cudaErrorLaunchFailure, s.fail_msg);
    return cudaSuccess;
  }
  for (uint64_t k = 0; k < nblocks; ++k) {
    const uint64_t b = s.order[k];
    s.stats.schedule = (s.stats.schedule ^ (b << 12)) * 0x100000001b3ull;
    blockIdx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                   static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    std::memset(s.smem, 0xff, smem);
    ++s.stats.blocks;
    run_block(s);
  }
  s.in_kernel = false;
  return cudaSuccess;
}

cudaError_t take_last_error() {
  State& s = st();
  const cudaError_t e = s.last_error;
  s.last_error = cudaSuccess;
  return e;
}
cudaError_t peek_last_error() { return st().last_error; }
const char* last_error_message() { return st().last_msg.c_str(); }

// ---------------------------------------------------------------- controls
void set_seed(uint64_t seed) {
  g_seed.store(seed);
  g_seed_epoch.fetch_add(1);
}
uint64_t seed() { return g_seed.load(); }
Stats stats() { return st().stats; }
int sm_count() {
  const char* v = std::getenv("D3K_EMU_SM_COUNT");
  const int n = v != nullptr ? std::atoi(v) : 0;
  return n > 0 ? n : 132;
}

}  // namespace d3k_emu

extern "C" void d3k_emu_fiber_main() {
  using namespace d3k_emu;
  State& s = st();
  s.body.fn(s.body.ctx);
  yield(s, Wait::kDone);
  std::abort();  // a finished fiber is never resumed
}

// ---------------------------------------------------------------- runtime API
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d3k_emu::sm_count(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  std::memset(prop, 0, sizeof *prop);
  std::snprintf(prop->name, sizeof prop->name, "d3kernels SIMT emulation (CPU)");
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = d3k_emu::sm_count();
  prop->totalGlobalMem = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return d3k_emu::take_last_error(); }
cudaError_t cudaPeekAtLastError() { return d3k_emu::peek_last_error(); }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t e) {
  if (e != cudaSuccess && d3k_emu::st().failed_code == e) return d3k_emu::last_error_message();
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return cudaGetErrorName(e);
  }
}
