"""Dataset release builds: turn engine outputs into a versioned, documented, verifiable dataset folder.

Entry point: `pipelines/release.py`; the steps live in `release.build`. See docs/release.md.
"""
