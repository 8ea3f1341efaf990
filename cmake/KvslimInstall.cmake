# Install the library, headers, tools and a namespaced CMake package:
#   find_package(kvslim CONFIG REQUIRED)  ->  target kvslim::kvslim
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
