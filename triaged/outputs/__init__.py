"""The output side: build the DICOM objects a result becomes, and deliver them to destinations.

Building (one module per IOD, as highdicom does): ``render`` (the picture), ``sc``, ``kos``, ``sr``, ``summary``
(shared identities) and ``build`` (all objects of one result). Delivering: ``scu`` (export C-STORE), ``send``
(`triaged send` / `echo`), ``sink`` (the demo's stand-in PACS). Shared DICOM helpers stay in ``triaged.dicom``.
"""

from __future__ import annotations
