"""Suite-wide fixtures."""

from __future__ import annotations

import logging
from typing import Iterator

import pytest


@pytest.fixture(autouse=True)
def _fresh_relaymilter_logger() -> Iterator[None]:
    """Commands run in-process (main([...])) set up the "relaymilter" logger the way a
    daemon does (own handler, no propagation); undo that after each test so later
    tests' caplog sees records again."""
    logger = logging.getLogger("relaymilter")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
