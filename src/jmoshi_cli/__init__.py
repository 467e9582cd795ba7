"""jmoshi: run J-Moshi, the Japanese full-duplex spoken dialogue model, with one command."""

__version__ = "0.1.0"
