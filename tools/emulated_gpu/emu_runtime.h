// What the emulated driver (driver.cc), the emulated cuBLAS (cublas.cc) and the kernel runner
// (runtime.cc) share: the one lock, the sticky error, device memory with its initialisation
// shadow, and the launch of a host-compiled kernel. docs/emulated_gpu.md describes the whole.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "emu_abi.h"

namespace emu {

// CUresult values the emulator returns (the numbers are the driver API's).
enum Status : int {
    kSuccess = 0,
    kInvalidValue = 1,
    kOutOfMemory = 2,
    kNotInitialized = 3,
    kInvalidDevice = 101,
    kInvalidImage = 200,
    kInvalidContext = 201,
    kInvalidPtx = 218,
    kInvalidHandle = 400,
    kNotFound = 500,
    kNotReady = 600,
    kIllegalAddress = 700,
    kLaunchOutOfResources = 701,
    kLaunchFailed = 719,
    kNotSupported = 801,
};

// Every entry point of the emulated libraries holds this lock for its whole call: one call (and
// so one kernel) runs at a time, as if every stream of the process were one in-order queue.
std::unique_lock<std::mutex> lock();

// The first fault of the process (a kernel that broke a rule, a copy out of bounds): like a real
// device fault it is sticky, and every later call that synchronises returns it. 0 when none.
int sticky_fault();
// Records a fault: prints "emulated GPU: <message>" to stderr (and appends it to the file named
// by $MCS_EMU_REPORT, if set) and makes `code` sticky. Returns `code`.
int fault(int code, const std::string& message);
// Reports a refused call that is not a device fault (a bad argument): printed the same way,
// returned, not sticky.
int refuse(int code, const std::string& message);
// The message of the sticky fault, for cuGetErrorString.
const char* sticky_message();

// One live device allocation. `initialised` has one byte per byte of the allocation: nonzero once
// something (a copy, a memset, a kernel, cuBLAS) has written it.
struct Allocation {
    uintptr_t begin = 0;
    size_t size = 0;
    uint64_t serial = 0;
    std::vector<uint8_t> initialised;
    uintptr_t end() const { return begin + size; }
};

// New device memory, filled with a poison pattern (all bits set: NaN as f32), nothing initialised.
uintptr_t allocate(size_t bytes);
// Frees an allocation by its start address; false when `address` starts no live allocation.
bool release(uintptr_t address);
// The live allocation containing `address`, or null.
Allocation* find_allocation(uintptr_t address);
// "allocation #7 (4096 bytes at 0x...)"; where an address is not inside one, how far it lies from
// the nearest.
std::string describe_allocation(const Allocation& a);
std::string describe_address(uintptr_t address);
// The allocation holding all of [address, address + bytes), or null with `why` set.
Allocation* whole_range(uintptr_t address, size_t bytes, std::string* why);
void mark_initialised(Allocation& a, uintptr_t address, size_t bytes);
// The first byte of [address, address + bytes) nothing has written, or 0 when all have been.
uintptr_t first_uninitialised(const Allocation& a, uintptr_t address, size_t bytes);
size_t bytes_in_use();

// A kernel as the driver found it: its family library's entry, the launch bounds its PTX
// declares (`.maxntid`, 0 when none) and the dynamic shared memory it has been granted.
struct Family;
struct Function {
    Family* family = nullptr;
    McsEmuKernel kernel{};
    unsigned max_threads = 0;
    size_t max_dynamic_shared = 48 * 1024;
};

// One host-compiled kernel library (kernels/<stem>.cu).
struct Family {
    std::string path;
    void* handle = nullptr;
    std::vector<McsEmuKernel> kernels;
    McsEmuDynamicSharedFn dynamic_shared = nullptr;
    McsEmuTlsAnchorFn tls_anchor = nullptr;
    size_t tls_size = 0;
    // The family's static __shared__ arrays: offset in its thread-local block, size, and name
    // ("softmax_forward::scratch"), sorted by offset; from the library's symbol table.
    struct SharedArray {
        size_t offset, size;
        std::string name;
    };
    std::vector<SharedArray> shared_arrays;
    // The library's own mapped image (its constants may be read by kernels).
    std::vector<std::pair<uintptr_t, uintptr_t>> image;
};

// Loads every family library of the kernel folder ($MCS_EMU_KERNELS, else kernels/ beside this
// library) once; returns them, or an empty list with `why` set.
const std::vector<Family*>& families(std::string* why);

struct Launch {
    const Function* function = nullptr;
    McsEmuDim3 grid{}, block{};
    size_t dynamic_shared = 0;
    void** params = nullptr;
};
// Runs every block of the launch to completion (blocks in a seeded shuffled order, the threads of
// a block as fibers). Returns kSuccess or the fault it recorded.
int run(const Launch& launch);

// The launch limits of sm_90 the driver enforces.
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockZ = 64;
constexpr unsigned kMaxGridX = 0x7fffffffu;
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kMaxSharedPerBlock = 227 * 1024;

}  // namespace emu
