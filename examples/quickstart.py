"""Quickstart: keyed ValueState + MapState with a 7-day TTL on the heap backend.

Run it with ``python examples/quickstart.py`` after ``pip install .``.
"""
import statecore as sc

clock = sc.ManualClock(0)
kb = sc.HashMapStateBackend().create_keyed_state_backend(max_parallelism=128, clock=clock)

counts = kb.get_state(sc.ValueStateDescriptor("count", int, default=0))
ttl = (sc.StateTtlConfig.new_builder(sc.Time.days(7))
       .set_update_type(sc.UpdateType.OnCreateAndWrite)
       .set_state_visibility(sc.StateVisibility.NeverReturnExpired)
       .build())
desc = sc.MapStateDescriptor("max_signal_delta", str, float)
desc.enable_time_to_live(ttl)
deltas = kb.get_state(desc)

for market, outcome, delta in [("m1", "yes", 0.2), ("m1", "no", 0.1), ("m2", "yes", 0.4), ("m1", "yes", 0.5)]:
    kb.set_current_key(market)
    counts.update(counts.value() + 1)
    deltas.put(outcome, max(delta, deltas.get(outcome) or 0.0))

kb.set_current_key("m1")
print("m1:", counts.value(), "records,", dict(deltas.items()))
clock.advance(sc.Time.days(7).to_milliseconds())  # a week later the map entries have expired
print("m1 after 7 days:", dict(deltas.items()), "| count (no TTL):", counts.value())
kb.close()
