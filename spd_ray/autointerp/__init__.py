"""Automated interpretation: label every SPD subcomponent with an LLM behind any OpenAI-compatible
endpoint (client.py talks to it, limits.py keeps all actors under one rate limit and budget)."""
