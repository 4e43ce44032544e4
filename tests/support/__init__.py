"""Shared test helpers: a real receiver on loopback, senders, synthetic series."""

from __future__ import annotations
