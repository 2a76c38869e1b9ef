"""The handoff benchmark: ``python bench/handoff_bench.py`` (see ``bench/README.md``)."""
