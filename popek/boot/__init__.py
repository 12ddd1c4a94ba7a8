"""Loading a kernel into guest memory and describing the CPU state it must start in."""

from popek.boot.entry import EntryState, Segment
from popek.boot.loader import BootImage, load_kernel

__all__ = ["BootImage", "EntryState", "Segment", "load_kernel"]
