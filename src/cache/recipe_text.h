// Internal: how recipe text is quoted in error messages.
#pragma once

#include <string>
#include <string_view>

namespace kvslim::detail {

/// Recipe text (or a fragment of it) as quoted in an error message: the whole text if it is
/// at most kRecipeQuoteMax characters, else its first kRecipeQuoteKeep characters followed by
/// "... (N chars)". Line breaks and tabs are shown as \n, \r and \t so a message stays on one
/// line when the recipe came from a file.
inline constexpr std::size_t kRecipeQuoteMax = 100;
inline constexpr std::size_t kRecipeQuoteKeep = 80;
std::string clip_recipe(std::string_view text);

}  // namespace kvslim::detail
