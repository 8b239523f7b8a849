"""pytest options of this repository: `python -m pytest --exercises` also runs the classroom
exercises' checks (tests/test_exercises.py), which are skipped by default because they fail
until a student has done the exercise (README, "Classroom exercises"). Tests marked slow run by
default (CI runs them); `python -m pytest -m "not slow"` leaves them out while you iterate."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--exercises", action="store_true",
                     help="run the classroom exercises' checks (they fail until solved)")


def pytest_configure(config):
    config.addinivalue_line("markers", "exercise(n): the check of README exercise n")
    config.addinivalue_line("markers", "slow: runs a whole method or starts processes (seconds "
                            "to a minute); run by default and in CI, skip with -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--exercises"):
        return
    skip = pytest.mark.skip(reason="a classroom exercise: run with --exercises")
    for item in items:
        if item.get_closest_marker("exercise"):
            item.add_marker(skip)


@pytest.fixture
def sampler_tools(monkeypatch):
    """What each call of model.generate by star.py (every sampler of vstar and search goes
    through it) is given as its tool: a list of True (a calculator, checked to answer "12+7="
    with "19") or False (none)."""
    import star
    from tasks import decode, encode
    seen, real = [], star.generate

    def spy(model, prompts, *a, tool=None, **kw):
        seen.append(tool is not None)
        if tool is not None:
            assert decode(tool(0, encode("12+7="))) == "19\n"
        return real(model, prompts, *a, tool=tool, **kw)
    monkeypatch.setattr(star, "generate", spy)
    return seen
