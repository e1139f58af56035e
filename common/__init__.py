"""Shared pieces of synthgrad: wire protocol, configuration, models, data and process helpers."""
