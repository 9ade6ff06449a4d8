"""One thin module per pipeline stage: read the config, call the library, write outputs, return a summary."""
