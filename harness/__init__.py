"""The exactbench harness: the pytest plugin, oracles, records, report and CLI (python -m harness)."""
