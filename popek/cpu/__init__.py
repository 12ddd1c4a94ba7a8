"""The software CPU's architectural pieces. Some are already used by the KVM backend's assists."""
