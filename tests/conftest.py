"""Fixtures for every test file: a published mlit_xxs, an offline Hugging Face cache and embedded test weights
(tests/hub_helpers.py)."""
from hub_helpers import embedded, offline_hf, published  # noqa: F401
