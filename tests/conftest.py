"""pytest options of this repository: `python -m pytest --exercises` also runs the classroom
exercises' checks (tests/test_exercises.py), which are skipped by default because they fail
until a student has done the exercise (README, "Classroom exercises")."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--exercises", action="store_true",
                     help="run the classroom exercises' checks (they fail until solved)")


def pytest_configure(config):
    config.addinivalue_line("markers", "exercise(n): the check of README exercise n")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--exercises"):
        return
    skip = pytest.mark.skip(reason="a classroom exercise: run with --exercises")
    for item in items:
        if item.get_closest_marker("exercise"):
            item.add_marker(skip)
