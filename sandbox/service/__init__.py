"""The sandbox as an HTTP execution service, in the wire formats RL and evaluation stacks
already call: SandboxFusion's (``/run_code``, ``/run_jupyter``) and NeMo-Skills' (``/execute``
with ``X-Session-ID`` sessions). ``tora sandbox serve`` runs it.

Modules: ``fusion`` and ``nemo`` (the two wire formats), ``sessions`` (fresh kernels per
request, named sessions, expiry, caps), ``workdir`` (files in and out of a kernel),
``app`` (the routes), ``asgi`` (the body limit). The web stack is imported only by ``app``
and ``asgi``; nothing here imports ``tora``.
"""
