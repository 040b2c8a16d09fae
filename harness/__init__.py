"""Harnesses that run other systems beside tsukimi for comparison; not in the installed `tsukimi` package.

Run them from the repository root, as modules: `.venv/bin/python -m harness.<system>.<name> ...`.
"""
