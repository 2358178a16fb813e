"""State descriptors: name, type and serializers of a keyed state (Flink's ``StateDescriptor``).

A descriptor is what user code hands to ``kb.get_state(descriptor)``; the
backend dispatches on its class. Serializer arguments are resolved once, at
construction, by ``statecore.serializers.resolve_serializer``: ``None`` is
``Auto()``, ``int`` is ``Int64()``, ``float`` is ``Float64()``, ``str`` is
``Str()``, ``bytes`` is ``Bytes()``, ``bool`` is ``Bool()`` and a
``Serializer`` instance is itself; anything else raises ``TypeError``.

As in Flink, equality and hashing of descriptors use only the class and the
name; :meth:`StateDescriptor.compatibility_key` is what tells whether two
descriptors of one name describe the same stored state.
"""

from .ttl import StateTtlConfig

__all__ = [
    "StateDescriptor",
    "ValueStateDescriptor",
    "ListStateDescriptor",
    "MapStateDescriptor",
    "ReducingStateDescriptor",
    "AggregatingStateDescriptor",
]

_AGGREGATE_METHODS = ("create_accumulator", "add", "get_result", "merge")


def _resolve(serializer):
    # Lazy import: serializers wraps the compiled codec, and descriptors must
    # stay importable (and cheap to import) without it until one is built.
    from .serializers import resolve_serializer

    return resolve_serializer(serializer)


class StateDescriptor:
    """Base of all state descriptors. Not instantiated directly.

    Parameters
    ----------
    name : str
        State name, unique per keyed backend; non-empty.

    Attributes
    ----------
    state_type : str
        Class attribute: ``"value"``, ``"list"``, ``"map"``, ``"reducing"``
        or ``"aggregating"``.

    Raises
    ------
    TypeError
        ``name`` is not a str.
    ValueError
        ``name`` is empty.
    """

    state_type = None

    def __init__(self, name):
        if not isinstance(name, str):
            raise TypeError(f"state name must be a str, got {type(name).__name__}")
        if not name:
            raise ValueError("state name must be a non-empty str")
        self._name = name
        self._ttl_config = None

    @property
    def name(self):
        """str: the state name."""
        return self._name

    @property
    def ttl_config(self):
        """StateTtlConfig or None: TTL settings; None means TTL is off."""
        return self._ttl_config

    def enable_time_to_live(self, ttl_config):
        """Turn TTL on for states created from this descriptor.

        Must be called before ``get_state``; a later call does not change a
        state already created (Flink reads the config once, at creation).
        Calling it again replaces the config.

        Parameters
        ----------
        ttl_config : StateTtlConfig

        Raises
        ------
        TypeError
            ``ttl_config`` is not a ``StateTtlConfig`` (build one with
            ``StateTtlConfig.new_builder(ttl).build()``).
        """
        if not isinstance(ttl_config, StateTtlConfig):
            raise TypeError(
                "enable_time_to_live needs a StateTtlConfig, got "
                f"{type(ttl_config).__name__}; build one with "
                "StateTtlConfig.new_builder(Time.days(1)).build()"
            )
        self._ttl_config = ttl_config

    @property
    def value_serializer(self):
        """Serializer: serializer of the stored values (elements, accumulator)."""
        return self.serializer

    def compatibility_key(self):
        """Return what must match for stored state to be reused under this descriptor.

        A tuple ``(state_type, user_key_identity, value_identity)`` where the
        identities are the serializers' ``identity()`` tuples and
        ``user_key_identity`` is ``None`` except for map state. The backend
        raises ``StateMigrationError`` when a name is registered or restored
        with a different key, comparing element-wise to name what differs.
        TTL is deliberately absent: switching TTL on or off is migrated, as
        in Flink 2.2, not refused. Functions (reduce/aggregate) and defaults
        are absent too, as in Flink, where they are not part of the
        serializer snapshot.
        """
        return (self.state_type, None, self.value_serializer.identity())

    def _repr_fields(self):
        return f"serializer={self.serializer!r}"

    def __repr__(self):
        ttl = f", ttl_config={self._ttl_config!r}" if self._ttl_config is not None else ""
        return f"{type(self).__name__}({self._name!r}, {self._repr_fields()}{ttl})"

    def __eq__(self, other):
        # Flink's StateDescriptor.equals: same class and same name.
        if isinstance(other, StateDescriptor):
            return type(self) is type(other) and self._name == other._name
        return NotImplemented

    def __hash__(self):
        return hash((type(self), self._name))


class ValueStateDescriptor(StateDescriptor):
    """Descriptor of a ``ValueState``: one value per key and namespace.

    Parameters
    ----------
    name : str
    serializer : Serializer or type, optional
        Value serializer (default ``Auto()``).
    default : object, optional
        Returned by ``value()`` when nothing is stored (Flink's deprecated
        default value; ``None`` when not given). It is never stored, so it
        need not be serializable, and it is returned as is (not copied).
    """

    state_type = "value"

    def __init__(self, name, serializer=None, default=None):
        super().__init__(name)
        self.serializer = _resolve(serializer)
        self.default = default

    def _repr_fields(self):
        return f"serializer={self.serializer!r}, default={self.default!r}"


class ListStateDescriptor(StateDescriptor):
    """Descriptor of a ``ListState``.

    Parameters
    ----------
    name : str
    serializer : Serializer or type, optional
        Serializer of each *element* (default ``Auto()``), as in Flink where
        ``ListStateDescriptor`` takes the element type.
    """

    state_type = "list"

    def __init__(self, name, serializer=None):
        super().__init__(name)
        self.serializer = _resolve(serializer)


class MapStateDescriptor(StateDescriptor):
    """Descriptor of a ``MapState``: a map of user keys to values per key and namespace.

    Parameters
    ----------
    name : str
    key_serializer : Serializer or type, optional
        Serializer of the map's user keys (default ``Auto()``). User keys are
        keys: they must encode deterministically (``dict`` and NaN refused).
    value_serializer : Serializer or type, optional
        Serializer of the map's values (default ``Auto()``).
    """

    state_type = "map"

    def __init__(self, name, key_serializer=None, value_serializer=None):
        super().__init__(name)
        self.key_serializer = _resolve(key_serializer)
        # Stored privately: the base class defines value_serializer as a property.
        self._value_serializer = _resolve(value_serializer)

    @property
    def value_serializer(self):
        """Serializer: serializer of the map's values."""
        return self._value_serializer

    def compatibility_key(self):
        """Return ``("map", key_serializer.identity(), value_serializer.identity())``.

        See :meth:`StateDescriptor.compatibility_key`.
        """
        return (self.state_type, self.key_serializer.identity(), self._value_serializer.identity())

    def _repr_fields(self):
        return (
            f"key_serializer={self.key_serializer!r}, "
            f"value_serializer={self._value_serializer!r}"
        )


class ReducingStateDescriptor(StateDescriptor):
    """Descriptor of a ``ReducingState``: values folded by ``reduce_function(acc, v)``.

    Parameters
    ----------
    name : str
    reduce_function : callable
        ``(accumulated, value) -> new accumulated``; the first added value is
        stored as is.
    serializer : Serializer or type, optional
        Serializer of the values / accumulated value (default ``Auto()``).

    Raises
    ------
    TypeError
        ``reduce_function`` is not callable.
    """

    state_type = "reducing"

    def __init__(self, name, reduce_function, serializer=None):
        super().__init__(name)
        if not callable(reduce_function):
            raise TypeError(
                f"reduce_function must be callable (acc, value) -> acc, "
                f"got {type(reduce_function).__name__}"
            )
        self.reduce_function = reduce_function
        self.serializer = _resolve(serializer)

    def _repr_fields(self):
        return f"reduce_function={self.reduce_function!r}, serializer={self.serializer!r}"


class AggregatingStateDescriptor(StateDescriptor):
    """Descriptor of an ``AggregatingState`` (Flink's ``AggregateFunction``).

    Parameters
    ----------
    name : str
    aggregate_function : object
        Has callables ``create_accumulator()``, ``add(value, acc) -> acc``,
        ``get_result(acc)`` and ``merge(a, b) -> acc``.
    serializer : Serializer or type, optional
        Serializer of the *accumulator*, which is what is stored (default
        ``Auto()``), as Flink's descriptor takes the accumulator type.

    Raises
    ------
    TypeError
        A required method is missing or not callable; the message names it.
    """

    state_type = "aggregating"

    def __init__(self, name, aggregate_function, serializer=None):
        super().__init__(name)
        missing = [
            m for m in _AGGREGATE_METHODS if not callable(getattr(aggregate_function, m, None))
        ]
        if missing:
            raise TypeError(
                f"aggregate_function {type(aggregate_function).__name__} lacks callable "
                f"{', '.join(missing)}; it needs create_accumulator(), add(value, acc), "
                "get_result(acc) and merge(a, b)"
            )
        self.aggregate_function = aggregate_function
        self.serializer = _resolve(serializer)

    def _repr_fields(self):
        return f"aggregate_function={self.aggregate_function!r}, serializer={self.serializer!r}"
