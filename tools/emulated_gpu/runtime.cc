// The emulated GPU's execution model: device memory with an initialisation shadow, kernels run
// block by block with every thread of a block a fiber (so barriers and warp shuffles really
// synchronise), and the checks a sanitizer would make on each memory access of a kernel.
//
// The kernel families are compiled with gcc's outline address instrumentation
// (-fsanitize=kernel-address with a call threshold of 0), which calls __asan_{load,store}N_noabort
// before every load and store through a pointer; this file supplies those functions and checks the
// access there. See docs/emulated_gpu.md.

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <link.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <sstream>

#include "emu_runtime.h"

McsEmuThreadView* mcs_emu_current = nullptr;  // declared extern "C" in emu_abi.h

namespace emu {

// ---- the lock and the sticky fault -----------------------------------------------------------

static std::mutex g_lock;
std::unique_lock<std::mutex> lock() { return std::unique_lock<std::mutex>(g_lock); }

static int g_sticky = kSuccess;
static std::string* g_sticky_message = nullptr;  // never freed: cuGetErrorString hands it out

static void print_report(const std::string& message) {
    std::fprintf(stderr, "emulated GPU: %s\n", message.c_str());
    if (const char* path = std::getenv("MCS_EMU_REPORT")) {
        if (FILE* f = std::fopen(path, "a")) {
            std::fprintf(f, "%s\n", message.c_str());
            std::fclose(f);
        }
    }
}

int fault(int code, const std::string& message) {
    print_report(message);
    if (g_sticky == kSuccess) {
        g_sticky = code;
        g_sticky_message = new std::string("emulated GPU fault: " + message);
    }
    return code;
}

int refuse(int code, const std::string& message) {
    print_report(message);
    return code;
}

int sticky_fault() { return g_sticky; }
const char* sticky_message() { return g_sticky_message ? g_sticky_message->c_str() : nullptr; }

// ---- device memory ------------------------------------------------------------------------------

// Gaps around every allocation, so that an access just past one lands in no allocation.
constexpr size_t kGuard = 512;
constexpr size_t kAlignment = 256;  // cudaMalloc's alignment
// Freed memory is held back this long before the host may reuse it, so that a stale pointer
// still finds no allocation instead of a newer one.
constexpr size_t kQuarantineBytes = size_t(64) << 20;

static std::map<uintptr_t, Allocation> g_allocations;  // by begin
static uint64_t g_next_serial = 1;
static size_t g_in_use = 0;
static std::deque<std::pair<void*, size_t>> g_quarantine;
static size_t g_quarantined = 0;

uintptr_t allocate(size_t bytes) {
    const size_t size = std::max<size_t>(bytes, 1);
    const size_t padded = (size + kAlignment - 1) / kAlignment * kAlignment;
    void* raw = std::aligned_alloc(kAlignment, padded + 2 * kGuard);
    if (!raw) return 0;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(raw) + kGuard;
    std::memset(reinterpret_cast<void*>(begin), 0xff, size);  // NaN as f32: a real GPU leaves garbage
    Allocation a;
    a.begin = begin;
    a.size = size;
    a.serial = g_next_serial++;
    a.initialised.assign(size, 0);
    g_allocations.emplace(begin, std::move(a));
    g_in_use += size;
    return begin;
}

bool release(uintptr_t address) {
    auto it = g_allocations.find(address);
    if (it == g_allocations.end()) return false;
    g_in_use -= it->second.size;
    const size_t padded = (it->second.size + kAlignment - 1) / kAlignment * kAlignment + 2 * kGuard;
    g_allocations.erase(it);
    g_quarantine.emplace_back(reinterpret_cast<void*>(address - kGuard), padded);
    g_quarantined += padded;
    while (g_quarantined > kQuarantineBytes && !g_quarantine.empty()) {
        std::free(g_quarantine.front().first);
        g_quarantined -= g_quarantine.front().second;
        g_quarantine.pop_front();
    }
    return true;
}

size_t bytes_in_use() { return g_in_use; }

Allocation* find_allocation(uintptr_t address) {
    auto it = g_allocations.upper_bound(address);
    if (it == g_allocations.begin()) return nullptr;
    --it;
    return address < it->second.end() ? &it->second : nullptr;
}

static std::string hex(uintptr_t v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "0x%" PRIxPTR, v);
    return buf;
}

std::string describe_allocation(const Allocation& a) {
    return "allocation #" + std::to_string(a.serial) + " (" + std::to_string(a.size) + " bytes at " + hex(a.begin) + ")";
}

std::string describe_address(uintptr_t address) {
    if (Allocation* a = find_allocation(address)) {
        return "byte " + std::to_string(address - a->begin) + " of " + describe_allocation(*a);
    }
    auto after = g_allocations.upper_bound(address);
    std::string near;
    if (after != g_allocations.begin()) {
        const Allocation& before = std::prev(after)->second;
        near = std::to_string(address - before.end()) + " bytes past the end of " + describe_allocation(before);
    }
    if (after != g_allocations.end() && after->second.begin - address < (near.empty() ? SIZE_MAX : kGuard * 4)) {
        near = std::to_string(after->second.begin - address) + " bytes before " + describe_allocation(after->second);
    }
    return "outside every live allocation" + (near.empty() ? std::string() : " (" + near + ")");
}

Allocation* whole_range(uintptr_t address, size_t bytes, std::string* why) {
    Allocation* a = find_allocation(address);
    if (!a) {
        *why = "address " + hex(address) + " is " + describe_address(address);
        return nullptr;
    }
    if (bytes > a->end() - address) {
        *why = std::to_string(bytes) + " bytes from byte " + std::to_string(address - a->begin) + " of " +
               describe_allocation(*a) + " run " + std::to_string(bytes - (a->end() - address)) + " bytes past its end";
        return nullptr;
    }
    return a;
}

void mark_initialised(Allocation& a, uintptr_t address, size_t bytes) {
    std::memset(a.initialised.data() + (address - a.begin), 1, bytes);
}

uintptr_t first_uninitialised(const Allocation& a, uintptr_t address, size_t bytes) {
    const uint8_t* shadow = a.initialised.data() + (address - a.begin);
    const void* zero = std::memchr(shadow, 0, bytes);
    return zero ? address + (static_cast<const uint8_t*>(zero) - shadow) : 0;
}

// ---- family libraries --------------------------------------------------------------------------

static std::string kernel_folder() {
    if (const char* dir = std::getenv("MCS_EMU_KERNELS")) return dir;
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&kernel_folder), &info) && info.dli_fname) {
        std::string self = info.dli_fname;
        const size_t slash = self.rfind('/');
        return (slash == std::string::npos ? std::string(".") : self.substr(0, slash)) + "/kernels";
    }
    return "kernels";
}

struct ImageSearch {
    const char* path;
    Family* family;
};

static int find_image(struct dl_phdr_info* info, size_t, void* data) {
    auto* search = static_cast<ImageSearch*>(data);
    if (!info->dlpi_name || std::strcmp(info->dlpi_name, search->path) != 0) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type == PT_LOAD) {
            const uintptr_t begin = info->dlpi_addr + ph.p_vaddr;
            search->family->image.emplace_back(begin, begin + ph.p_memsz);
        } else if (ph.p_type == PT_TLS) {
            search->family->tls_size = ph.p_memsz;
        }
    }
    return 1;
}

// The thread-local symbols of a family library: its __shared__ arrays (each block-scope
// `thread_local` has its own symbol, with its offset in the thread-local block and its size).
static void read_shared_arrays(Family* family) {
    FILE* f = std::fopen(family->path.c_str(), "rb");
    if (!f) return;
    std::fseek(f, 0, SEEK_END);
    std::vector<unsigned char> file(static_cast<size_t>(std::ftell(f)));
    std::fseek(f, 0, SEEK_SET);
    const bool read = std::fread(file.data(), 1, file.size(), f) == file.size();
    std::fclose(f);
    if (!read || file.size() < sizeof(Elf64_Ehdr)) return;
    const auto* header = reinterpret_cast<const Elf64_Ehdr*>(file.data());
    if (header->e_shoff + size_t(header->e_shnum) * sizeof(Elf64_Shdr) > file.size()) return;
    const auto* sections = reinterpret_cast<const Elf64_Shdr*>(file.data() + header->e_shoff);
    for (int i = 0; i < header->e_shnum; ++i) {
        if (sections[i].sh_type != SHT_SYMTAB || sections[i].sh_link >= header->e_shnum) continue;
        const Elf64_Shdr& names = sections[sections[i].sh_link];
        const auto* symbols = reinterpret_cast<const Elf64_Sym*>(file.data() + sections[i].sh_offset);
        const size_t count = sections[i].sh_size / sizeof(Elf64_Sym);
        for (size_t j = 0; j < count; ++j) {
            const Elf64_Sym& sym = symbols[j];
            if (ELF64_ST_TYPE(sym.st_info) != STT_TLS || sym.st_size == 0) continue;
            const char* raw = reinterpret_cast<const char*>(file.data() + names.sh_offset + sym.st_name);
            int status = 0;
            char* demangled = abi::__cxa_demangle(raw, nullptr, nullptr, &status);
            std::string name = status == 0 && demangled ? demangled : raw;
            std::free(demangled);
            family->shared_arrays.push_back({sym.st_value, sym.st_size, name});
        }
    }
    std::sort(family->shared_arrays.begin(), family->shared_arrays.end(),
              [](const Family::SharedArray& a, const Family::SharedArray& b) { return a.offset < b.offset; });
}

static Family* load_family(const std::string& path, std::string* why) {
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        *why = std::string("cannot load ") + path + ": " + dlerror();
        return nullptr;
    }
    auto table = reinterpret_cast<McsEmuKernelTableFn>(dlsym(handle, "mcs_emu_kernel_table"));
    auto shared = reinterpret_cast<McsEmuDynamicSharedFn>(dlsym(handle, "mcs_emu_dynamic_shared"));
    auto anchor = reinterpret_cast<McsEmuTlsAnchorFn>(dlsym(handle, "mcs_emu_tls_anchor"));
    if (!table || !shared || !anchor) {
        *why = path + " is not a family library built by tools/emulated_gpu.sh";
        return nullptr;
    }
    auto* family = new Family;
    family->path = path;
    family->handle = handle;
    family->dynamic_shared = shared;
    family->tls_anchor = anchor;
    int count = 0;
    const McsEmuKernel* kernels = table(&count);
    family->kernels.assign(kernels, kernels + count);
    read_shared_arrays(family);
    struct link_map* map = nullptr;
    if (dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map) {
        ImageSearch search{map->l_name, family};
        dl_iterate_phdr(find_image, &search);
    }
    return family;
}

const std::vector<Family*>& families(std::string* why) {
    static std::vector<Family*> loaded;
    static std::string error;
    static bool tried = false;
    if (!tried) {
        tried = true;
        const std::string dir = kernel_folder();
        const std::string list_path = dir + "/families.txt";
        FILE* list = std::fopen(list_path.c_str(), "r");
        if (!list) {
            error = "no kernel families at " + dir + " (" + list_path + " is missing: run tools/emulated_gpu.sh build)";
        } else {
            char line[512];
            while (std::fgets(line, sizeof line, list)) {
                std::string stem(line);
                while (!stem.empty() && (stem.back() == '\n' || stem.back() == '\r' || stem.back() == ' ')) stem.pop_back();
                if (stem.empty()) continue;
                Family* f = load_family(dir + "/lib" + stem + ".so", &error);
                if (!f) {
                    loaded.clear();
                    break;
                }
                loaded.push_back(f);
            }
            std::fclose(list);
        }
    }
    if (loaded.empty() && why) *why = error;
    return loaded;
}

// ---- fibers ------------------------------------------------------------------------------------

// Switches stacks: saves the callee-saved registers and the floating-point control words on the
// current stack, stores its pointer in *save, and resumes the stack at `to` the same way.
extern "C" void mcs_emu_switch(void** save, void* to);
// First code a new fiber runs: calls mcs_emu_fiber_main(rbx).
extern "C" void mcs_emu_fiber_start();

#if defined(__x86_64__)
asm(R"(
.text
.globl mcs_emu_switch
.hidden mcs_emu_switch
.type mcs_emu_switch,@function
mcs_emu_switch:
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
.size mcs_emu_switch,.-mcs_emu_switch

.globl mcs_emu_fiber_start
.hidden mcs_emu_fiber_start
.type mcs_emu_fiber_start,@function
mcs_emu_fiber_start:
    movq %rbx, %rdi
    call mcs_emu_fiber_main
    ud2
.size mcs_emu_fiber_start,.-mcs_emu_fiber_start
)");
#else
#error "the emulated GPU's fibers are written for x86-64"
#endif

constexpr size_t kStackBytes = 128 * 1024;

enum class State { NotStarted, Runnable, AtBarrier, AtShuffle, Exited };

struct GpuThread {
    McsEmuThreadView view{};
    unsigned linear = 0, warp = 0, lane = 0;
    State state = State::NotStarted;
    void* sp = nullptr;
    char* stack = nullptr;
    const char* wait_file = nullptr;
    int wait_line = 0;
    uint32_t shuffle_result = 0;
};

struct WarpShuffle {
    unsigned mask = 0, arrived = 0;
    unsigned exited = 0;  // lanes whose thread has finished
    const char* file = nullptr;
    int line = 0;
    uint32_t value[32] = {};
    int lane_mask[32] = {};
    int width[32] = {};
};

// Per-byte record of a block's shared memory: who wrote and read it in which barrier interval,
// and in which block it was last written (a read of bytes this block never wrote is
// uninitialised shared memory).
struct SharedShadow {
    uint64_t write_interval = 0, read_interval = 0, written_in_block = 0;
    uint32_t writer = 0, reader = 0;
};
constexpr uint32_t kSeveralReaders = 0xffffffffu;

struct Run {
    const Launch* launch = nullptr;
    const char* name = nullptr;
    std::vector<GpuThread> threads;
    std::vector<WarpShuffle> warps;
    std::vector<char*> free_stacks;
    uint64_t interval = 0, block_serial = 0;
    uintptr_t tls_begin = 0, tls_end = 0;
    uintptr_t dynamic_begin = 0, dynamic_end = 0, dynamic_capacity_end = 0;
    SharedShadow* shared = nullptr;  // the family's shadow, one record per byte of its shared memory
    Allocation* last_allocation = nullptr;
    bool aborted = false;
};

static Run* g_run = nullptr;
static GpuThread* g_thread = nullptr;
static void* g_scheduler_sp = nullptr;
static uint64_t g_interval_counter = 0;
static uint64_t g_block_counter = 0;
static uint64_t g_launch_counter = 0;

static std::string dim(const McsEmuDim3& d) {
    return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

static std::string where(const GpuThread& t) {
    return "kernel `" + std::string(g_run->name) + "`, block " + dim(t.view.block_idx) + ", thread " +
           dim(t.view.thread_idx);
}

// Ends the running kernel: records the fault and returns to the scheduler for good.
[[noreturn]] static void abort_kernel(int code, const std::string& message) {
    fault(code, message);
    g_run->aborted = true;
    GpuThread* t = g_thread;
    mcs_emu_switch(&t->sp, g_scheduler_sp);
    std::abort();  // never resumed
}

static void yield_to_scheduler() {
    GpuThread* t = g_thread;
    mcs_emu_switch(&t->sp, g_scheduler_sp);
}

extern "C" __attribute__((visibility("hidden"), used)) void mcs_emu_fiber_main(GpuThread* t) {
    g_run->launch->function->kernel.invoke(g_run->launch->params);
    t->state = State::Exited;
    g_run->warps[t->warp].exited |= 1u << t->lane;
    mcs_emu_switch(&t->sp, g_scheduler_sp);
    std::abort();  // an exited fiber is never resumed
}

static void resume(GpuThread& t) {
    if (t.state == State::NotStarted) {
        if (g_run->free_stacks.empty()) {
            g_run->free_stacks.push_back(static_cast<char*>(std::aligned_alloc(64, kStackBytes)));
        }
        t.stack = g_run->free_stacks.back();
        g_run->free_stacks.pop_back();
        // The frame mcs_emu_switch pops: control words, r15..r12, rbx (= the thread), rbp, and the
        // return address mcs_emu_fiber_start, placed so that it starts with an aligned stack.
        auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(t.stack + kStackBytes) & ~uintptr_t(15));
        uint64_t* frame = top - 8;
        frame[0] = 0x1f80 | (uint64_t(0x037f) << 32);  // MXCSR default, x87 control word default
        frame[1] = frame[2] = frame[3] = frame[4] = 0;    // r15 r14 r13 r12
        frame[5] = reinterpret_cast<uint64_t>(&t);        // rbx
        frame[6] = 0;                                     // rbp
        frame[7] = reinterpret_cast<uint64_t>(&mcs_emu_fiber_start);
        t.sp = frame;
        t.state = State::Runnable;
    }
    g_thread = &t;
    mcs_emu_current = &t.view;
    mcs_emu_switch(&g_scheduler_sp, t.sp);
    g_thread = nullptr;
    mcs_emu_current = nullptr;
    if (t.state == State::Exited && t.stack) {
        g_run->free_stacks.push_back(t.stack);
        t.stack = nullptr;
    }
}

// ---- barriers and shuffles (called from kernel code, on a fiber) --------------------------------

extern "C" __attribute__((visibility("default"))) void mcs_emu_syncthreads(const char* file, int line) {
    GpuThread* t = g_thread;
    t->state = State::AtBarrier;
    t->wait_file = file;
    t->wait_line = line;
    yield_to_scheduler();
}

static std::string site(const char* file, int line) {
    std::string f = file ? file : "?";
    const size_t slash = f.rfind('/');
    if (slash != std::string::npos) f = f.substr(slash + 1);
    return f + ":" + std::to_string(line);
}

extern "C" __attribute__((visibility("default"))) uint32_t mcs_emu_shfl_xor(unsigned mask, uint32_t value,
                                                                              int lane_mask, int width,
                                                                              const char* file, int line) {
    GpuThread* t = g_thread;
    Run& run = *g_run;
    const unsigned threads = static_cast<unsigned>(run.threads.size());
    const unsigned lanes_here = std::min(32u, threads - t->warp * 32);
    // Messages are built only on a fault: this is the hot path of every warp reduction.
    auto at = [&] { return "__shfl_xor_sync at " + site(file, line) + " in " + where(*t); };
    auto hex_mask = [](unsigned m) {
        char buf[16];
        std::snprintf(buf, sizeof buf, "0x%08x", m);
        return std::string(buf);
    };
    if (!(mask >> t->lane & 1u)) {
        abort_kernel(kLaunchFailed, at() + ": the calling lane " + std::to_string(t->lane) + " is not in its mask");
    }
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
        abort_kernel(kLaunchFailed, at() + ": width " + std::to_string(width) + " is not a power of two up to 32");
    }
    const unsigned present = lanes_here == 32 ? 0xffffffffu : (1u << lanes_here) - 1;
    if (mask & ~present) {
        const unsigned l = static_cast<unsigned>(__builtin_ctz(mask & ~present));
        abort_kernel(kLaunchFailed, at() + ": mask " + hex_mask(mask) + " names lane " + std::to_string(l) + ", but warp " +
                                        std::to_string(t->warp) + " has only " + std::to_string(lanes_here) +
                                        " lanes (the block's " + std::to_string(threads) +
                                        " threads are not a whole number of warps)");
    }
    WarpShuffle& ws = run.warps[t->warp];
    if (mask & ws.exited) {
        const unsigned l = static_cast<unsigned>(__builtin_ctz(mask & ws.exited));
        abort_kernel(kLaunchFailed, at() + ": mask " + hex_mask(mask) + " names lane " + std::to_string(l) +
                                        ", which has exited");
    }
    if (ws.arrived == 0) {
        ws.mask = mask;
        ws.file = file;
        ws.line = line;
    } else if (ws.mask != mask) {
        abort_kernel(kLaunchFailed, at() + ": mask " + hex_mask(mask) + " differs from mask " + hex_mask(ws.mask) +
                                        " of the lanes waiting at " + site(ws.file, ws.line));
    }
    ws.value[t->lane] = value;
    ws.lane_mask[t->lane] = lane_mask;
    ws.width[t->lane] = width;
    ws.arrived |= 1u << t->lane;
    if (ws.arrived != mask) {
        t->state = State::AtShuffle;
        t->wait_file = file;
        t->wait_line = line;
        yield_to_scheduler();
        return t->shuffle_result;
    }
    // Every named lane is here: deliver each lane its partner's value.
    for (unsigned l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        const unsigned source = l ^ static_cast<unsigned>(ws.lane_mask[l]);
        const unsigned segment_end = (l / ws.width[l] + 1) * ws.width[l];
        uint32_t result = ws.value[l];
        if (source < 32 && source < segment_end) {
            if (!(mask >> source & 1u)) {
                abort_kernel(kLaunchFailed, at() + ": lane " + std::to_string(l) + " reads lane " +
                                                std::to_string(source) + ", which is not in the mask");
            }
            result = ws.value[source];
        }
        GpuThread& lane_thread = run.threads[t->warp * 32 + l];
        lane_thread.shuffle_result = result;
        if (&lane_thread != t) lane_thread.state = State::Runnable;
    }
    ws.arrived = 0;
    return t->shuffle_result;
}

// ---- memory access checks (called by the instrumented kernel code) ------------------------------

static void check_shared(GpuThread& t, uintptr_t address, size_t bytes, bool write) {
    Run& run = *g_run;
    const size_t offset = address - run.tls_begin;
    for (size_t i = 0; i < bytes; ++i) {
        SharedShadow& s = run.shared[offset + i];
        const uint32_t me = t.linear + 1;  // 0 means nobody
        auto other = [&](uint32_t who) {
            const unsigned id = who - 1;
            return "thread " + dim(run.threads[id].view.thread_idx);
        };
        auto race = [&](const std::string& what) {
            char buf[64];
            std::snprintf(buf, sizeof buf, "shared-memory offset %zu (%s)", offset + i, hex(address + i).c_str());
            abort_kernel(kLaunchFailed, "shared-memory race in " + where(t) + ": " + what + " at " + buf +
                                            " with no __syncthreads() between the two accesses");
        };
        if (write) {
            if (s.write_interval == run.interval && s.writer != me) {
                race("writes what " + other(s.writer) + " wrote");
            }
            if (s.read_interval == run.interval && s.reader != me) {
                race(s.reader == kSeveralReaders ? std::string("writes what several threads read")
                                                 : "writes what " + other(s.reader) + " read");
            }
            s.write_interval = run.interval;
            s.writer = me;
            s.written_in_block = run.block_serial;
        } else {
            if (s.written_in_block != run.block_serial) {
                char buf[64];
                std::snprintf(buf, sizeof buf, "%zu", offset + i);
                abort_kernel(kLaunchFailed, "uninitialised shared memory read in " + where(t) + ": offset " + buf +
                                                " was not written by this block");
            }
            if (s.write_interval == run.interval && s.writer != me) {
                race("reads what " + other(s.writer) + " wrote");
            }
            if (s.read_interval != run.interval) {
                s.read_interval = run.interval;
                s.reader = me;
            } else if (s.reader != me) {
                s.reader = kSeveralReaders;
            }
        }
    }
}

static void check_access(uintptr_t address, size_t bytes, bool write) {
    GpuThread* t = g_thread;
    if (!t) return;  // not inside a kernel
    const uintptr_t stack = reinterpret_cast<uintptr_t>(t->stack);
    if (address - stack < kStackBytes) return;  // the thread's own locals
    Run& run = *g_run;
    auto what = [&] { return std::string(write ? "write" : "read") + " of " + std::to_string(bytes) + " bytes"; };
    const uintptr_t view = reinterpret_cast<uintptr_t>(&t->view);
    if (address - view < sizeof(McsEmuThreadView) && !write) return;  // threadIdx and friends
    if (address - reinterpret_cast<uintptr_t>(&mcs_emu_current) < sizeof mcs_emu_current && !write) return;
    if (address >= run.dynamic_begin && address < run.dynamic_capacity_end) {
        if (address + bytes > run.dynamic_end) {
            abort_kernel(kIllegalAddress, "out-of-bounds dynamic shared memory " + what() + " in " + where(*t) +
                                              " at offset " + std::to_string(address - run.dynamic_begin) +
                                              ": the launch gave " + std::to_string(run.dynamic_end - run.dynamic_begin) +
                                              " bytes");
        }
        check_shared(*t, address, bytes, write);
        return;
    }
    if (address >= run.tls_begin && address < run.tls_end) {
        // Inside one __shared__ array, as the GPU's shared window is laid out by the compiler:
        // an access that leaves its array is out of bounds even where another array follows.
        const size_t offset = address - run.tls_begin;
        const auto& arrays = run.launch->function->family->shared_arrays;
        auto it = std::upper_bound(arrays.begin(), arrays.end(), offset,
                                   [](size_t o, const Family::SharedArray& a) { return o < a.offset; });
        const Family::SharedArray* array = it == arrays.begin() ? nullptr : &*std::prev(it);
        if (!array || offset + bytes > array->offset + array->size) {
            std::string detail = array ? "byte " + std::to_string(offset - array->offset) + " of `" + array->name +
                                             "` (" + std::to_string(array->size) + " bytes) runs past its end"
                                       : "before every __shared__ array";
            abort_kernel(kIllegalAddress, "out-of-bounds shared memory " + what() + " in " + where(*t) + ": " + detail);
        }
        check_shared(*t, address, bytes, write);
        return;
    }
    Allocation* a = run.last_allocation;
    if (!a || address < a->begin || address >= a->end()) a = find_allocation(address);
    if (a) {
        run.last_allocation = a;
        if (bytes > a->end() - address) {
            abort_kernel(kIllegalAddress, "out-of-bounds global memory " + what() + " in " + where(*t) + " at " +
                                              hex(address) + ": byte " + std::to_string(address - a->begin) + " of " +
                                              describe_allocation(*a) + " runs past its end");
        }
        if (write) {
            mark_initialised(*a, address, bytes);
        } else if (uintptr_t first = first_uninitialised(*a, address, bytes)) {
            abort_kernel(kIllegalAddress, "uninitialised global memory read in " + where(*t) + ": byte " +
                                              std::to_string(first - a->begin) + " of " + describe_allocation(*a) +
                                              " was never written (by a copy, a memset or a kernel)");
        }
        return;
    }
    if (!write) {
        for (const auto& range : run.launch->function->family->image) {
            if (address >= range.first && address + bytes <= range.second) return;  // the family's constants
        }
    }
    // Just past the last __shared__ array (or before the first) lies no device memory either, but
    // the fault is the shared array's, so say so.
    constexpr uintptr_t kSharedSlack = 4096;
    if (run.tls_end > run.tls_begin && address + kSharedSlack >= run.tls_begin && address < run.tls_end + kSharedSlack) {
        const auto& arrays = run.launch->function->family->shared_arrays;
        std::string detail = "outside the block's shared memory";
        if (!arrays.empty() && address >= run.tls_end) {
            const Family::SharedArray& last = arrays.back();
            detail = "byte " + std::to_string(address - run.tls_begin - last.offset) + " of `" + last.name + "` (" +
                     std::to_string(last.size) + " bytes) runs past its end";
        }
        abort_kernel(kIllegalAddress, "out-of-bounds shared memory " + what() + " in " + where(*t) + ": " + detail);
    }
    abort_kernel(kIllegalAddress, "out-of-bounds global memory " + what() + " in " + where(*t) + " at " + hex(address) +
                                      ": " + describe_address(address));
}

}  // namespace emu

#define MCS_EMU_ACCESS_HOOKS(n)                                                                      \
    extern "C" __attribute__((visibility("default"))) void __asan_load##n##_noabort(uintptr_t a) {  \
        emu::check_access(a, n, false);                                                               \
    }                                                                                                 \
    extern "C" __attribute__((visibility("default"))) void __asan_store##n##_noabort(uintptr_t a) { \
        emu::check_access(a, n, true);                                                                \
    }
MCS_EMU_ACCESS_HOOKS(1)
MCS_EMU_ACCESS_HOOKS(2)
MCS_EMU_ACCESS_HOOKS(4)
MCS_EMU_ACCESS_HOOKS(8)
MCS_EMU_ACCESS_HOOKS(16)
extern "C" __attribute__((visibility("default"))) void __asan_loadN_noabort(uintptr_t a, size_t n) {
    emu::check_access(a, n, false);
}
extern "C" __attribute__((visibility("default"))) void __asan_storeN_noabort(uintptr_t a, size_t n) {
    emu::check_access(a, n, true);
}
extern "C" __attribute__((visibility("default"))) void __asan_handle_no_return() {}

namespace emu {

// ---- the block scheduler -------------------------------------------------------------------------

static uint64_t splitmix64(uint64_t& state) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t order_seed() {
    static const uint64_t seed = [] {
        const char* s = std::getenv("MCS_EMU_SEED");
        return s ? std::strtoull(s, nullptr, 0) : 0x6d63732d656d75ull;
    }();
    return seed;
}

// When no thread can run: release a barrier every live thread has reached, or report why the
// block cannot go on. Returns false after a fault.
static bool settle(Run& run) {
    GpuThread* at_shuffle = nullptr;
    GpuThread* at_barrier = nullptr;
    GpuThread* exited = nullptr;
    size_t waiting = 0, gone = 0;
    for (GpuThread& t : run.threads) {
        if (t.state == State::AtShuffle && !at_shuffle) at_shuffle = &t;
        if (t.state == State::AtBarrier) {
            if (!at_barrier) at_barrier = &t;
            ++waiting;
        }
        if (t.state == State::Exited) {
            if (!exited) exited = &t;
            ++gone;
        }
    }
    if (at_shuffle) {
        const WarpShuffle& ws = run.warps[at_shuffle->warp];
        std::string missing;
        for (unsigned l = 0; l < 32; ++l) {
            if ((ws.mask >> l & 1u) && !(ws.arrived >> l & 1u)) {
                const GpuThread& other = run.threads[at_shuffle->warp * 32 + l];
                missing += " lane " + std::to_string(l) +
                           (other.state == State::Exited ? std::string(" (exited)")
                                                         : " (waiting at __syncthreads() at " +
                                                               site(other.wait_file, other.wait_line) + ")");
                break;
            }
        }
        g_thread = at_shuffle;
        fault(kLaunchFailed, "__shfl_xor_sync at " + site(at_shuffle->wait_file, at_shuffle->wait_line) + " in " +
                                 where(*at_shuffle) + " waits for lanes that never arrive:" + missing);
        g_thread = nullptr;
        return false;
    }
    if (!at_barrier) return true;
    if (gone > 0) {
        fault(kLaunchFailed, "__syncthreads() at " + site(at_barrier->wait_file, at_barrier->wait_line) + " in " +
                                 where(*at_barrier) + " is reached by " + std::to_string(waiting) + " threads, but " +
                                 std::to_string(gone) + " threads of the block exited without reaching it (first: thread " +
                                 dim(exited->view.thread_idx) + ")");
        return false;
    }
    for (GpuThread& t : run.threads) {
        if (t.wait_file != at_barrier->wait_file || t.wait_line != at_barrier->wait_line) {
            fault(kLaunchFailed, "divergent __syncthreads() in kernel `" + std::string(run.name) + "`, block " +
                                     dim(t.view.block_idx) + ": thread " + dim(at_barrier->view.thread_idx) +
                                     " waits at " + site(at_barrier->wait_file, at_barrier->wait_line) + ", thread " +
                                     dim(t.view.thread_idx) + " at " + site(t.wait_file, t.wait_line));
            return false;
        }
    }
    run.interval = ++g_interval_counter;
    for (GpuThread& t : run.threads) t.state = State::Runnable;
    return true;
}

static bool run_block(Run& run, const McsEmuDim3& block_idx) {
    run.block_serial = ++g_block_counter;
    run.interval = ++g_interval_counter;
    for (GpuThread& t : run.threads) {
        t.view.block_idx = block_idx;
        t.state = State::NotStarted;
        t.wait_file = nullptr;
        t.wait_line = 0;
    }
    for (WarpShuffle& w : run.warps) w.arrived = w.exited = 0;
    for (;;) {
        bool ran = false;
        for (GpuThread& t : run.threads) {
            if (t.state != State::NotStarted && t.state != State::Runnable) continue;
            ran = true;
            resume(t);
            if (run.aborted) return false;
        }
        if (ran) continue;
        bool all_exited = true;
        for (const GpuThread& t : run.threads) all_exited &= t.state == State::Exited;
        if (all_exited) return true;
        if (!settle(run)) return false;
    }
}

int run(const Launch& launch) {
    const Function& f = *launch.function;
    Run run;
    run.launch = &launch;
    run.name = f.kernel.name;
    const unsigned threads = launch.block.x * launch.block.y * launch.block.z;
    run.threads.resize(threads);
    run.warps.resize((threads + 31) / 32);
    for (unsigned i = 0; i < threads; ++i) {
        GpuThread& t = run.threads[i];
        t.linear = i;
        t.warp = i / 32;
        t.lane = i % 32;
        t.view.thread_idx = {i % launch.block.x, (i / launch.block.x) % launch.block.y,
                             i / (launch.block.x * launch.block.y)};
        t.view.block_dim = launch.block;
        t.view.grid_dim = launch.grid;
    }
    // This host thread's copy of the family's __shared__ arrays (its thread-local storage).
    Family& family = *f.family;
    family.tls_anchor();
    void* tls = nullptr;
    if (family.tls_size > 0 && dlinfo(family.handle, RTLD_DI_TLS_DATA, &tls) == 0 && tls) {
        run.tls_begin = reinterpret_cast<uintptr_t>(tls);
        run.tls_end = run.tls_begin + family.tls_size;
        // One shadow per family for the process, never cleared: its stamps are the interval and
        // block counters, which only grow, so what an earlier launch left can never match now.
        static std::map<const Family*, std::vector<SharedShadow>> shadows;
        std::vector<SharedShadow>& shadow = shadows[&family];
        if (shadow.size() < family.tls_size) shadow.resize(family.tls_size);
        run.shared = shadow.data();
    }
    size_t capacity = 0;
    if (void* dynamic = family.dynamic_shared(&capacity)) {
        run.dynamic_begin = reinterpret_cast<uintptr_t>(dynamic);
        run.dynamic_end = run.dynamic_begin + launch.dynamic_shared;
        run.dynamic_capacity_end = run.dynamic_begin + capacity;
    }

    const uint64_t blocks = uint64_t(launch.grid.x) * launch.grid.y * launch.grid.z;
    std::vector<uint64_t> order(blocks);
    for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
    uint64_t state = order_seed() ^ (++g_launch_counter * 0x2545f4914f6cdd1dull);
    for (uint64_t i = blocks; i > 1; --i) std::swap(order[i - 1], order[splitmix64(state) % i]);

    g_run = &run;
    bool ok = true;
    for (uint64_t b : order) {
        const McsEmuDim3 block_idx{unsigned(b % launch.grid.x), unsigned((b / launch.grid.x) % launch.grid.y),
                                   unsigned(b / (uint64_t(launch.grid.x) * launch.grid.y))};
        if (!run_block(run, block_idx)) {
            ok = false;
            break;
        }
    }
    g_run = nullptr;
    for (GpuThread& t : run.threads) {
        if (t.stack) run.free_stacks.push_back(t.stack);  // fibers left behind by a fault
    }
    for (char* s : run.free_stacks) std::free(s);
    return ok ? kSuccess : sticky_fault();
}

}  // namespace emu
