"""Counts every case of the reliability suite by outcome, printed at the end of `pytest tests/reliability`."""

import collections

import pytest

OUTCOMES: collections.Counter = collections.Counter()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        kind = item.get_closest_marker("reliability")
        group = kind.args[0] if kind else "other"
        OUTCOMES[(group, report.outcome)] += 1


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability(kind): bad-input case, injected fault, or fuzz target")


def pytest_terminal_summary(terminalreporter):
    if not OUTCOMES:
        return
    terminalreporter.section("reliability summary")
    groups = sorted({g for g, _ in OUTCOMES})
    for group in groups:
        counts = {o: n for (g, o), n in OUTCOMES.items() if g == group}
        terminalreporter.write_line(
            f"{group:<28} tried {sum(counts.values()):>4}   "
            + "   ".join(f"{o} {n}" for o, n in sorted(counts.items()))
        )
