"""LangChain tests use the shared fixtures of tests/conftest.py (sandbox, view, wallet)."""
