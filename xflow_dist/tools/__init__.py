"""Tools that are not the library: the simulated provider, the demo fleet and the embedded server.

`xflow demo`, `xflow simulate`, the tests and the benchmarks use them; a production install needs none
of them (the simulator and the demo need the `demo` extra)."""
