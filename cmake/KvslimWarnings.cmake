# kvslim_set_warnings(target): the project's warning set (and sanitizers when asked).
function(kvslim_set_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow -Wconversion
                                           -Wno-sign-conversion)
  if(KVSLIM_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()

if(KVSLIM_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  add_link_options(-fsanitize=address,undefined)
endif()
