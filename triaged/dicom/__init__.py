"""DICOM networking and storage: receiver, durable instance store, series completion, sender helpers.

Only this package imports pynetdicom (style section 1).
"""

from __future__ import annotations
