"""Device models: they see bus offsets and interrupt lines, and nothing of the backend that runs the guest."""
