"""A FastAPI service on Redis with stampede, a slow origin for it, and a load test.

- ``app``: the service (``uvicorn examples.service.app:app --workers 4``);
- ``origin``: a slow HTTP origin that counts its requests;
- ``loadtest``: a cold-key burst and a hot key expiring under load, as tables;
- ``fleet``: the service as a uvicorn process group, and reaching every worker.

See README.md in this folder.
"""
