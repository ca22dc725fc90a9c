// Error types and check macros shared by every area.
//
// InvalidArgument: the caller passed bad input (arrives in Python as moelb.InvalidArgumentError, a
// ValueError). InvalidDType is an InvalidArgument for a wrong array dtype (moelb.InvalidDTypeError,
// both a ValueError and a TypeError). Error: an internal invariant broke (moelb.Error, a
// RuntimeError). Messages use the Python parameter names, e.g. "topk_ids has 7 columns but
// top_k=8".
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moelb {

class InvalidArgument : public std::invalid_argument {
  public:
    InvalidArgument(const std::string& message, std::string condition = {})
        : std::invalid_argument(message), condition_(std::move(condition)) {}
    // The source text of the check that failed (empty when thrown directly).
    const std::string& condition() const noexcept { return condition_; }

  private:
    std::string condition_;
};

class InvalidDType : public InvalidArgument {
  public:
    using InvalidArgument::InvalidArgument;
};

class Error : public std::runtime_error {
  public:
    Error(const std::string& message, std::string condition = {})
        : std::runtime_error(message), condition_(std::move(condition)) {}
    const std::string& condition() const noexcept { return condition_; }

  private:
    std::string condition_;
};

namespace detail {
[[noreturn]] void throw_invalid_argument(const std::string& message, const char* condition);
[[noreturn]] void throw_error(const std::string& message, const char* condition, const char* file,
                              int line);
}  // namespace detail

}  // namespace moelb

// MOELB_CHECK_ARG(cond, stream-expression): bad input. The message is user facing; the condition
// text is kept on the exception for debugging.
#define MOELB_CHECK_ARG(cond, msg)                                                 \
    do {                                                                           \
        if (!(cond)) [[unlikely]] {                                                \
            std::ostringstream moelb_check_os_;                                    \
            moelb_check_os_ << msg;                                                \
            ::moelb::detail::throw_invalid_argument(moelb_check_os_.str(), #cond); \
        }                                                                          \
    } while (0)

// MOELB_CHECK(cond, stream-expression): a broken internal invariant (a bug in moelb).
#define MOELB_CHECK(cond, msg)                                                              \
    do {                                                                                    \
        if (!(cond)) [[unlikely]] {                                                         \
            std::ostringstream moelb_check_os_;                                             \
            moelb_check_os_ << msg;                                                         \
            ::moelb::detail::throw_error(moelb_check_os_.str(), #cond, __FILE__, __LINE__); \
        }                                                                                   \
    } while (0)
