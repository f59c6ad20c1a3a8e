# Passed to llama-cpp-python's build by setup.sh (CMAKE_PROJECT_llama_cpp_INCLUDE).
#
# With GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS, ggml builds one CPU backend
# module per x86 feature level (x64, sse42, haswell, skylakex, icelake, ...)
# and picks one at run time. llama-cpp-python installs only a fixed list of
# targets, so the variant modules would be built and then thrown away: this
# installs every ggml-cpu-* module next to libggml, where
# tora/backends/ggml_cpu.py finds, scores and probes them.
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL _tora_install_cpu_variants)

function(_tora_install_cpu_variants)
  get_property(targets DIRECTORY ${CMAKE_SOURCE_DIR}/vendor/llama.cpp/ggml/src PROPERTY BUILDSYSTEM_TARGETS)
  foreach(target IN LISTS targets)
    if(target MATCHES "^ggml-cpu-")
      set_target_properties(${target} PROPERTIES INSTALL_RPATH "$ORIGIN" BUILD_WITH_INSTALL_RPATH TRUE)
      install(TARGETS ${target} LIBRARY DESTINATION ${SKBUILD_PLATLIB_DIR}/llama_cpp/lib)
    endif()
  endforeach()
endfunction()
