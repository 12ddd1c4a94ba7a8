"""Accelerators: the backends that run guest code behind one exit protocol (`popek.accel.exits`)."""
