"""The suite's fixtures, one module per thing they start (tests/conftest.py lists them in
`pytest_plugins`): S3 on moto, `mlflow server`, a Ray head, a multi-node Ray cluster, a loopback HTTP
server, the recorder of network contacts, stand-in FID weights and one finished sweep."""
