"""Fixtures of the service tests."""
import pytest
from hostile_api import api_server


@pytest.fixture(scope="module")
def api():
    """The gmm model with a guidance-input variant 'secant-test' trained on [1, 3], best at 4 steps."""
    yield from api_server()
