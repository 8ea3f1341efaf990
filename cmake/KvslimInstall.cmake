# Install the library, headers, tools, a namespaced CMake package and a pkg-config file:
#   find_package(kvslim CONFIG REQUIRED)  ->  target kvslim::kvslim
#   pkg-config --cflags --libs kvslim     (C programs: kvslim/kvslim_c.h)
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS kvslim EXPORT kvslimTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/kvslim DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT kvslimTargets NAMESPACE kvslim:: FILE kvslimTargets.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/kvslim)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/kvslim-config.cmake.in
        ${PROJECT_BINARY_DIR}/kvslim-config.cmake
        INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/kvslim)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/kvslim-config-version.cmake
        VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/kvslim-config.cmake ${PROJECT_BINARY_DIR}/kvslim-config-version.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/kvslim)

# kvslim.pc: the prefix is relative to the .pc file's directory (${pcfiledir}), so that
# `cmake --install --prefix P` with any P gives a working file (an absolute
# CMAKE_INSTALL_LIBDIR falls back to the configured prefix).
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
  set(KVSLIM_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
else()
  file(RELATIVE_PATH up "/root/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/root")
  string(REGEX REPLACE "/$" "" up "${up}")
  set(KVSLIM_PC_PREFIX "\${pcfiledir}/${up}")
endif()
foreach(kind LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_${kind}}")
    set(KVSLIM_PC_${kind} "${CMAKE_INSTALL_${kind}}")
  else()
    set(KVSLIM_PC_${kind} "\${prefix}/${CMAKE_INSTALL_${kind}}")
  endif()
endforeach()
configure_file(${PROJECT_SOURCE_DIR}/cmake/kvslim.pc.in ${PROJECT_BINARY_DIR}/kvslim.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/kvslim.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
