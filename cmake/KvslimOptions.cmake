# Build options. Tests, benchmarks and examples default on only when kvslim is the top-level
# project, so an engine that add_subdirectory()s kvslim builds just the library.
option(KVSLIM_BUILD_TESTS "Build the test suite" ${PROJECT_IS_TOP_LEVEL})
option(KVSLIM_BUILD_BENCH "Build the benchmark suite" ${PROJECT_IS_TOP_LEVEL})
option(KVSLIM_BUILD_EXAMPLES "Build the examples" ${PROJECT_IS_TOP_LEVEL})
option(KVSLIM_INSTALL "Generate install rules" ON)
option(KVSLIM_SANITIZE "Build with -fsanitize=address,undefined" OFF)
option(KVSLIM_WERROR "Treat warnings as errors" OFF)
option(KVSLIM_ENABLE_AVX2 "Build the AVX2 kernel table" ON)
option(KVSLIM_ENABLE_AVX512 "Build the AVX-512 kernel table" ON)
