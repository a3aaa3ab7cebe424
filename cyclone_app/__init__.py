"""The Cyclone application: the `cyclone` command line, the local mesh commands, the demo and
the example data sets. It sits above `services` (it starts them) and `cyclone` (the shared core
and public SDK); nothing below imports it (import-linter checks that)."""
