"""``engine serve``: the library behind a long-running HTTP service (JSON API and a web page), and
the small client the CLI uses to reach it.

Layout: ``settings`` (ServiceConfig), ``address`` (the ``service.json`` record in the library home),
``state`` (encoder, index snapshot, generation-based reload, the search operations), ``feedback``
(Rocchio refinement), ``thumbnails`` (the on-disk thumbnail cache), ``uploads`` (byte cap while
reading, decoding to a tensor), ``schemas`` (request/response models for OpenAPI), ``api`` (routes),
``app`` (FastAPI factory, lifespan, errors, security headers), ``server`` (uvicorn on a bound socket)
and ``client`` (stdlib HTTP client for ``engine query``/``compare``).

Importing this package imports nothing heavy: the CLI reaches ``client`` and ``address`` at start-up.
"""
