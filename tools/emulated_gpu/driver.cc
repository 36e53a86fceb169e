// The emulated CUDA driver (built as libcuda.so): the driver API calls the engine makes through
// cudarc, answered by one emulated sm_90 device whose memory is host memory and whose kernels are
// the host-compiled kernels/*.cu (runtime.cc). Every call runs to completion before it returns,
// so streams are in-order queues that are always drained and events stamp the host clock.

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <string>

#include "emu_runtime.h"

using emu::lock;

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

namespace {

struct Context {
    int device = 0;
};
struct Stream {
    unsigned flags = 0;
};
struct Event {
    std::chrono::steady_clock::time_point stamp{};
    bool recorded = false;
    bool timing = true;
};
struct Module {
    emu::Family* family = nullptr;
    std::map<std::string, unsigned> max_threads;  // entry -> .maxntid product (0: none)
    std::map<std::string, emu::Function*> functions;
};
struct Pool {};

Context g_context;
Pool g_pool;
std::set<const void*> g_streams, g_events, g_modules, g_functions;

constexpr const char* kDeviceName = "mcs-engine emulated GPU (sm_90, tools/emulated_gpu)";
constexpr size_t kTotalMemory = size_t(16) << 30;

// Calls that wait for the device return a fault the device hit earlier (it is sticky).
CUresult sticky() { return emu::sticky_fault(); }

// The entry names of a PTX module, each with the product of its `.maxntid` (0 when none).
std::map<std::string, unsigned> ptx_entries(const char* ptx) {
    std::map<std::string, unsigned> entries;
    const std::string text(ptx);
    size_t pos = 0;
    while ((pos = text.find(".entry ", pos)) != std::string::npos) {
        pos += 7;
        const size_t open = text.find('(', pos);
        if (open == std::string::npos) break;
        std::string name = text.substr(pos, open - pos);
        while (!name.empty() && name.back() == ' ') name.pop_back();
        const size_t body = text.find('{', open);
        unsigned max_threads = 0;
        const size_t ntid = text.find(".maxntid", open);
        if (ntid != std::string::npos && ntid < body) {
            unsigned x = 1, y = 1, z = 1;
            const int got = std::sscanf(text.c_str() + ntid + 8, " %u , %u , %u", &x, &y, &z);
            if (got >= 1) max_threads = x * (got >= 2 ? y : 1) * (got >= 3 ? z : 1);
        }
        entries[name] = max_threads;
        pos = open;
    }
    return entries;
}

const char* error_name(CUresult code) {
    switch (code) {
        case 0: return "CUDA_SUCCESS";
        case 1: return "CUDA_ERROR_INVALID_VALUE";
        case 2: return "CUDA_ERROR_OUT_OF_MEMORY";
        case 3: return "CUDA_ERROR_NOT_INITIALIZED";
        case 101: return "CUDA_ERROR_INVALID_DEVICE";
        case 200: return "CUDA_ERROR_INVALID_IMAGE";
        case 201: return "CUDA_ERROR_INVALID_CONTEXT";
        case 218: return "CUDA_ERROR_INVALID_PTX";
        case 400: return "CUDA_ERROR_INVALID_HANDLE";
        case 500: return "CUDA_ERROR_NOT_FOUND";
        case 600: return "CUDA_ERROR_NOT_READY";
        case 700: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case 701: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case 719: return "CUDA_ERROR_LAUNCH_FAILED";
        case 801: return "CUDA_ERROR_NOT_SUPPORTED";
        default: return nullptr;
    }
}

CUresult copy_to_device(CUdeviceptr dst, const void* src, size_t bytes, const char* call) {
    if (CUresult s = sticky()) return s;
    if (bytes == 0) return emu::kSuccess;
    std::string why;
    emu::Allocation* a = emu::whole_range(dst, bytes, &why);
    if (!a) return emu::fault(emu::kIllegalAddress, std::string(call) + " to device memory: " + why);
    std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
    emu::mark_initialised(*a, dst, bytes);
    return emu::kSuccess;
}

CUresult copy_from_device(void* dst, CUdeviceptr src, size_t bytes, const char* call) {
    if (CUresult s = sticky()) return s;
    if (bytes == 0) return emu::kSuccess;
    std::string why;
    if (!emu::whole_range(src, bytes, &why)) {
        return emu::fault(emu::kIllegalAddress, std::string(call) + " from device memory: " + why);
    }
    std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    return emu::kSuccess;
}

CUresult copy_within_device(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    if (CUresult s = sticky()) return s;
    if (bytes == 0) return emu::kSuccess;
    std::string why;
    emu::Allocation* from = emu::whole_range(src, bytes, &why);
    if (!from) return emu::fault(emu::kIllegalAddress, "device-to-device copy source: " + why);
    emu::Allocation* to = emu::whole_range(dst, bytes, &why);
    if (!to) return emu::fault(emu::kIllegalAddress, "device-to-device copy destination: " + why);
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
    std::memmove(to->initialised.data() + (dst - to->begin), from->initialised.data() + (src - from->begin), bytes);
    return emu::kSuccess;
}

CUresult fill(CUdeviceptr dst, const void* pattern, size_t pattern_bytes, size_t count, const char* call) {
    if (CUresult s = sticky()) return s;
    const size_t bytes = pattern_bytes * count;
    if (bytes == 0) return emu::kSuccess;
    std::string why;
    emu::Allocation* a = emu::whole_range(dst, bytes, &why);
    if (!a) return emu::fault(emu::kIllegalAddress, std::string(call) + ": " + why);
    if (pattern_bytes > 1 && dst % pattern_bytes != 0) {
        return emu::refuse(emu::kInvalidValue, std::string(call) + ": destination is not " +
                                                   std::to_string(pattern_bytes) + "-byte aligned");
    }
    auto* out = reinterpret_cast<unsigned char*>(dst);
    for (size_t i = 0; i < count; ++i) std::memcpy(out + i * pattern_bytes, pattern, pattern_bytes);
    emu::mark_initialised(*a, dst, bytes);
    return emu::kSuccess;
}

CUresult device_alloc(CUdeviceptr* dptr, size_t bytes) {
    if (!dptr) return emu::kInvalidValue;
    if (CUresult s = sticky()) return s;
    if (emu::bytes_in_use() + bytes > kTotalMemory) return emu::kOutOfMemory;
    *dptr = emu::allocate(bytes);
    return *dptr ? emu::kSuccess : emu::kOutOfMemory;
}

CUresult device_free(CUdeviceptr dptr) {
    if (dptr == 0) return emu::kSuccess;
    if (!emu::release(dptr)) {
        return emu::refuse(emu::kInvalidValue, "freeing " + emu::describe_address(dptr) +
                                                   ": not the start of a live allocation (double free?)");
    }
    return sticky();
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

// ---- initialisation, devices, contexts --------------------------------------------------------

API CUresult cuInit(unsigned) { return emu::kSuccess; }
// NVRTC asks the driver for its private tables when one is loaded; the emulated driver has none,
// and NVRTC then compiles without them.
API CUresult cuGetExportTable(const void** table, const void*) {
    if (table) *table = nullptr;
    return emu::kNotSupported;
}
API CUresult cuDriverGetVersion(int* version) {
    if (!version) return emu::kInvalidValue;
    *version = 13000;
    return emu::kSuccess;
}
API CUresult cuDeviceGetCount(int* count) {
    if (!count) return emu::kInvalidValue;
    *count = 1;
    return emu::kSuccess;
}
API CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (!device) return emu::kInvalidValue;
    if (ordinal != 0) return emu::kInvalidDevice;
    *device = 0;
    return emu::kSuccess;
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice device) {
    if (!name || len <= 0) return emu::kInvalidValue;
    if (device != 0) return emu::kInvalidDevice;
    std::snprintf(name, static_cast<size_t>(len), "%s", kDeviceName);
    return emu::kSuccess;
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice device) {
    if (!bytes) return emu::kInvalidValue;
    if (device != 0) return emu::kInvalidDevice;
    *bytes = kTotalMemory;
    return emu::kSuccess;
}
API CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice device) {
    if (!value) return emu::kInvalidValue;
    if (device != 0) return emu::kInvalidDevice;
    switch (attribute) {
        case 1: *value = emu::kMaxThreadsPerBlock; break;                    // MAX_THREADS_PER_BLOCK
        case 2: case 3: *value = 1024; break;                                 // MAX_BLOCK_DIM_X, Y
        case 4: *value = emu::kMaxBlockZ; break;                              // MAX_BLOCK_DIM_Z
        case 5: *value = static_cast<int>(emu::kMaxGridX); break;             // MAX_GRID_DIM_X
        case 6: case 7: *value = emu::kMaxGridYZ; break;                      // MAX_GRID_DIM_Y, Z
        case 8: *value = static_cast<int>(emu::kDefaultDynamicShared); break; // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *value = 32; break;                                          // WARP_SIZE
        case 16: *value = 132; break;                                         // MULTIPROCESSOR_COUNT (H100 SXM)
        case 75: *value = 9; break;                                           // COMPUTE_CAPABILITY_MAJOR
        case 76: *value = 0; break;                                           // COMPUTE_CAPABILITY_MINOR
        case 97: *value = static_cast<int>(emu::kMaxSharedPerBlock); break;   // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *value = 1; break;                                          // MEMORY_POOLS_SUPPORTED
        default: *value = 0; break;
    }
    return emu::kSuccess;
}
API CUresult cuDevicePrimaryCtxRetain(void** context, CUdevice device) {
    if (!context) return emu::kInvalidValue;
    if (device != 0) return emu::kInvalidDevice;
    *context = &g_context;
    return emu::kSuccess;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) { return device == 0 ? emu::kSuccess : emu::kInvalidDevice; }
API CUresult cuCtxSetCurrent(void* context) {
    return context == nullptr || context == &g_context ? emu::kSuccess : emu::kInvalidContext;
}
API CUresult cuCtxGetCurrent(void** context) {
    if (!context) return emu::kInvalidValue;
    *context = &g_context;
    return emu::kSuccess;
}
API CUresult cuCtxGetDevice(CUdevice* device) {
    if (!device) return emu::kInvalidValue;
    *device = 0;
    return emu::kSuccess;
}
API CUresult cuCtxSynchronize() {
    auto held = lock();
    return sticky();
}

API CUresult cuGetErrorName(CUresult code, const char** name) {
    if (!name) return emu::kInvalidValue;
    *name = error_name(code);
    return *name ? emu::kSuccess : emu::kInvalidValue;
}
API CUresult cuGetErrorString(CUresult code, const char** text) {
    if (!text) return emu::kInvalidValue;
    auto held = lock();
    // The sticky fault's own report, so that an engine error names the kernel, block and thread.
    if (code != 0 && code == emu::sticky_fault() && emu::sticky_message()) {
        *text = emu::sticky_message();
        return emu::kSuccess;
    }
    *text = error_name(code);
    return *text ? emu::kSuccess : emu::kInvalidValue;
}

// ---- streams and events -----------------------------------------------------------------------

API CUresult cuStreamCreate(void** stream, unsigned flags) {
    if (!stream) return emu::kInvalidValue;
    auto held = lock();
    auto* s = new Stream{flags};
    g_streams.insert(s);
    *stream = s;
    return emu::kSuccess;
}
API CUresult cuStreamCreateWithPriority(void** stream, unsigned flags, int) { return cuStreamCreate(stream, flags); }
API CUresult cuStreamDestroy_v2(void* stream) {
    auto held = lock();
    if (!g_streams.erase(stream)) return emu::kInvalidHandle;
    delete static_cast<Stream*>(stream);
    return emu::kSuccess;
}
static bool known_stream(void* stream) { return stream == nullptr || g_streams.count(stream) > 0; }
API CUresult cuStreamSynchronize(void* stream) {
    auto held = lock();
    if (!known_stream(stream)) return emu::kInvalidHandle;
    return sticky();
}
API CUresult cuStreamQuery(void* stream) {
    auto held = lock();
    if (!known_stream(stream)) return emu::kInvalidHandle;
    return sticky();
}
API CUresult cuStreamWaitEvent(void* stream, void* event, unsigned) {
    auto held = lock();
    if (!known_stream(stream) || !g_events.count(event)) return emu::kInvalidHandle;
    return sticky();
}

API CUresult cuEventCreate(void** event, unsigned flags) {
    if (!event) return emu::kInvalidValue;
    auto held = lock();
    auto* e = new Event;
    e->timing = (flags & 0x2u) == 0;  // CU_EVENT_DISABLE_TIMING
    g_events.insert(e);
    *event = e;
    return emu::kSuccess;
}
API CUresult cuEventDestroy_v2(void* event) {
    auto held = lock();
    if (!g_events.erase(event)) return emu::kInvalidHandle;
    delete static_cast<Event*>(event);
    return emu::kSuccess;
}
API CUresult cuEventRecord(void* event, void* stream) {
    auto held = lock();
    if (!g_events.count(event) || !known_stream(stream)) return emu::kInvalidHandle;
    auto* e = static_cast<Event*>(event);
    e->stamp = std::chrono::steady_clock::now();
    e->recorded = true;
    return sticky();
}
API CUresult cuEventSynchronize(void* event) {
    auto held = lock();
    if (!g_events.count(event)) return emu::kInvalidHandle;
    return sticky();
}
API CUresult cuEventQuery(void* event) {
    auto held = lock();
    if (!g_events.count(event)) return emu::kInvalidHandle;
    return sticky();
}
API CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    if (!ms) return emu::kInvalidValue;
    auto held = lock();
    if (!g_events.count(start) || !g_events.count(end)) return emu::kInvalidHandle;
    auto* a = static_cast<Event*>(start);
    auto* b = static_cast<Event*>(end);
    if (!a->timing || !b->timing) return emu::kInvalidHandle;
    if (!a->recorded || !b->recorded) return emu::kNotReady;
    *ms = std::chrono::duration<float, std::milli>(b->stamp - a->stamp).count();
    return sticky();
}
API CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

// ---- memory -----------------------------------------------------------------------------------

API CUresult cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytes) {
    auto held = lock();
    return device_alloc(dptr, bytes);
}
API CUresult cuMemAllocAsync(CUdeviceptr* dptr, size_t bytes, void* stream) {
    auto held = lock();
    if (!known_stream(stream)) return emu::kInvalidHandle;
    return device_alloc(dptr, bytes);
}
API CUresult cuMemFree_v2(CUdeviceptr dptr) {
    auto held = lock();
    return device_free(dptr);
}
API CUresult cuMemFreeAsync(CUdeviceptr dptr, void* stream) {
    auto held = lock();
    if (!known_stream(stream)) return emu::kInvalidHandle;
    return device_free(dptr);
}
API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total_bytes) {
    if (!free_bytes || !total_bytes) return emu::kInvalidValue;
    auto held = lock();
    *total_bytes = kTotalMemory;
    *free_bytes = kTotalMemory - emu::bytes_in_use();
    return emu::kSuccess;
}
API CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice device) {
    if (!pool) return emu::kInvalidValue;
    if (device != 0) return emu::kInvalidDevice;
    *pool = &g_pool;
    return emu::kSuccess;
}
API CUresult cuDeviceGetMemPool(void** pool, CUdevice device) { return cuDeviceGetDefaultMemPool(pool, device); }
API CUresult cuMemPoolSetAttribute(void* pool, int, void* value) {
    return pool == &g_pool && value ? emu::kSuccess : emu::kInvalidValue;
}
API CUresult cuMemPoolGetAttribute(void* pool, int, void* value) {
    if (pool != &g_pool || !value) return emu::kInvalidValue;
    std::memset(value, 0, sizeof(unsigned long long));
    return emu::kSuccess;
}
API CUresult cuMemPoolTrimTo(void* pool, size_t) { return pool == &g_pool ? emu::kSuccess : emu::kInvalidValue; }

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    auto held = lock();
    return copy_to_device(dst, src, bytes, "cuMemcpyHtoD");
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, void* stream) {
    auto held = lock();
    if (!known_stream(stream)) return emu::kInvalidHandle;
    return copy_to_device(dst, src, bytes, "cuMemcpyHtoDAsync");
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    auto held = lock();
    return copy_from_device(dst, src, bytes, "cuMemcpyDtoH");
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, void* stream) {
    auto held = lock();
    if (!known_stream(stream)) return emu::kInvalidHandle;
    return copy_from_device(dst, src, bytes, "cuMemcpyDtoHAsync");
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    auto held = lock();
    return copy_within_device(dst, src, bytes);
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void* stream) {
    auto held = lock();
    if (!known_stream(stream)) return emu::kInvalidHandle;
    return copy_within_device(dst, src, bytes);
}
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t count) {
    auto held = lock();
    return fill(dst, &value, 1, count, "cuMemsetD8");
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t count, void* stream) {
    auto held = lock();
    if (!known_stream(stream)) return emu::kInvalidHandle;
    return fill(dst, &value, 1, count, "cuMemsetD8Async");
}
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int value, size_t count, void* stream) {
    auto held = lock();
    if (!known_stream(stream)) return emu::kInvalidHandle;
    return fill(dst, &value, 4, count, "cuMemsetD32Async");
}

// ---- modules, functions, launches ---------------------------------------------------------------

API CUresult cuModuleLoadData(void** module, const void* image) {
    if (!module || !image) return emu::kInvalidValue;
    auto held = lock();
    const auto entries = ptx_entries(static_cast<const char*>(image));
    if (entries.empty()) return emu::refuse(emu::kInvalidPtx, "cuModuleLoadData: the image declares no .entry");
    std::string why;
    const auto& all = emu::families(&why);
    if (all.empty()) return emu::refuse(emu::kInvalidImage, "cuModuleLoadData: " + why);
    for (emu::Family* family : all) {
        bool has_all = true;
        for (const auto& entry : entries) {
            bool found = false;
            for (const McsEmuKernel& k : family->kernels) found |= entry.first == k.name;
            has_all &= found;
        }
        if (!has_all) continue;
        auto* m = new Module;
        m->family = family;
        m->max_threads = entries;
        g_modules.insert(m);
        *module = m;
        return emu::kSuccess;
    }
    return emu::refuse(emu::kInvalidImage, "cuModuleLoadData: no host-compiled kernel family defines every entry of "
                                           "this PTX (first: `" + entries.begin()->first +
                                               "`); rebuild with tools/emulated_gpu.sh build");
}
API CUresult cuModuleUnload(void* module) {
    auto held = lock();
    if (!g_modules.erase(module)) return emu::kInvalidHandle;
    // Functions stay valid for the process's life (the engine never unloads a module it uses).
    return emu::kSuccess;
}
API CUresult cuModuleGetFunction(void** function, void* module, const char* name) {
    if (!function || !name) return emu::kInvalidValue;
    auto held = lock();
    if (!g_modules.count(module)) return emu::kInvalidHandle;
    auto* m = static_cast<Module*>(module);
    auto existing = m->functions.find(name);
    if (existing != m->functions.end()) {
        *function = existing->second;
        return emu::kSuccess;
    }
    auto entry = m->max_threads.find(name);
    if (entry == m->max_threads.end()) return emu::kNotFound;
    for (const McsEmuKernel& k : m->family->kernels) {
        if (std::strcmp(k.name, name) != 0) continue;
        auto* f = new emu::Function;
        f->family = m->family;
        f->kernel = k;
        f->max_threads = entry->second;
        m->functions[name] = f;
        g_functions.insert(f);
        *function = f;
        return emu::kSuccess;
    }
    return emu::kNotFound;
}

static size_t static_shared_bytes(const emu::Function& f) {
    size_t capacity = 0;
    f.family->dynamic_shared(&capacity);
    return f.family->tls_size > capacity ? f.family->tls_size - capacity : 0;
}

API CUresult cuFuncSetAttribute(void* function, int attribute, int value) {
    auto held = lock();
    if (!g_functions.count(function)) return emu::kInvalidHandle;
    auto* f = static_cast<emu::Function*>(function);
    if (attribute == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        const size_t limit = emu::kMaxSharedPerBlock - static_shared_bytes(*f);
        if (value < 0 || static_cast<size_t>(value) > limit) {
            return emu::refuse(emu::kInvalidValue, "cuFuncSetAttribute(`" + std::string(f->kernel.name) +
                                                       "`, MAX_DYNAMIC_SHARED_SIZE_BYTES, " + std::to_string(value) +
                                                       "): above the " + std::to_string(limit) +
                                                       " bytes sm_90 allows next to its static shared memory");
        }
        f->max_dynamic_shared = static_cast<size_t>(value);
        return emu::kSuccess;
    }
    return emu::kSuccess;  // cache and carveout preferences change nothing here
}
API CUresult cuFuncGetAttribute(int* value, int attribute, void* function) {
    if (!value) return emu::kInvalidValue;
    auto held = lock();
    if (!g_functions.count(function)) return emu::kInvalidHandle;
    auto* f = static_cast<emu::Function*>(function);
    switch (attribute) {
        case 0: *value = f->max_threads ? static_cast<int>(f->max_threads) : 1024; break;  // MAX_THREADS_PER_BLOCK
        case 1: *value = static_cast<int>(static_shared_bytes(*f)); break;                 // SHARED_SIZE_BYTES
        case 8: *value = static_cast<int>(f->max_dynamic_shared); break;                  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        default: *value = 0; break;
    }
    return emu::kSuccess;
}
API CUresult cuFuncSetCacheConfig(void* function, int) {
    auto held = lock();
    return g_functions.count(function) ? emu::kSuccess : emu::kInvalidHandle;
}

API CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned shared_bytes, void* stream, void** params, void** extra) {
    auto held = lock();
    if (!g_functions.count(function)) return emu::kInvalidHandle;
    if (!known_stream(stream)) return emu::kInvalidHandle;
    if (CUresult s = sticky()) return s;
    auto* f = static_cast<emu::Function*>(function);
    const std::string kernel = "launch of `" + std::string(f->kernel.name) + "` with grid (" + std::to_string(gx) + "," +
                               std::to_string(gy) + "," + std::to_string(gz) + ") and block (" + std::to_string(bx) +
                               "," + std::to_string(by) + "," + std::to_string(bz) + ")";
    if (extra) return emu::refuse(emu::kNotSupported, kernel + ": `extra` launch options are not emulated");
    if (!params) return emu::refuse(emu::kInvalidValue, kernel + ": no kernel arguments");
    if (bx == 0 || by == 0 || bz == 0 || gx == 0 || gy == 0 || gz == 0) {
        return emu::refuse(emu::kInvalidValue, kernel + ": every grid and block dimension must be at least 1");
    }
    const unsigned long long threads = 1ull * bx * by * bz;
    if (bx > 1024 || by > 1024 || bz > emu::kMaxBlockZ || threads > emu::kMaxThreadsPerBlock) {
        return emu::refuse(emu::kInvalidValue, kernel + ": sm_90 allows at most 1024 threads a block (x, y <= 1024, z <= 64)");
    }
    if (f->max_threads && threads > f->max_threads) {
        return emu::refuse(emu::kLaunchOutOfResources, kernel + ": the kernel's __launch_bounds__ allow at most " +
                                                           std::to_string(f->max_threads) + " threads a block");
    }
    if (gx > emu::kMaxGridX || gy > emu::kMaxGridYZ || gz > emu::kMaxGridYZ) {
        return emu::refuse(emu::kInvalidValue, kernel + ": grid y and z are at most 65535, x at most 2^31-1");
    }
    if (shared_bytes > f->max_dynamic_shared) {
        return emu::refuse(emu::kInvalidValue,
                           kernel + ": " + std::to_string(shared_bytes) + " bytes of dynamic shared memory, but the kernel is allowed " +
                               std::to_string(f->max_dynamic_shared) +
                               (f->max_dynamic_shared == emu::kDefaultDynamicShared
                                    ? " (above 48 KiB needs cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) first)"
                                    : ""));
    }
    emu::Launch launch;
    launch.function = f;
    launch.grid = {gx, gy, gz};
    launch.block = {bx, by, bz};
    launch.dynamic_shared = shared_bytes;
    launch.params = params;
    return emu::run(launch);
}
