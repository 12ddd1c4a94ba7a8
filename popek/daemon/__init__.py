"""Many VMs on one host (issue 9): the VM file (`popek.toml`, vmfile.py) and the daemon: its REST API (app.py,
models.py), its Unix socket (server.py), one process per VM (vmproc.py) supervised by supervisor.py, and the
Python client (client.py, exported as popek.Client). docs/daemon.md describes the API and the process model."""
