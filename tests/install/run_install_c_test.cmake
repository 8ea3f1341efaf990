# Driven by ctest (install_consumer_c): install kvslim, then build the C test program
# (tests/c_api_test.c) against the installed package twice, through find_package in a C-only
# CMake project and through pkg-config with the C compiler alone, and run both builds.
file(REMOVE_RECURSE ${PREFIX} ${CONSUMER_BUILD})
file(MAKE_DIRECTORY ${CONSUMER_BUILD})
if(NOT CONFIG)
  set(CONFIG Release)
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${PREFIX} --config ${CONFIG}
                RESULT_VARIABLE r OUTPUT_QUIET)
if(r)
  message(FATAL_ERROR "install failed: ${r}")
endif()

# Runs one build of the test program; it must pass and say so.
function(run_consumer exe how)
  execute_process(COMMAND ${exe} ${CONSUMER_BUILD} RESULT_VARIABLE r OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message(STATUS "${how} consumer said: ${out}${err}")
  if(r)
    message(FATAL_ERROR "${how} consumer failed: ${r}")
  endif()
  if(NOT out MATCHES "kvslim C API ok")
    message(FATAL_ERROR "${how} consumer output unexpected: ${out}")
  endif()
endfunction()

# 1. find_package(kvslim) from a project that enables only C.
set(cmake_build ${CONSUMER_BUILD}/cmake)
execute_process(COMMAND ${CMAKE_COMMAND} -S ${CONSUMER_SRC} -B ${cmake_build}
                        -DCMAKE_PREFIX_PATH=${PREFIX} -DCMAKE_BUILD_TYPE=${CONFIG} -DCMAKE_C_COMPILER=${CC}
                        -DKVSLIM_C_TEST_SOURCE=${C_TEST_SOURCE}
                RESULT_VARIABLE r)
if(r)
  message(FATAL_ERROR "C consumer configure failed: ${r}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${cmake_build} --config ${CONFIG} RESULT_VARIABLE r)
if(r)
  message(FATAL_ERROR "C consumer build failed: ${r}")
endif()
run_consumer(${cmake_build}/c_consumer find_package)

# 2. pkg-config: cc $(pkg-config --cflags kvslim) prog.c $(pkg-config --libs kvslim).
find_program(PKG_CONFIG_EXE pkg-config)
if(NOT PKG_CONFIG_EXE)
  message(FATAL_ERROR "pkg-config not found (apt-get install pkg-config)")
endif()
file(GLOB_RECURSE pc_files ${PREFIX}/*/kvslim.pc)
list(LENGTH pc_files n)
if(NOT n EQUAL 1)
  message(FATAL_ERROR "expected one installed kvslim.pc under ${PREFIX}, found: ${pc_files}")
endif()
get_filename_component(pc_dir ${pc_files} DIRECTORY)
set(ENV{PKG_CONFIG_PATH} ${pc_dir})
foreach(what modversion cflags libs)
  execute_process(COMMAND ${PKG_CONFIG_EXE} --print-errors --${what} kvslim RESULT_VARIABLE r
                  OUTPUT_VARIABLE pc_${what} OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(r)
    message(FATAL_ERROR "pkg-config --${what} kvslim failed: ${r}")
  endif()
endforeach()
message(STATUS "pkg-config: version ${pc_modversion}, cflags '${pc_cflags}', libs '${pc_libs}'")
if(NOT pc_modversion STREQUAL VERSION)
  message(FATAL_ERROR "kvslim.pc says version ${pc_modversion}, the project is ${VERSION}")
endif()
separate_arguments(pc_cflags UNIX_COMMAND "${pc_cflags}")
separate_arguments(pc_libs UNIX_COMMAND "${pc_libs}")
set(pc_exe ${CONSUMER_BUILD}/c_consumer_pkgconfig)
execute_process(COMMAND ${CC} -std=c99 -pedantic -Wall -Wextra -Werror -O2 ${pc_cflags} ${C_TEST_SOURCE}
                        -o ${pc_exe} ${pc_libs}
                RESULT_VARIABLE r)
if(r)
  message(FATAL_ERROR "C consumer build with pkg-config failed: ${r}")
endif()
run_consumer(${pc_exe} pkg-config)
