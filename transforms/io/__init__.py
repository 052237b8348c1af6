"""Adapters to external systems: one module each (``files``, ``kafka``), a composite PTransform
plus its config, the client library imported there only (inside the DoFns, so importing a
config never imports a client). Sources emit raw events ``(source, origin, payload)``: the
governed core (``transforms/``) does not know where they came from."""
