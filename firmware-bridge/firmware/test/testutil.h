/* Minimal test helpers shared by the host tests (no framework needed). */
#ifndef TESTUTIL_H
#define TESTUTIL_H

#include <stdio.h>

static int tu_failures = 0;
static int tu_checks = 0;
static const char *tu_test = "?";

#define CHECK(cond)                                                                   \
    do {                                                                              \
        tu_checks++;                                                                  \
        if (!(cond)) {                                                                \
            tu_failures++;                                                            \
            fprintf(stderr, "FAIL [%s] %s:%d: %s\n", tu_test, __FILE__, __LINE__, #cond); \
        }                                                                             \
    } while (0)

/* CHECK with a printf-style explanation. */
#define CHECKF(cond, ...)                                                             \
    do {                                                                              \
        tu_checks++;                                                                  \
        if (!(cond)) {                                                                \
            tu_failures++;                                                            \
            fprintf(stderr, "FAIL [%s] %s:%d: %s: ", tu_test, __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                             \
            fputc('\n', stderr);                                                      \
        }                                                                             \
    } while (0)

#define CHECK_EQ(a, b)                                                                \
    CHECKF((long long)(a) == (long long)(b), "%s = %lld, %s = %lld", #a, (long long)(a), #b, \
           (long long)(b))

#define RUN(fn)                                                                       \
    do {                                                                              \
        int before_ = tu_failures;                                                    \
        tu_test = #fn;                                                                \
        fn();                                                                         \
        printf("%s %s\n", tu_failures == before_ ? "ok  " : "FAIL", #fn);             \
    } while (0)

static int tu_report(const char *suite)
{
    printf("%s: %d checks, %d failed\n", suite, tu_checks, tu_failures);
    return tu_failures ? 1 : 0;
}

#endif
