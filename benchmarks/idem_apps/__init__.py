"""One FastAPI app per idempotency library, for ``benchmarks/bench_idempotency.py``.

``app.py`` builds the same ``POST /orders`` route and handler behind the library
named by ``IDEM_LIBRARY`` (``bare``, ``stampede``, ``stampede-local``,
``stampede-pg``, ``idemkit``, ``idemkit-local``, ``powertools``,
``powertools-local``, ``fastapi-idempotency``; the module's docstring says how each
is wired). Run it from the repository root (uvicorn imports
``benchmarks.idem_apps.app``)::

    IDEM_LIBRARY=idemkit REDIS_URL=redis://127.0.0.1:PORT/0 \\
        uvicorn benchmarks.idem_apps.app:app --workers 4
"""
