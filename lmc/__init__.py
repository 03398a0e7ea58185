"""lmc: offline LLM compiler and format converter with a slim runtime."""

__version__ = "0.1.0"
