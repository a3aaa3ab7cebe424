"""Cyclone on HashiCorp Nomad: job files rendered from the registry (`render.py`), a small client
for Nomad's HTTP API (`api.py`), offline validation of job files (`validate.py`, needs the
`python-hcl2` dev extra) and the retraining dispatcher (`dispatch.py`). The orchestrator plugin
that drives revisions through the API is `plugins/orchestrator_nomad.py`."""
