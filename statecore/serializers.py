"""Serializers (API section 5): Flink's TypeSerializer pair in Python spelling.

The implementations are compiled (``statecore._codec``); this module is the
public home of the names.  ``Auto`` is the default everywhere.
"""
from statecore._codec import (MAX_DEPTH, Auto, Bool, Bytes, Float64, Int64, Json, Pickle, Serializer, Str,
                              resolve_serializer)

__all__ = ["Serializer", "Int64", "Float64", "Str", "Bytes", "Bool", "Auto", "Pickle", "Json",
           "resolve_serializer", "MAX_DEPTH"]
