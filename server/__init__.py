"""hisa-serve's HTTP side: an OpenAI-compatible FastAPI server over a HISA-patched model.

Importing this package is cheap (no torch); ``server.app`` and ``server.engine`` pull the heavy parts.
"""

__version__ = "0.1.0"
