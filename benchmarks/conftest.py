"""Options of the pytest-benchmark suites in this folder (``pytest benchmarks --benchmark-only``)."""


def pytest_addoption(parser):
    parser.addoption("--smoke", action="store_true", default=False,
                     help="fastpref benchmark suites: tiny shapes on whatever device there is, the CPU included "
                          "(same as FASTPREF_BENCH_SMOKE=1)")
