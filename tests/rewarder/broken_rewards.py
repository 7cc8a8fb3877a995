"""A reward module that cannot be imported (the rewarder must say so and not start)."""

raise ImportError("this reward module is broken on purpose")
