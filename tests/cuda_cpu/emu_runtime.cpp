// Runtime of the CPU emulation (see include/cuda_runtime.h): fibers, the checked
// scheduler, shared memory, guarded device buffers, the sticky launch error.
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#include <dlfcn.h>
#include <sanitizer/asan_interface.h>
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
}
#else
#define EMU_ASAN 0
#endif

namespace emu {

enum State { kReady, kWaitBlock, kWaitWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid{0, 0, 0};
  int linear = 0;
  State state = kReady;
  int line = 0;  // where it waits
  int kind = 0;  // warp op kind, or 0 for a block barrier
  const char* what = "";
  unsigned mask = 0;
  uint64_t value = 0;
  uint64_t got[32] = {};  // the group's values after a warp rendezvous
  int reduced = 0;        // __syncthreads_or's result
  size_t shared_calls = 0;
#if EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

namespace {

size_t stack_size() { return EMU_ASAN ? (256u << 10) : (128u << 10); }

#if EMU_ASAN
// ASan's swapcontext interceptor clears the shadow of the whole target stack on every
// switch (10x slower here). The fiber annotations below tell ASan about each switch, and a
// fiber's stack is unpoisoned once when a block starts, so libc's own swapcontext is used.
int swap(ucontext_t* from, const ucontext_t* to) {
  using Fn = int (*)(ucontext_t*, const ucontext_t*);
  static const Fn real = [] {
    void* libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    void* sym = libc ? dlsym(libc, "swapcontext") : nullptr;
    return sym ? reinterpret_cast<Fn>(sym) : &swapcontext;
  }();
  return real(from, to);
}
#else
int swap(ucontext_t* from, const ucontext_t* to) { return swapcontext(from, to); }
#endif
constexpr size_t kSharedLimit = 48u << 10;  // the default per-block limit without opt-in

struct Options {
  uint64_t seed = 1;
  unsigned atomic_yield_per_256 = 64;  // chance of a scheduling point before an atomic
  int poison = 0xA5;
} opts;

struct BlockState {
  std::vector<Fiber> fibers;
  uint3 block{0, 0, 0};
  dim3 block_dim, grid_dim;
  char* arena = nullptr;  // kSharedLimit bytes, then a guard page
  size_t static_used = 0;
  std::vector<size_t> static_offsets;
  size_t dyn_size = 0;
  ucontext_t sched;
  std::vector<int> ready;
  std::string error;
  bool in_kernel = false;
  sigjmp_buf fault_jmp;
} blk;

std::string sticky;  // the launch error, until cudaGetLastError()
std::string last_message;
uint64_t rng_state = 1;
unsigned long long launches = 0, blocks_run = 0, switches = 0;

uint64_t rnd() {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

std::vector<char*> stack_pool;

char* get_stack(size_t i) {
  while (stack_pool.size() <= i) {
    const size_t size = stack_size() + page();
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "emu: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(p, page(), PROT_NONE);  // stack overflow faults instead of corrupting a neighbour
    stack_pool.push_back(static_cast<char*>(p) + page());
  }
  return stack_pool[i];
}

std::string where(const Fiber& f) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) of block (%u,%u,%u)", f.tid.x, f.tid.y, f.tid.z, blk.block.x,
                blk.block.y, blk.block.z);
  return buf;
}

const char* kind_name(int kind) {
  switch (kind) {
    case kShfl: return "__shfl_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflXor: return "__shfl_xor_sync";
    case kBallot: return "__ballot_sync";
    case kMatchAny: return "__match_any_sync";
    case kSyncwarp: return "__syncwarp";
    default: return "warp intrinsic";
  }
}

std::string waiting(const Fiber& f) {
  char buf[200];
  if (f.state == kDone) return "has exited";
  if (f.state == kWaitBlock) {
    std::snprintf(buf, sizeof buf, "waits at %s (line %d)", f.what, f.line);
  } else if (f.state == kWaitWarp) {
    std::snprintf(buf, sizeof buf, "waits at %s (line %d, mask 0x%08x)", kind_name(f.kind), f.line, f.mask);
  } else {
    return "is runnable";
  }
  return buf;
}

#if EMU_ASAN
const void* sched_bottom = nullptr;  // the scheduler's (the calling thread's) stack
size_t sched_size = 0;
#endif

// Back to the scheduler; the caller has set its state.
void to_scheduler() {
  Fiber* self = current;
  ++switches;
#if EMU_ASAN
  // The destination's stack bounds must be the scheduler's real ones (recorded on the way
  // in), or ASan loses track of the main stack and reports false overflows there.
  __sanitizer_start_switch_fiber(self->state == kDone ? nullptr : &self->fake_stack, sched_bottom, sched_size);
#endif
  swap(&self->ctx, &blk.sched);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(self->fake_stack, &sched_bottom, &sched_size);
#endif
}

// Ends the block with an error; never returns to the fiber.
[[noreturn]] void fail(const std::string& msg) {
  if (blk.error.empty()) blk.error = msg;
  current->state = kDone;
  to_scheduler();
  std::abort();  // unreachable: a failed block is never resumed
}

struct Body {
  void (*fn)(void*);
  void* ctx;
} body;

void fiber_main() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &sched_bottom, &sched_size);
#endif
  body.fn(body.ctx);
  current->state = kDone;
  to_scheduler();
}

bool resolve_warps() {
  bool progress = false;
  const int n = static_cast<int>(blk.fibers.size());
  for (int w = 0; w * 32 < n; ++w) {
    for (int l = 0; l < 32 && w * 32 + l < n; ++l) {
      Fiber& f = blk.fibers[w * 32 + l];
      if (f.state != kWaitWarp) continue;
      bool complete = true;
      for (int k = 0; k < 32; ++k) {
        if (!((f.mask >> k) & 1u)) continue;
        const int t = w * 32 + k;
        if (t >= n) {
          complete = false;
          break;
        }
        const Fiber& g = blk.fibers[t];
        if (g.state != kWaitWarp || g.kind != f.kind || g.mask != f.mask) {
          complete = false;
          break;
        }
      }
      if (!complete) continue;
      uint64_t vals[32] = {};
      for (int k = 0; k < 32; ++k)
        if ((f.mask >> k) & 1u) vals[k] = blk.fibers[w * 32 + k].value;
      const unsigned mask = f.mask;
      for (int k = 0; k < 32; ++k) {
        if (!((mask >> k) & 1u)) continue;
        Fiber& g = blk.fibers[w * 32 + k];
        std::memcpy(g.got, vals, sizeof vals);
        g.state = kReady;
        blk.ready.push_back(w * 32 + k);
      }
      progress = true;
    }
  }
  return progress;
}

bool resolve_block() {
  const Fiber* first = nullptr;
  bool any_done = false;
  for (const Fiber& f : blk.fibers) {
    if (f.state == kDone) {
      any_done = true;
    } else if (f.state != kWaitBlock) {
      return false;
    } else if (!first) {
      first = &f;
    }
  }
  if (!first) return false;
  if (any_done) {
    for (const Fiber& f : blk.fibers)
      if (f.state == kDone) {
        blk.error = std::string(first->what) + " at line " + std::to_string(first->line) + " is not reached by " +
                    where(f) + ", which has exited";
        return false;
      }
  }
  int reduced = 0;
  for (const Fiber& f : blk.fibers) {
    if (f.line != first->line) {
      blk.error = "divergent block barrier: " + where(*first) + " " + waiting(*first) + " but " + where(f) + " " +
                  waiting(f);
      return false;
    }
    reduced |= static_cast<int>(f.value);
  }
  for (size_t i = 0; i < blk.fibers.size(); ++i) {
    blk.fibers[i].reduced = reduced;
    blk.fibers[i].state = kReady;
    blk.ready.push_back(static_cast<int>(i));
  }
  return true;
}

std::string diagnose() {
  const int n = static_cast<int>(blk.fibers.size());
  for (int t = 0; t < n; ++t) {
    const Fiber& f = blk.fibers[t];
    if (f.state != kWaitWarp) continue;
    for (int k = 0; k < 32; ++k) {
      if (!((f.mask >> k) & 1u)) continue;
      const int u = (t & ~31) + k;
      if (u >= n) return where(f) + " " + waiting(f) + ": its mask names lane " + std::to_string(k) +
                         ", which does not exist in a block of " + std::to_string(n) + " threads";
      const Fiber& g = blk.fibers[u];
      if (g.state != kWaitWarp || g.kind != f.kind || g.mask != f.mask)
        return where(f) + " " + waiting(f) + ": its mask names lane " + std::to_string(k) + " but " + where(g) + " " +
               waiting(g);
    }
  }
  return "deadlock: no thread can make progress";
}

// Runs one block to completion (or to its first error).
void run_block() {
  const int n = static_cast<int>(blk.fibers.size());
  blk.ready.clear();
  for (int i = 0; i < n; ++i) {
    Fiber& f = blk.fibers[i];
    f.state = kReady;
    f.shared_calls = 0;
    f.stack = get_stack(static_cast<size_t>(i));
#if EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(f.stack, stack_size());  // frames of a fiber abandoned by a failed launch
#endif
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = stack_size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
    blk.ready.push_back(i);
  }
  for (;;) {
    while (!blk.ready.empty()) {
      const size_t pick = static_cast<size_t>(rnd() % blk.ready.size());
      const int t = blk.ready[pick];
      blk.ready[pick] = blk.ready.back();
      blk.ready.pop_back();
      Fiber& f = blk.fibers[t];
      current = &f;
#if EMU_ASAN
      void* save = nullptr;
      __sanitizer_start_switch_fiber(&save, f.stack, stack_size());
#endif
      swap(&blk.sched, &f.ctx);
#if EMU_ASAN
      __sanitizer_finish_switch_fiber(save, nullptr, nullptr);
#endif
      current = nullptr;
      if (!blk.error.empty()) return;
      if (f.state == kReady) blk.ready.push_back(t);
    }
    bool all_done = true;
    for (const Fiber& f : blk.fibers) all_done &= f.state == kDone;
    if (all_done) return;
    if (resolve_warps()) continue;
    if (resolve_block()) continue;
    if (blk.error.empty()) blk.error = diagnose();
    return;
  }
}

struct sigaction old_segv, old_bus;
char* alt_stack = nullptr;
constexpr size_t kAltStack = 1 << 16;

void on_fault(int sig, siginfo_t* info, void*) {
  if (!blk.in_kernel) {
    sigaction(sig, sig == SIGSEGV ? &old_segv : &old_bus, nullptr);
    raise(sig);
    return;
  }
  char buf[256];
  std::snprintf(buf, sizeof buf, "invalid memory access at %p by %s", info->si_addr,
                current ? where(*current).c_str() : "the scheduler");
  blk.error = buf;
  siglongjmp(blk.fault_jmp, 1);
}

}  // namespace

thread_local Fiber* current = nullptr;

uint3& thread_idx() { return current->tid; }
uint3& block_idx() { return blk.block; }
dim3& block_dim() { return blk.block_dim; }
dim3& grid_dim() { return blk.grid_dim; }
unsigned lane_id() { return static_cast<unsigned>(current->linear & 31); }

int block_barrier(int line, int pred, const char* what) {
  Fiber* f = current;
  f->state = kWaitBlock;
  f->line = line;
  f->kind = 0;
  f->what = what;
  f->value = static_cast<uint64_t>(pred);
  to_scheduler();
  return f->reduced;
}

const uint64_t* warp_sync(int line, unsigned mask, uint64_t value, int kind) {
  Fiber* f = current;
  if (!((mask >> (f->linear & 31)) & 1u)) {
    char buf[96];
    std::snprintf(buf, sizeof buf, " calls %s (line %d) with mask 0x%08x that does not name its own lane",
                  kind_name(kind), line, mask);
    fail(where(*f) + buf);
  }
  f->state = kWaitWarp;
  f->line = line;
  f->kind = kind;
  f->mask = mask;
  f->value = value;
  to_scheduler();
  return f->got;
}

void check_source_lane(int line, unsigned mask, int src) {
  if (!((mask >> src) & 1u)) {
    char buf[120];
    std::snprintf(buf, sizeof buf, " reads lane %d in a shuffle (line %d) whose mask 0x%08x does not name it", src, line,
                  mask);
    fail(where(*current) + buf);
  }
}

void atomic_point() {
  if (static_cast<unsigned>(rnd() & 255u) < opts.atomic_yield_per_256) {
    current->state = kReady;
    to_scheduler();
  }
}

void* static_shared(size_t size, size_t align) {
  Fiber* f = current;
  const size_t i = f->shared_calls++;
  if (i == blk.static_offsets.size()) {
    const size_t off = (blk.static_used + align - 1) / align * align;
    if (off + size + blk.dyn_size > kSharedLimit)
      fail("shared memory: " + std::to_string(off + size) + " bytes static + " + std::to_string(blk.dyn_size) +
           " dynamic exceed the 48 KiB per-block limit");
    blk.static_offsets.push_back(off);
    blk.static_used = off + size;
#if EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(blk.arena + off, size);  // the rest of the arena stays off limits
#endif
  }
  return blk.arena + blk.static_offsets[i];
}

// Dynamic shared memory ends at the arena's guard page: an overrun faults.
void* dynamic_shared() { return blk.arena + kSharedLimit - blk.dyn_size; }

void Launch::run(void (*fn)(void*), void* ctx) const {
  ++launches;
  if (!sticky.empty()) return;  // a failed launch poisons the context, as on a GPU
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    sticky = "invalid launch configuration: grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
             std::to_string(grid.z) + "), block of " + std::to_string(threads) + " threads";
    return;
  }
  if (smem > kSharedLimit) {
    sticky = "launch asks for " + std::to_string(smem) + " bytes of dynamic shared memory (limit 48 KiB)";
    return;
  }
  if (!blk.arena) {
    void* p = mmap(nullptr, kSharedLimit + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    blk.arena = static_cast<char*>(p);
    mprotect(blk.arena + kSharedLimit, page(), PROT_NONE);
    alt_stack = static_cast<char*>(std::malloc(kAltStack));
  }
  blk.fibers.assign(threads, Fiber());
  for (unsigned long long t = 0; t < threads; ++t) {
    Fiber& f = blk.fibers[t];
    f.linear = static_cast<int>(t);
    f.tid = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>((t / block.x) % block.y),
                  static_cast<unsigned>(t / (1ull * block.x * block.y))};
  }
  blk.block_dim = block;
  blk.grid_dim = grid;
  blk.dyn_size = (smem + 15) / 16 * 16;
  body = Body{fn, ctx};
  blk.error.clear();
  // The grid runs on a thread of its own: fibers, the fault handler's siglongjmp and the
  // scheduler never touch the caller's (Python's) stack, whose ASan shadow would otherwise
  // keep redzones of frames that were switched away from.
  std::thread worker([this] {
    stack_t ss{};
    ss.ss_sp = alt_stack;
    ss.ss_size = kAltStack;
    sigaltstack(&ss, nullptr);  // per thread: the fault handler runs on it
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
    for (unsigned z = 0; z < grid.z && blk.error.empty(); ++z)
      for (unsigned y = 0; y < grid.y && blk.error.empty(); ++y)
        for (unsigned x = 0; x < grid.x && blk.error.empty(); ++x) {
          blk.block = uint3{x, y, z};
          blk.static_used = 0;
          blk.static_offsets.clear();
#if EMU_ASAN
          ASAN_UNPOISON_MEMORY_REGION(blk.arena, kSharedLimit);
#endif
          std::memset(blk.arena, opts.poison, kSharedLimit);  // shared memory starts as garbage
#if EMU_ASAN
          ASAN_POISON_MEMORY_REGION(blk.arena, kSharedLimit - blk.dyn_size);  // unpoisoned as __shared__ variables appear
#endif
          ++blocks_run;
          blk.in_kernel = true;
          if (sigsetjmp(blk.fault_jmp, 1) == 0) run_block();
          blk.in_kernel = false;
        }
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, nullptr);
    current = nullptr;
  });
  worker.join();
  current = nullptr;
  if (!blk.error.empty()) sticky = blk.error;
}

}  // namespace emu

extern "C" {

const char* cudaGetErrorName(cudaError_t err) {
  return err == cudaSuccess ? "cudaSuccess" : err == cudaErrorInvalidValue ? "cudaErrorInvalidValue"
                                                                           : "cudaErrorLaunchFailure";
}
const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : emu::last_message.c_str();
}
cudaError_t cudaGetLastError() {
  if (emu::sticky.empty()) return cudaSuccess;
  emu::last_message = "emulated kernel failed: " + emu::sticky;
  emu::sticky.clear();
  return cudaErrorLaunchFailure;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

// --- harness controls (tests/cuda_cpu/harness.py) ---

void emu_configure(unsigned long long seed, unsigned atomic_yield_per_256, int poison) {
  emu::opts.seed = seed;
  emu::opts.atomic_yield_per_256 = atomic_yield_per_256;
  emu::opts.poison = poison;
  emu::rng_state = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  if (!emu::rng_state) emu::rng_state = 1;
}

void emu_counters(unsigned long long* out3) {
  out3[0] = emu::launches;
  out3[1] = emu::blocks_run;
  out3[2] = emu::switches;
}

// A device buffer of nbytes whose end touches a PROT_NONE page (and whose start follows
// one); the start is 16-byte aligned, so up to 15 bytes of slack may precede the guard.
void* emu_alloc(size_t nbytes) {
  const size_t pg = emu::page();
  const size_t body = (nbytes + 15) / 16 * 16;
  const size_t data_pages = (body + pg - 1) / pg;
  const size_t total = (data_pages + 2) * pg;
  char* base = static_cast<char*>(mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) return nullptr;
  mprotect(base, pg, PROT_NONE);
  mprotect(base + (data_pages + 1) * pg, pg, PROT_NONE);
  char* end = base + (data_pages + 1) * pg;
  char* start = end - nbytes;
  start -= reinterpret_cast<uintptr_t>(start) % 16;
  return start;
}

void emu_free(void* p, size_t nbytes) {
  const size_t pg = emu::page();
  const size_t body = (nbytes + 15) / 16 * 16;
  const size_t data_pages = (body + pg - 1) / pg;
  char* base = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(p) / pg * pg) - pg;
  munmap(base, (data_pages + 2) * pg);
}

}  // extern "C"
