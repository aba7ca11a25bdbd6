import pytest
from hubble_helpers import make_enricher

from propolis.hubble.flow import Enricher


@pytest.fixture
def enricher() -> Enricher:
    return make_enricher()
