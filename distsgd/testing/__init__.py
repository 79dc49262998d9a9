"""Test infrastructure, not API: what the tests, benchmarks and failure drills use to provoke and
observe distsgd on real processes and networks. Nothing in the library's normal path imports it.

- `faults`: deterministic fault injection (``DISTSGD_KILL``: a rank SIGKILLs itself after a step);
- `netns`: hosts as Linux network namespaces joined by shaped links (root only).
"""
