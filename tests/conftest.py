"""Suite-wide settings.

Under CI (the CI environment variable is set), hypothesis draws the same examples on every run: a red run then
means a change broke something, not that the search wandered onto a new input. Local runs keep exploring, and
whatever they find goes into a test as an explicit example.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
