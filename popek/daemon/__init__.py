"""Many VMs on one host: the VM file (`popek.toml`, vmfile.py); the daemon and its REST API come next (issue 9)."""
