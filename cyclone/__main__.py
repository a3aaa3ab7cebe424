"""`python -m cyclone ...` for old habits: the command line lives in `cyclone_app` (run it as
`python -m cyclone_app ...` or the `cyclone` script).

By module name through runpy, not an import, so the shared core keeps no dependency on the
application above it.
"""

import runpy

runpy.run_module("cyclone_app", run_name="__main__", alter_sys=True)
