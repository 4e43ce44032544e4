"""Allow ``python -m triaged``."""

from __future__ import annotations

from triaged.cli.app import main

if __name__ == "__main__":
    main()
