"""What runs inside the sandbox, in the kernel's (or the zygote's) process: stdlib only (and ipykernel).

``entry`` (what ``__main__`` runs), ``zygote`` (forking kernels), ``warm`` and
``kernelapp`` (what the zygote builds before the fork), ``namespaces``,
``mounts``, ``confine`` (capabilities, ``rlimits``, ``landlock``,
``seccomp``), ``hardening`` (the kernel's own plumbing), ``libc``, ``snapshot`` (a fork's
two halves, with cloudpickle: see ``sandbox.fork``).
"""
