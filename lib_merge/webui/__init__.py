"""The only code that imports the WebUI's ``modules.*``: thin adapters between the WebUI and the engine.

State that must survive "Reload UI" (the live merge, its caches, the base recipe) lives here, never in
``scripts/*.py`` globals: this package stays imported across reloads.
"""
