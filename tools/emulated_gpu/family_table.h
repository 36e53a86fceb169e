// Included at the end of each generated family file (tools/emulated_gpu.sh): turns the list of
// kernel names into the table the emulated driver looks kernels up in. The argument types come
// from each kernel's own signature (template deduction), so no signature is written twice.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

#include "emu_abi.h"

template <typename... Args>
constexpr std::size_t mcs_emu_arity(void (*)(Args...)) {
    return sizeof...(Args);
}

// Reads each argument from the pointer cuLaunchKernel was given for it. Not instrumented: the
// pointers lead into the launching program's memory, which is not device memory.
template <typename... Args, std::size_t... I>
__attribute__((no_sanitize_address)) void mcs_emu_call(void (*kernel)(Args...), void** params,
                                                        std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<Args>*>(params[I])...);
}

template <auto Kernel>
void mcs_emu_invoke(void** params) {
    mcs_emu_call(Kernel, params, std::make_index_sequence<mcs_emu_arity(Kernel)>{});
}

// A kernel may share its name with a device function (philox_normal does): of the overloads, the
// one returning void is the kernel.
template <typename... Args>
constexpr auto mcs_emu_kernel_overload(void (*kernel)(Args...)) {
    return kernel;
}

#define MCS_EMU_KERNEL(name) McsEmuKernel{#name, &mcs_emu_invoke<mcs_emu_kernel_overload(&name)>}
