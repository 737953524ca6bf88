"""Fixtures for the dc plugin's tests: a tiny real dataset and a tiny pixel parameterization
stand-in, one intra-op thread per test (all from :mod:`splatdd.testing_fixtures`)."""
from splatdd.testing_fixtures import one_thread, quick_workdir, real, tiny_pixels  # noqa: F401
