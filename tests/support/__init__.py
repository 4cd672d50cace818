"""What the tests share besides fixtures (those are in tests/plugins, listed by tests/conftest.py):
the one tiny trial config, sweep specs, running the CLI in a subprocess, reading the store, stopping
the processes a fixture started, and the KubeRay schema checks. Test modules import from here, never
from one another."""
