"""A small stand-in of the AUTOMATIC1111 WebUI v1.10.1 ``modules`` package, following the contract doc:
only what BlockMerge imports, with the same names, signatures and behaviour that matters."""
