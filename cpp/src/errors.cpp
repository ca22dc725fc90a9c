// Error types shared by every area (DESIGN "Conventions"; moelb/errors.hpp).
#include "moelb/errors.hpp"

namespace moelb::detail {

void throw_invalid_argument(const std::string& message, const char* condition) {
    throw InvalidArgument(message, condition);
}

void throw_error(const std::string& message, const char* condition, const char* file, int line) {
    std::ostringstream os;
    os << "internal error: " << message << " (check '" << condition << "' failed at " << file << ":"
       << line << "; please report this)";
    throw Error(os.str(), condition);
}

}  // namespace moelb::detail
