# The hot kernels' ISA paths (cpp/include/moelb/cpu_isa.hpp, cpp/src/isa/kernels.hpp).
#
# Portable x86-64 build (MOELB_NATIVE=OFF): the kernel sources are compiled three times, as object
# libraries moelb_isa_baseline (the compiler's default target, SSE2), moelb_isa_avx2
# (-march=x86-64-v3) and moelb_isa_avx512 (-march=x86-64-v4), each with its own namespace
# (MOELB_ISA_NS) and Eigen's namespace renamed (-DEigen=...), and cpu_isa.cpp picks one at run
# time. A fourth path, moelb_isa_avx512_bf16 (x86-64-v4 + AVX512_BF16; opt-in,
# -DMOELB_ISA_AVX512_BF16=ON, where the compiler has -mavx512bf16), extends avx512: it compiles only the kernels vdpbf16ps changes (the quantised GEMM
# and the machine-limit loops) and takes the rest from avx512's table (MOELB_ISA_BASE). Other CPUs (aarch64, ...): the baseline path only. MOELB_NATIVE=ON: one path, "native",
# compiled with -march=native like the rest of the core.
#
# After each path's objects are compiled, cmake/check_isa_symbols.cmake checks that every external
# symbol they define carries the path's tag (isa_<path>): an untagged inline or template function
# compiled for AVX-512 could be the copy the linker keeps for every caller, the baseline path's
# included. moelb_core depends on the check, so a leak fails the build.
include(CheckCXXCompilerFlag)

set(MOELB_ISA_SOURCES
  cpp/src/isa/routing_kernels.cpp
  cpp/src/isa/moe_kernels.cpp
  cpp/src/isa/eplb_kernels.cpp
  cpp/src/isa/simulate_kernels.cpp
  cpp/src/isa/quant_kernels.cpp
  cpp/src/isa/limits_kernels.cpp
  cpp/src/isa/kernel_table.cpp
)
# The planner's and the simulator's kernels compute the same bits on every path (plans and scores
# must not depend on the CPU): no contraction of a * b + c into an FMA, which GCC does by default
# where FMA exists.
set_source_files_properties(cpp/src/isa/eplb_kernels.cpp cpp/src/isa/simulate_kernels.cpp
                            PROPERTIES COMPILE_OPTIONS -ffp-contract=off)

if(MOELB_NATIVE)
  set(MOELB_ISA_PATHS native)
  set(MOELB_ISA_FLAGS_native -march=native)
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
  set(MOELB_ISA_PATHS baseline avx2 avx512)
  set(MOELB_ISA_FLAGS_baseline "")
  check_cxx_compiler_flag(-march=x86-64-v4 MOELB_HAVE_MARCH_X86_64_V4)
  if(MOELB_HAVE_MARCH_X86_64_V4)
    set(MOELB_ISA_FLAGS_avx2 -march=x86-64-v3)
    set(MOELB_ISA_FLAGS_avx512 -march=x86-64-v4)
  else()  # compilers before the x86-64-vN names (GCC < 11, Clang < 12): the same features
    set(MOELB_ISA_FLAGS_avx2 -mavx2 -mfma -mf16c -mbmi -mbmi2 -mlzcnt -mmovbe -mpopcnt)
    set(MOELB_ISA_FLAGS_avx512 ${MOELB_ISA_FLAGS_avx2} -mavx512f -mavx512bw -mavx512cd
                               -mavx512dq -mavx512vl)
  endif()
  # Opt-in until run on hardware with AVX512_BF16 (its kernels and tests were written on a CPU
  # without AVX-512; docs/architecture.md, "Portable build and ISA dispatch").
  option(MOELB_ISA_AVX512_BF16 "Compile the avx512_bf16 path (vdpbf16ps; not yet verified)" OFF)
  if(MOELB_ISA_AVX512_BF16)
    check_cxx_compiler_flag(-mavx512bf16 MOELB_HAVE_MAVX512BF16)
  endif()
  if(MOELB_ISA_AVX512_BF16 AND MOELB_HAVE_MAVX512BF16)
    list(APPEND MOELB_ISA_PATHS avx512_bf16)
    set(MOELB_ISA_FLAGS_avx512_bf16 ${MOELB_ISA_FLAGS_avx512} -mavx512bf16)
    set(MOELB_ISA_SOURCES_avx512_bf16 cpp/src/isa/quant_kernels.cpp
                                      cpp/src/isa/limits_kernels.cpp
                                      cpp/src/isa/kernel_table.cpp)
    set(MOELB_ISA_BASE_avx512_bf16 moelb::isa_avx512)
  endif()
else()
  set(MOELB_ISA_PATHS baseline)
  set(MOELB_ISA_FLAGS_baseline "")
endif()

foreach(path IN LISTS MOELB_ISA_PATHS)
  set(target moelb_isa_${path})
  if(NOT DEFINED MOELB_ISA_SOURCES_${path})
    set(MOELB_ISA_SOURCES_${path} ${MOELB_ISA_SOURCES})
  endif()
  add_library(${target} OBJECT ${MOELB_ISA_SOURCES_${path}})
  if(DEFINED MOELB_ISA_BASE_${path})
    target_compile_definitions(${target} PRIVATE MOELB_ISA_BASE=${MOELB_ISA_BASE_${path}})
  endif()
  # Eigen's include directory only: the definitions are this path's own.
  target_include_directories(${target} SYSTEM PRIVATE
                             $<TARGET_PROPERTY:Eigen3::Eigen,INTERFACE_INCLUDE_DIRECTORIES>)
  target_compile_definitions(${target} PRIVATE MOELB_ISA_NS=isa_${path}
                             Eigen=moelb_isa_${path}_Eigen EIGEN_MPL2_ONLY EIGEN_DONT_PARALLELIZE)
  set(avx512_warnings "")
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND path MATCHES "^avx512")
    set(avx512_warnings -Wno-uninitialized)
  endif()
  # GCC 12 warns about its own AVX-512 intrinsics' deliberate self-initialisation (`__m512 __Y =
  # __Y;`, "undefined" vectors) as (maybe-)uninitialized, at -O1 (the ASan build) even as certain.
  # -Wpsabi: 256-bit vectors passed by value without AVX (the baseline path) have another ABI;
  # the kernels' helpers that do so have internal linkage, so no caller sees that ABI.
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wno-psabi
                         $<$<CXX_COMPILER_ID:GNU>:-Wno-maybe-uninitialized>
                         ${avx512_warnings}
                         ${MOELB_ISA_FLAGS_${path}} ${MOELB_SANITIZE_FLAGS})
  target_sources(moelb_core PRIVATE $<TARGET_OBJECTS:${target}>)
  string(TOUPPER ${path} upper)
  target_compile_definitions(moelb_core PRIVATE MOELB_ISA_HAVE_${upper})

  set(stamp ${CMAKE_CURRENT_BINARY_DIR}/${target}.symbols-ok)
  add_custom_command(
    OUTPUT ${stamp}
    COMMAND ${CMAKE_COMMAND} -DNM=${CMAKE_NM} -DTAG=isa_${path}
            "-DOBJECTS=$<JOIN:$<TARGET_OBJECTS:${target}>,|>" -DSTAMP=${stamp}
            -P ${CMAKE_CURRENT_SOURCE_DIR}/cmake/check_isa_symbols.cmake
    DEPENDS $<TARGET_OBJECTS:${target}> ${CMAKE_CURRENT_SOURCE_DIR}/cmake/check_isa_symbols.cmake
    COMMENT "Checking that the ${path} kernels define only isa_${path} symbols"
    VERBATIM)
  add_custom_target(${target}_symbols DEPENDS ${stamp})
  add_dependencies(${target}_symbols ${target})
  add_dependencies(moelb_core ${target}_symbols)
endforeach()
