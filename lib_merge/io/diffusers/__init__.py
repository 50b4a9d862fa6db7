"""Diffusers folders: key tables (``maps/``), folder input (:mod:`.source`), folder output (:mod:`.writer`), shipped configs (``configs/``)."""
