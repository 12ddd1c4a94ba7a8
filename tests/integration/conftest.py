"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from popek import image


@pytest.fixture(scope="session")
def guest() -> image.GuestImage:
    """popek's default guest (kernel, initramfs, command line), built once into the cache or taken from it."""
    try:
        return image.ensure_default_guest(progress=False)
    except image.ImageError as e:
        pytest.fail(f"the default guest could not be built: {e}")
