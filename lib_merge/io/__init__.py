"""Sources and sinks: reading checkpoints (safetensors by header + pread, pickled checkpoints through a
restricted reader) and writing merged safetensors files."""
