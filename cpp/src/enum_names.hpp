// Private: enums <-> the names Python uses, one table per enum, so parsing and printing cannot
// drift apart and bad names get the same error everywhere.
#pragma once

#include <array>
#include <cstddef>
#include <sstream>
#include <string_view>
#include <utility>

#include "moelb/errors.hpp"

namespace moelb::detail {

template <class Enum, std::size_t N>
using EnumNames = std::array<std::pair<std::string_view, Enum>, N>;

// The value named `name`, else an InvalidArgument: "<param>='<name>' is not <what>; expected
// 'a', 'b' or 'c'".
template <class Enum, std::size_t N>
Enum parse_enum(const EnumNames<Enum, N>& names, std::string_view name, std::string_view param,
                std::string_view what) {
    for (const auto& [n, value] : names) {
        if (n == name) return value;
    }
    std::ostringstream os;
    os << param << "='" << name << "' is not " << what << "; expected ";
    for (std::size_t i = 0; i < N; ++i) {
        if (i > 0) os << (i + 1 == N ? " or " : ", ");
        os << "'" << names[i].first << "'";
    }
    throw InvalidArgument(os.str(), "name in " + std::string(what));
}

template <class Enum, std::size_t N>
std::string_view enum_name(const EnumNames<Enum, N>& names, Enum value) {
    for (const auto& [n, v] : names) {
        if (v == value) return n;
    }
    return "?";
}

}  // namespace moelb::detail
