// Error types and check macros (errors.hpp): which exception each macro throws, what the message
// and condition() carry, and the class hierarchy the Python exceptions mirror.
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "moelb/errors.hpp"

namespace {

using moelb::Error;
using moelb::InvalidArgument;
using moelb::InvalidDType;

bool contains(const std::string& haystack, const std::string& needle) {
    return haystack.find(needle) != std::string::npos;
}

void check_arg_positive(int top_k) {
    MOELB_CHECK_ARG(top_k > 0, "top_k must be positive, got " << top_k);
}

void check_invariant(int count) {
    MOELB_CHECK(count == 3, "count is " << count << " instead of 3");
}

TEST(Errors, CheckArgPassesWhenConditionHolds) {
    EXPECT_NO_THROW(check_arg_positive(1));
    EXPECT_NO_THROW(check_invariant(3));
}

TEST(Errors, CheckArgThrowsInvalidArgumentWithMessageAndCondition) {
    EXPECT_THROW(check_arg_positive(0), InvalidArgument);
    try {
        check_arg_positive(-7);
        FAIL() << "MOELB_CHECK_ARG did not throw";
    } catch (const InvalidArgument& e) {
        // The user-facing message is exactly the streamed text; the condition is kept apart.
        EXPECT_EQ(std::string(e.what()), "top_k must be positive, got -7");
        EXPECT_EQ(e.condition(), "top_k > 0");
    }
}

TEST(Errors, CheckArgIsCatchableAsStdInvalidArgument) {
    // Callers that only know the standard library (and pybind11's default translation) see a
    // std::invalid_argument, never a runtime_error.
    EXPECT_THROW(check_arg_positive(0), std::invalid_argument);
    EXPECT_THROW(check_arg_positive(0), std::logic_error);
}

TEST(Errors, CheckArgEvaluatesMessageOnlyOnFailure) {
    int evaluations = 0;
    auto count = [&] {
        ++evaluations;
        return 1;
    };
    MOELB_CHECK_ARG(true, "never built " << count());
    EXPECT_EQ(evaluations, 0);
    EXPECT_THROW(MOELB_CHECK_ARG(false, "built " << count()), InvalidArgument);
    EXPECT_EQ(evaluations, 1);
}

TEST(Errors, CheckThrowsErrorWithMessageConditionAndLocation) {
    EXPECT_THROW(check_invariant(2), Error);
    EXPECT_THROW(check_invariant(2), std::runtime_error);
    try {
        check_invariant(5);
        FAIL() << "MOELB_CHECK did not throw";
    } catch (const InvalidArgument&) {
        FAIL() << "MOELB_CHECK must not throw InvalidArgument (an internal error is not bad input)";
    } catch (const Error& e) {
        const std::string what = e.what();
        EXPECT_TRUE(contains(what, "count is 5 instead of 3")) << what;
        EXPECT_TRUE(contains(what, "count == 3")) << what;
        EXPECT_TRUE(contains(what, "test_errors.cpp")) << what;
        EXPECT_EQ(e.condition(), "count == 3");
    }
}

TEST(Errors, DirectlyThrownErrorsHaveEmptyCondition) {
    const InvalidArgument arg("bad");
    EXPECT_EQ(std::string(arg.what()), "bad");
    EXPECT_TRUE(arg.condition().empty());
    const Error err("broken", "x < y");
    EXPECT_EQ(std::string(err.what()), "broken");
    EXPECT_EQ(err.condition(), "x < y");
}

TEST(Errors, Hierarchy) {
    static_assert(std::is_base_of_v<InvalidArgument, InvalidDType>);
    static_assert(std::is_base_of_v<std::invalid_argument, InvalidArgument>);
    static_assert(std::is_base_of_v<std::runtime_error, Error>);
    static_assert(!std::is_base_of_v<InvalidArgument, Error>);
    static_assert(!std::is_base_of_v<Error, InvalidArgument>);
    // An InvalidDType is caught by an InvalidArgument handler and keeps its message/condition.
    try {
        throw InvalidDType("router_logits must be float32, got float64", "dtype == float32");
    } catch (const InvalidArgument& e) {
        EXPECT_NE(dynamic_cast<const InvalidDType*>(&e), nullptr);
        EXPECT_EQ(std::string(e.what()), "router_logits must be float32, got float64");
        EXPECT_EQ(e.condition(), "dtype == float32");
        return;
    }
    FAIL() << "InvalidDType was not caught as InvalidArgument";
}

}  // namespace
