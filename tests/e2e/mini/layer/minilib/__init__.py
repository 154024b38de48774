"""A layer for the machinery tests: an error with a dotted name, as spotrun.errors has."""

CapacityUnavailable = type("Capacity.Unavailable", (Exception,), {})
