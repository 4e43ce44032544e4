"""Fixtures shared by the end-to-end test files (one daemon for the browser and the API-schema tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.console_stack import ConsoleStack, running_console_stack


@pytest.fixture(scope="session")
def console_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleStack]:
    """`triaged serve` with the shipped model after an urgent, a normal and a not-assessable series."""
    with running_console_stack(tmp_path_factory.mktemp("console")) as stack:
        yield stack
