"""Marks the host as Forge (``host.is_forge`` looks for this package), as Forge's own ``modules_forge`` does."""
