"""MambaXray-CTL: chest X-ray report generation with a Mamba vision backbone and an LLM decoder."""

__version__ = "0.1.0"
