"""recfb."""
